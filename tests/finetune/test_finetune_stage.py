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


def test_a_batched_pack_trains_the_adapters_one_unit_task_would(tiny_diffusion, tmp_path):
    """The stage's two task bodies on the same run dir: ``_train_pack`` (several adapters, one batched pass) saves
    the same LoRA weights as ``_train_unit`` per adapter."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from raydebias.finetune.stage import _train_pack, _train_unit

    rng = np.random.default_rng(1)
    n = 12
    px = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "stages" / "data").mkdir(parents=True)
    ids = [f"r{i}" for i in range(n)]
    pq.write_table(pa.table({"id": ids, "pixels": [p.tobytes() for p in px]}),
                   tmp_path / "stages" / "data" / "train.parquet")
    tiny_diffusion.save(tmp_path / "stages" / "diffusion" / "model")
    (tmp_path / "stages" / "diffusion" / "model.json").write_text(json.dumps(
        {"path": "stages/diffusion/model", "run_relative": True, "dtype": "float32"}))
    units = [{"name": "g0_c0", "prompt": "a photo of a sks red zero", "ids": ["r5", "r0", "r3", "r8"]},
             {"name": "g1_c0", "prompt": "a photo of a sks blue one", "ids": ["r1", "r2", "r9", "r11", "r7"]}]
    ft = {"steps": 2, "batch_size": 3, "lr": 5e-3, "rank": 2, "cpus_per_task": 1, "prior_preservation": False,
          "prior_weight": 1.0}
    stats = _train_pack(str(tmp_path), units, ft, 0, 16, [str(tmp_path / "pack" / u["name"]) for u in units])
    assert [s["images"] for s in stats] == [4, 5]
    for u in units:
        _train_unit(str(tmp_path), u, ft, 0, 16, str(tmp_path / "unit" / u["name"]))
        a = load_file(str(tmp_path / "pack" / u["name"] / "pytorch_lora_weights.safetensors"))
        b = load_file(str(tmp_path / "unit" / u["name"] / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
