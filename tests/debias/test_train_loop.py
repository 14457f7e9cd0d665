"""The classifier loop's phases: a stage-2 branch starts from the weights it names, and a run killed at the start
of a branch resumes to the same weights as an uninterrupted one (the branch's starting weights are checkpointed)."""

import numpy as np
import pytest
import torch


def _config(tmp_path, phases):
    from raydebias.data.stream import write_parts

    rng = np.random.default_rng(0)
    data = {"x": rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8), "y": np.arange(48) % 2,
            "a": (np.arange(48) // 2) % 2}
    files = write_parts(tmp_path / "data", data, rows_per_part=20)
    return {"method": "branch-test", "seed": 0, "phases": phases, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0,
            "augment": False, "groupdro_eta": 0.01, "select_by": "aga", "classifier": {"arch": "cnn", "width": 4},
            "num_classes": 2, "num_bias": 2, "threads": 1, "data": {k: [{"files": files}] for k in ("train", "val")},
            "image_size": 8, "shuffle_buffer": 32}


def _phases(branch: bool):
    pre = {"name": "pre", "data": "train", "recipe": "erm", "epochs": 2, "sampler": "uniform", "lr": 1e-2}
    far = {"name": "far", "data": "train", "recipe": "erm", "epochs": 2, "sampler": "uniform", "lr": 0.5}
    still = {"name": "still", "data": "train", "recipe": "erm", "epochs": 1, "sampler": "uniform", "lr": 1e-12,
             **({"from": "pre"} if branch else {})}
    return [pre, far, still]


def _run(tmp_path, name, config, fail_at=None, monkeypatch=None):
    from safetensors.torch import load_file

    from raydebias._internal import ray_utils
    from raydebias.debias import train
    from raydebias.debias.train import train_loop

    if fail_at is not None:
        real = train.report  # the loop's checkpoint report (imported from ray_utils)

        def failing(metrics, checkpoint_dir=None):
            if metrics["step"] == fail_at:
                raise RuntimeError("injected failure")
            real(metrics, checkpoint_dir)

        monkeypatch.setattr(train, "report", failing)
        with pytest.raises(Exception, match="injected failure"):
            ray_utils._fit_local(train_loop, config, str(tmp_path), name)
        monkeypatch.setattr(train, "report", real)
    ray_utils._fit_local(train_loop, config, str(tmp_path), name)
    d = ray_utils._local_checkpoint_dir(tmp_path / name)
    return {f.stem: load_file(f) for f in d.glob("*.safetensors")}


def test_a_branch_starts_from_the_weights_at_the_end_of_the_phase_it_names(ray_cluster, tmp_path):
    branched = _run(tmp_path, "b", _config(tmp_path, _phases(branch=True)))
    chained = _run(tmp_path, "c", _config(tmp_path, _phases(branch=False)))
    # "still" barely moves the weights (lr 1e-12): a branch ends where "pre" ended, a plain chain where "far" did
    assert set(branched) == {"model", "best", "end_0"} and "end_0" not in chained
    for k, v in branched["end_0"].items():
        if v.is_floating_point():
            torch.testing.assert_close(branched["model"][k], v, atol=1e-6, rtol=0)
    assert any((chained["model"][k] - v).abs().max() > 1e-3 for k, v in branched["end_0"].items()
               if v.is_floating_point())


def test_a_run_failing_at_the_start_of_a_branch_resumes_to_the_same_weights(ray_cluster, tmp_path, monkeypatch):
    phases = _phases(branch=True)
    phases[2]["lr"] = 1e-2  # a branch that trains, so that a wrong starting point shows
    whole = _run(tmp_path, "whole", _config(tmp_path, phases))
    resumed = _run(tmp_path, "resumed", _config(tmp_path, phases), fail_at=4, monkeypatch=monkeypatch)  # step 4: "still"
    for k, v in whole["model"].items():
        torch.testing.assert_close(resumed["model"][k], v)
