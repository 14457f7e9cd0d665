from raydebias.finetune.stage import reset_if_stale


def test_adapters_are_kept_for_resume_and_dropped_when_inputs_change(tmp_path):
    (tmp_path / "g0_0").mkdir()
    (tmp_path / "g0_0" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert reset_if_stale(tmp_path, "key-A")  # no marker yet: whatever is there is of unknown origin
    assert not (tmp_path / "g0_0").exists()
    (tmp_path / "g1_1").mkdir()
    assert not reset_if_stale(tmp_path, "key-A")  # same inputs: a resumed run keeps finished adapters
    assert (tmp_path / "g1_1").exists()
    assert reset_if_stale(tmp_path, "key-B")  # the base model (or anything upstream) changed
    assert not (tmp_path / "g1_1").exists() and (tmp_path / "inputs.key").read_text() == "key-B"
    assert not reset_if_stale(tmp_path, None)
