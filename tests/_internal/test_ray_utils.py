"""Ray Train run names keyed by the stage key: a stale run is never resumed and never left behind."""

from raydebias._internal.ray_utils import keyed_train_run


def test_keyed_train_run_deletes_other_keys_only(tmp_path):
    for d in ("erm-aaaaaaaaaaaa", "erm-bbbbbbbbbbbb", "erm", "groupdro-aaaaaaaaaaaa", "ermx-cccccccccccc"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "checkpoint").write_text("x")
    name = keyed_train_run(tmp_path, "erm", "bbbbbbbbbbbbffff")
    assert name == "erm-bbbbbbbbbbbb"
    # the same key's run stays (a rerun resumes it); erm's other runs go; other methods' runs are untouched
    assert sorted(d.name for d in tmp_path.iterdir()) == ["erm-bbbbbbbbbbbb", "ermx-cccccccccccc",
                                                          "groupdro-aaaaaaaaaaaa"]
    assert keyed_train_run(tmp_path, "erm", "c" * 64) == "erm-cccccccccccc"
    assert not (tmp_path / "erm-bbbbbbbbbbbb").exists()
    assert keyed_train_run(tmp_path / "missing", "tiw", None) == "tiw"
