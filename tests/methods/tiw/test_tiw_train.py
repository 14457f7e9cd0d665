"""TIW on images (raydebias.methods.tiw.train): model shapes, the discriminator phase learning a brightness
shift, one 2-worker DDP ``fit_tiw`` run end to end, and the reporting helpers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raydebias.methods.tiw.objectives import TimeDiscriminator, VPSchedule
from raydebias.methods.tiw.train import (ConvTimeBackbone, EpsUNet, fit_tiw, generate, load_eps_model, proportions,
                                           total_variation, train_discriminator)

torch.set_num_threads(1)
SCH = VPSchedule()


def test_model_shapes():
    torch.manual_seed(0)
    x, t = torch.randn(5, 3, 32, 32), torch.rand(5)
    eps = EpsUNet(block_out_channels=(16, 32))
    assert eps(x, t).shape == (5, 3, 32, 32)
    disc = TimeDiscriminator(backbone=ConvTimeBackbone(width=8, hidden=16))
    d = disc(x, t)
    assert d.shape == (5,) and ((d > 0) & (d < 1)).all()
    x16 = torch.randn(5, 3, 16, 16)
    assert EpsUNet(image_size=16, factor=1, block_out_channels=(8, 16))(x16, t).shape == x16.shape
    assert ConvTimeBackbone(factor=1, width=8, hidden=16)(x16, t).shape == (5,)
    with pytest.raises(ValueError):
        EpsUNet(image_size=30, factor=4)


def test_discriminator_learns_brightness():
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 40, (64, 16, 16, 3), dtype=np.uint8)
    bright = rng.integers(215, 256, (64, 16, 16, 3), dtype=np.uint8)
    torch.manual_seed(0)
    disc = TimeDiscriminator(backbone=ConvTimeBackbone(factor=2, width=8, hidden=32))
    losses = train_discriminator(disc, dark, bright, 100, 1e-3, 16, SCH, torch.Generator().manual_seed(0))
    assert len(losses) == 100 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert not any(p.requires_grad for p in disc.parameters())  # frozen afterwards
    gen = torch.Generator().manual_seed(1)
    t = torch.full((64,), 0.05)
    with torch.no_grad():
        def d_mean(x: np.ndarray) -> float:
            x0 = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
            x_t = SCH.alpha(t)[:, None, None, None] * x0 + SCH.sigma(t)[:, None, None, None] * torch.randn(
                x0.shape, generator=gen)
            return float(disc(x_t, t).mean())

        assert d_mean(bright) > 0.8 and d_mean(dark) < 0.2


@pytest.mark.slow
def test_fit_tiw_two_workers(ray_module, tmp_path):
    rng = np.random.default_rng(0)
    x_bias = rng.integers(0, 160, (64, 16, 16, 3), dtype=np.uint8)
    x_ref = rng.integers(96, 256, (32, 16, 16, 3), dtype=np.uint8)
    model_kw = {"image_size": 16, "factor": 2, "block_out_channels": (16, 32)}
    out = tmp_path / "tiw"
    summary = fit_tiw(x_bias, x_ref, out, num_workers=2, storage_path=tmp_path / "ray", seed=0, model=model_kw,
                      disc={"width": 8, "hidden": 32}, disc_steps=20, steps=20, batch_size=8, lr=1e-3,
                      objectives=["dsm", "tiw_paper"], log_every=10)
    assert sorted(p.name for p in out.iterdir()) == ["disc.safetensors", "dsm.safetensors", "losses.json",
                                                     "tiw_paper.safetensors"]
    assert summary == json.loads((out / "losses.json").read_text())
    assert summary["world_size"] == 2
    for phase in ("disc", "dsm", "tiw_paper"):
        s = summary[phase]
        assert s["steps"] == 20 and np.isfinite([s["loss_first"], s["loss_last"], s["seconds"]]).all()
    print({k: round(v["it_per_s"], 1) for k, v in summary.items() if isinstance(v, dict) and "it_per_s" in v})
    dsm, tiw = (load_eps_model(out / f"{k}.safetensors", model_kw) for k in ("dsm", "tiw_paper"))
    assert any(not torch.equal(a, b) for a, b in zip(dsm.state_dict().values(), tiw.state_dict().values()))
    g1 = generate(tiw, 5, seed=3, steps=4, image_size=16, batch_size=4)
    assert g1.shape == (5, 16, 16, 3) and g1.dtype == np.uint8
    np.testing.assert_array_equal(g1, generate(tiw, 5, seed=3, steps=4, image_size=16, batch_size=4))
    assert not np.array_equal(g1, generate(dsm, 5, seed=3, steps=4, image_size=16, batch_size=4))
    assert not (tmp_path / "ray" / "tiw").exists()


def test_discriminator_resumed_from_a_step_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """What a restarted TIW worker does: weights, optimizer and generator from the step-6 checkpoint (written and
    read back through the checkpoint files), then the remaining steps: the same weights as one 10-step run."""
    from raydebias.methods.tiw.train import _load_resume_state, _save_resume_state, _state

    rng = np.random.default_rng(0)
    xb = rng.integers(0, 120, (32, 16, 16, 3), dtype=np.uint8)
    xr = rng.integers(120, 256, (32, 16, 16, 3), dtype=np.uint8)

    def fresh() -> TimeDiscriminator:
        torch.manual_seed(0)
        return TimeDiscriminator(backbone=ConvTimeBackbone(factor=2, width=8, hidden=16))

    full = fresh()
    full_losses = train_discriminator(full, xb, xr, 10, 1e-2, 8, SCH, torch.Generator().manual_seed(1))

    saved: dict[int, Path] = {}
    part, g = fresh(), torch.Generator().manual_seed(1)

    def on_checkpoint(step: int, opt_state: dict) -> None:
        d = tmp_path / f"step{step}"
        d.mkdir()
        _save_resume_state(d, {"weights": {"current": _state(part)}, "phase": "disc", "step": step,
                               "rng": [g.get_state()], "summary": {}, **opt_state})
        saved[step] = d

    train_discriminator(part, xb, xr, 10, 1e-2, 8, SCH, g, checkpoint_every=3, on_checkpoint=on_checkpoint)
    assert sorted(saved) == [3, 6, 9]  # every 3 steps, not after the last
    state = _load_resume_state(saved[6])
    assert state is not None and state["step"] == 6 and len(state["losses"]) == 6
    resumed, g2 = fresh(), torch.Generator()
    resumed.load_state_dict(state["weights"]["current"])
    g2.set_state(state["rng"][0])
    losses = train_discriminator(resumed, xb, xr, 10, 1e-2, 8, SCH, g2, resume=state)
    assert losses == pytest.approx(full_losses, abs=1e-6)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    scratch = fresh()  # without the optimizer state the same data gives other weights: the resume is not vacuous
    scratch.load_state_dict(state["weights"]["current"])
    train_discriminator(scratch, xb, xr, 10, 1e-2, 8, SCH, g2.set_state(state["rng"][0]),
                        resume={**state, "optimizer": torch.optim.Adam(scratch.parameters()).state_dict()})
    assert any(not torch.equal(a, b) for a, b in zip(full.state_dict().values(), scratch.state_dict().values()))


def test_proportions_and_total_variation():
    p = proportions(np.array([0, 0, 1, 3]), 4)
    np.testing.assert_allclose(p, [0.5, 0.25, 0.0, 0.25])
    np.testing.assert_allclose(proportions(np.array([], np.int64), 2), [0.0, 0.0])
    assert total_variation(p, np.full(4, 0.25)) == pytest.approx(0.25)
    assert total_variation([0.9, 0.1], [0.5, 0.5]) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        proportions(np.array([0, 2]), 2)


@pytest.mark.slow
def test_tiw_stage_end_to_end(ray_module, tmp_path):
    """The ``tiw`` stage on a tiny Colored MNIST: both objectives trained by 2 DDP workers, samples measured by
    the group probe, a ``tiw`` entry under metrics.json["generation"] and no classifier row for it."""
    from raydebias.config import load_config
    from raydebias.pipeline import run_pipeline

    run = tmp_path / "run"
    cfg = load_config(None, [
        f"run_dir={run}", "data.builtin={aligned: 0.95, n_train: 200, n_val: 10, n_test: 10}",
        "stages=[data, tiw, train, evaluate, report]", "method=tiw", "baselines=[erm]", "train.num_workers=0",
        "train.epochs=1",
        "models.classifier.width=8", "tiw.reference_size=40", "tiw.disc_steps=5", "tiw.steps=5",
        "tiw.batch_size=8", "tiw.block_out_channels=[16, 32]", "tiw.num_samples=16", "tiw.sample_steps=3",
    ])
    run_pipeline(cfg, log=lambda m: None)
    stats = json.loads((run / "stages" / "tiw" / "stats.json").read_text())
    assert stats["reference"]["size"] == 40 and stats["training"]["world_size"] == 2
    assert set(stats["objectives"]) == {"dsm", "tiw_paper"}
    ref = stats["reference"]["aligned_fraction"]
    assert ref == pytest.approx(0.1)  # val: every digit in every colour
    for v in stats["objectives"].values():
        assert v["aligned_fraction"] * 16 == pytest.approx(round(v["aligned_fraction"] * 16))  # of 16 samples
        # TV over the groups bounds the gap of any one event, here "the pairing is the aligned one"
        assert v["tv_groups"] >= abs(v["aligned_fraction"] - ref) - 1e-9
        assert np.isfinite(v["fid"]) and v["fid"] > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [r["method"] for r in metrics["rows"]] == ["erm"] and "tiw" in metrics["generation"]
    tiw_fid = metrics["generation"]["fidelity"]["sets"]["tiw"]["objectives"]  # the val probes' view of the samples
    assert set(tiw_fid) == {"dsm", "tiw_paper"} and all(sum(v["class_histogram"]) == 16 for v in tiw_fid.values())
    assert "TIW: generated samples vs the unbiased reference" in (run / "report.html").read_text()


def test_direct_call_defaults_equal_the_stage_config():
    from raydebias.methods.tiw.train import DEFAULTS
    from raydebias.methods.tiw import TIWConfig

    t = TIWConfig()
    for k in ("disc_steps", "disc_lr", "steps", "lr", "batch_size", "objectives", "checkpoint_every"):
        assert DEFAULTS[k] == getattr(t, k), k
