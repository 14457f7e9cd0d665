"""Ray Train run names keyed by the stage key: a stale run is never resumed and never left behind."""

import os

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


def test_local_cluster_token_stays_in_env_only_when_home_is_read_only(tmp_path, monkeypatch):
    from raydebias._internal.ray_utils import _keep_token_in_env_if_home_is_read_only

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    logs: list[str] = []
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # writable: Ray saves its token there as usual
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert "RAY_AUTH_TOKEN" not in os.environ and not logs
    assert not list((tmp_path / "home" / ".ray").iterdir())  # the probe is removed
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path / "file"))  # ~/.ray cannot be created
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert len(os.environ["RAY_AUTH_TOKEN"]) == 64 and "not writable" in logs[0]
    token = os.environ["RAY_AUTH_TOKEN"]
    _keep_token_in_env_if_home_is_read_only(logs.append)  # a token already given is left alone
    assert os.environ["RAY_AUTH_TOKEN"] == token and len(logs) == 1
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _keep_token_in_env_if_home_is_read_only(logs.append)
    assert "RAY_AUTH_TOKEN" not in os.environ
