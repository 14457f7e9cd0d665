"""TIW-DSM on images (docs/methods/tiw.md), trained through Ray Train (``TorchTrainer``, DDP over workers).

Phase 1 trains a time-dependent image discriminator d_φ(x_t, t) (reference = 1) on balanced D_bias / D_ref
batches; phase 2 trains one fresh ε-model per objective ("dsm", "tiw_paper", "tiw_code") from the same init on
batches from D_bias ∪ D_ref, with the frozen discriminator used *unwrapped* (``tiw_dsm_loss`` differentiates it
w.r.t. x_t, which must not run through DDP).  Rank 0 reports one checkpoint with ``disc.safetensors``,
``<objective>.safetensors`` and ``losses.json``.  Batch sizes are per worker (global = batch_size × workers).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from raydebias._internal.io import as_path, atomic_path, load_safetensors, remove_path
from raydebias._internal.ray_utils import fit_torch, get_checkpoint, keyed_train_run, report
from raydebias.core.seeds import derived_seed
from raydebias.data.stream import PartRows
from raydebias.data.transforms import to_model_input
from raydebias.methods.tiw.objectives import (
    FourierTime,
    TimeDiscriminator,
    VPSchedule,
    discriminator_loss,
    dsm_loss,
    sample,
    tiw_dsm_loss,
)

OBJECTIVES = ("dsm", "tiw_paper", "tiw_code")
# the defaults of a direct call; the stage passes every value from its config (``TIWConfig`` in
# raydebias/methods/tiw/stages.py, whose defaults these equal: tests/methods/tiw/test_tiw_train.py)
DEFAULTS: dict[str, Any] = {"seed": 0, "threads": 1, "model": {}, "disc": {}, "disc_steps": 300, "disc_lr": 3e-4,
                            "steps": 1000, "lr": 1e-3, "batch_size": 64, "objectives": ["dsm", "tiw_paper"],
                            "schedule": {}, "log_every": 100, "checkpoint_every": 250}


class EpsUNet(nn.Module):
    """ε-model on [-1, 1] NCHW images: pixel-unshuffle by ``factor`` → diffusers ``UNet2DModel`` (no attention,
    timestep t·999) → pixel-shuffle back.  Called as ``model(x_t, t)`` with continuous t of shape (N,)."""

    def __init__(self, image_size: int = 32, channels: int = 3, factor: int = 4,
                 block_out_channels: tuple[int, ...] = (64, 128), layers_per_block: int = 1) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        if image_size % factor:
            raise ValueError(f"image_size {image_size} is not divisible by factor {factor}")
        c, n = channels * factor**2, len(block_out_channels)
        self.factor = factor
        self.unet = UNet2DModel(
            sample_size=image_size // factor, in_channels=c, out_channels=c,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            norm_num_groups=math.gcd(32, *block_out_channels), add_attention=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = F.pixel_unshuffle(x, self.factor)
        return F.pixel_shuffle(self.unet(z, t.reshape(-1) * 999).sample, self.factor)


class ConvTimeBackbone(nn.Module):
    """Discriminator backbone: unshuffle → 3 convs + SiLU → avg pool, ⊕ Fourier(t) → MLP → logit (N,)."""

    def __init__(self, channels: int = 3, factor: int = 4, width: int = 64, hidden: int = 128, n_freq: int = 6) -> None:
        super().__init__()
        self.factor = factor
        self.convs = nn.Sequential(
            nn.Conv2d(channels * factor**2, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU())
        self.time = FourierTime(n_freq)
        self.mlp = nn.Sequential(nn.Linear(2 * width + self.time.dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.convs(F.pixel_unshuffle(x, self.factor)).mean(dim=(2, 3))
        return self.mlp(torch.cat([h, self.time(t, x.dtype)], dim=1)).reshape(-1)


class DiscriminatorObjective(nn.Module):
    """``discriminator_loss`` as one module forward, so that DDP sees exactly one forward per backward."""

    def __init__(self, disc: TimeDiscriminator) -> None:
        super().__init__()
        self.disc = disc

    def forward(self, xb: torch.Tensor, xr: torch.Tensor, schedule: VPSchedule,
                generator: torch.Generator) -> torch.Tensor:
        return discriminator_loss(self.disc, xb, xr, schedule, generator)


def _batch(x: np.ndarray | PartRows, bs: int, gen: torch.Generator, device: torch.device | str) -> tuple[torch.Tensor, np.ndarray]:
    idx = torch.randint(len(x), (bs,), generator=gen, device=gen.device).cpu().numpy()
    return to_model_input(x[idx]).to(device), idx


def _optimize(loss_fn: Callable[[], torch.Tensor], params: list[nn.Parameter], steps: int, lr: float,
              log: Callable[[int, float], None] | None = None, log_every: int = 100,
              clock: list[float] | None = None, *, resume: dict | None = None, checkpoint_every: int = 0,
              on_checkpoint: Callable[[int, dict], None] | None = None) -> list[float]:
    """``steps`` Adam steps (grad-norm clip 1); returns the per-step losses (``clock`` gets each step's end time).

    Every ``checkpoint_every`` steps (not after the last) ``on_checkpoint(step, {"optimizer", "losses"})`` gets the
    optimizer state; ``resume`` (such a dict plus ``"step"``) continues after it: with the model weights and the
    random generator restored by the caller, the run ends with the same weights as an uninterrupted one."""
    opt = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    start = 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        losses, start = [float(v) for v in resume["losses"]], int(resume["step"])
    for i in range(start, steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if clock is not None:
            clock.append(time.perf_counter())
        if log is not None and ((i + 1) % log_every == 0 or i + 1 == steps):
            log(i + 1, float(np.mean(losses[-log_every:])))
        if on_checkpoint is not None and checkpoint_every > 0 and (i + 1) % checkpoint_every == 0 and i + 1 < steps:
            on_checkpoint(i + 1, {"optimizer": opt.state_dict(), "losses": list(losses)})
    return losses


def train_discriminator(disc: TimeDiscriminator, x_bias: np.ndarray | PartRows, x_ref: np.ndarray | PartRows, steps: int, lr: float,
                        batch_size: int, schedule: VPSchedule, generator: torch.Generator, *,
                        prepare: Callable[[nn.Module], nn.Module] | None = None,
                        log: Callable[[int, float], None] | None = None, log_every: int = 100,
                        clock: list[float] | None = None, **checkpointing: Any) -> list[float]:
    """Train ``disc`` in place on balanced batches (batch_size from each uint8 NHWC set, drawn with replacement
    by ``generator``, which also draws t/ε and sets the device).  ``prepare`` (e.g. ``ray.train.torch.prepare_model``)
    wraps the loss module for DDP; ``disc`` itself stays unwrapped.  ``checkpointing``: ``resume``,
    ``checkpoint_every``, ``on_checkpoint`` of :func:`_optimize`.  Returns the per-step losses."""
    objective: nn.Module = DiscriminatorObjective(disc.to(generator.device))
    if prepare is not None:
        objective = prepare(objective)
    disc.train()

    def loss_fn() -> torch.Tensor:
        xb, _ = _batch(x_bias, batch_size, generator, generator.device)
        xr, _ = _batch(x_ref, batch_size, generator, generator.device)
        return objective(xb, xr, schedule, generator)

    losses = _optimize(loss_fn, [p for p in objective.parameters() if p.requires_grad], steps, lr, log, log_every,
                       clock, **checkpointing)
    disc.eval().requires_grad_(False)
    return losses


def _summary(losses: list[float], seconds: float, clock: list[float]) -> dict[str, float | None]:
    """Mean loss of the first/last 10% of steps; ``seconds`` of the whole phase (setup included), ``it_per_s``
    over steps 2..N (steady state)."""
    k = max(1, len(losses) // 10)
    rate = (len(clock) - 1) / max(clock[-1] - clock[0], 1e-9) if len(clock) > 1 else None
    return {"steps": len(losses), "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])),
            "seconds": seconds, "it_per_s": rate}


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}


def _check_objectives(objectives: list[str]) -> None:
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives:
        raise ValueError(f"objectives must be a non-empty list from {OBJECTIVES}, got {objectives!r}")


def _gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order (one process: ``[obj]``)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _save_resume_state(d: Path, state: dict[str, Any]) -> None:
    """A resumable TIW checkpoint: weights as safetensors (``done-<phase>`` and ``current``), the rest (phase, step,
    optimizer, every rank's generator state, losses, summaries) in ``state.pt`` (tensors and plain types only, so
    it loads with ``weights_only=True``)."""
    for name, st in state["weights"].items():
        save_file(st, str(d / f"{name}.safetensors"))
    torch.save({k: v for k, v in state.items() if k != "weights"}, d / "state.pt")


def _load_resume_state(d: Path) -> dict[str, Any] | None:
    if not (d / "state.pt").exists():
        return None  # the final checkpoint (losses.json): nothing to resume
    state = torch.load(d / "state.pt", weights_only=True)
    state["weights"] = {f.stem: load_file(str(f)) for f in d.glob("*.safetensors")}
    return state


def tiw_train_loop(config: dict[str, Any]) -> None:
    """Ray Train per-worker function (see the module docstring; config keys in ``DEFAULTS`` plus ``data_refs``
    {"bias", "ref"} → uint8 NHWC arrays in the object store, or PartRows, and ``image_size``).

    With ``checkpoint_every`` > 0 rank 0 reports a resumable checkpoint every that many steps of each phase (the
    weights of the finished phases, the current model and optimizer, every rank's random generator); a restarted
    worker group continues from it — the same phase and step, the same batches and noise — instead of from step 0."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = {**DEFAULTS, **config}
    _check_objectives(cfg["objectives"])
    torch.set_num_threads(max(1, int(cfg["threads"])))
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    # arrays travel through the object store; Parquet-backed PartRows are read by each worker
    xb, xr = (ray.get(v) if isinstance(v, ray.ObjectRef) else v for v in (cfg["data_refs"]["bias"],
                                                                           cfg["data_refs"]["ref"]))
    schedule, bs, seed = VPSchedule(**cfg["schedule"]), int(cfg["batch_size"]), int(cfg["seed"])
    model_kw = {"image_size": cfg["image_size"], "channels": xb.shape[-1], **cfg["model"]}
    disc_kw = {"channels": xb.shape[-1], "factor": model_kw.get("factor", 4), **cfg["disc"]}
    every = int(cfg.get("checkpoint_every", 0))

    resume = None
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = _load_resume_state(Path(d))
    summary: dict[str, Any] = dict(resume["summary"]) if resume else {}
    states: dict[str, dict[str, torch.Tensor]] = {
        k[len("done-"):]: v for k, v in (resume["weights"] if resume else {}).items() if k.startswith("done-")}

    def gen(phase: int) -> torch.Generator:  # rank-seeded: every rank draws its own batches and noise
        return torch.Generator(device=device).manual_seed(derived_seed(seed, phase * 1009 + rank))

    def logger(name: str) -> Callable[[int, float], None] | None:
        return (lambda i, v: print(f"[tiw/{name}] step {i} loss {v:.4f}", flush=True)) if rank == 0 else None

    def phase_resume(name: str, module: nn.Module, g: torch.Generator) -> dict | None:
        """Restore ``module`` and ``g`` if the checkpoint stopped inside phase ``name``."""
        if resume is None or resume["phase"] != name:
            return None
        module.load_state_dict(resume["weights"]["current"])
        g.set_state(resume["rng"][rank])
        if rank == 0:
            print(f"[tiw/{name}] resumed at step {resume['step']}", flush=True)
        summary.setdefault("resumed", {})[name] = int(resume["step"])
        return resume

    def checkpointer(name: str, module: nn.Module, g: torch.Generator) -> Callable[[int, dict], None]:
        def on_checkpoint(step: int, opt_state: dict) -> None:
            rngs = _gather(g.get_state(), world)  # a collective: every rank calls it at the same step
            if rank != 0:
                report({"phase": name, "step": step})
                return
            tmp = Path(tempfile.mkdtemp(prefix="tiw-ckpt-"))
            weights = {f"done-{k}": v for k, v in states.items()}
            weights["current"] = _state(module)
            _save_resume_state(tmp, {"weights": weights, "phase": name, "step": step, "rng": rngs,
                                     "summary": summary, **opt_state})
            report({"phase": name, "step": step}, tmp)  # persisted to storage, then removed
        return on_checkpoint

    torch.manual_seed(seed)
    disc = TimeDiscriminator(backbone=ConvTimeBackbone(**disc_kw))
    if "disc" in states:  # finished before the restart
        disc.load_state_dict(states["disc"])
        disc.eval().requires_grad_(False)
    else:
        g0 = gen(0)
        t0, clock = time.perf_counter(), list[float]()  # the phase's seconds include DDP setup (a barrier)
        dl = train_discriminator(disc, xb, xr, int(cfg["disc_steps"]), float(cfg["disc_lr"]), bs, schedule, g0,
                                 prepare=ray.train.torch.prepare_model, log=logger("disc"),
                                 log_every=cfg["log_every"], clock=clock, resume=phase_resume("disc", disc, g0),
                                 checkpoint_every=every, on_checkpoint=checkpointer("disc", disc, g0))
        summary["disc"] = _summary(dl, time.perf_counter() - t0, clock)
        states["disc"] = _state(disc)
    x_all = np.concatenate([xb, xr]) if isinstance(xb, np.ndarray) else PartRows.concat(xb, xr)
    n_bias = len(xb)
    for obj in cfg["objectives"]:
        if obj in states:
            continue
        torch.manual_seed(seed + 1)  # the same init for every objective
        core = EpsUNet(**model_kw)
        g = gen(1)  # the same batches and noise for every objective
        obj_resume = phase_resume(obj, core, g)
        model = ray.train.torch.prepare_model(core)
        model.train()

        def loss_fn() -> torch.Tensor:
            x, idx = _batch(x_all, bs, g, device)
            if obj == "dsm":
                return dsm_loss(model, x, schedule, g)
            is_ref = torch.as_tensor(idx >= n_bias, device=device)
            return tiw_dsm_loss(model, disc, x, schedule, form=obj[4:], generator=g, is_ref=is_ref)

        t0, clock = time.perf_counter(), list[float]()
        losses = _optimize(loss_fn, list(model.parameters()), int(cfg["steps"]), float(cfg["lr"]), logger(obj),
                           cfg["log_every"], clock, resume=obj_resume, checkpoint_every=every,
                           on_checkpoint=checkpointer(obj, core, g))
        summary[obj] = _summary(losses, time.perf_counter() - t0, clock)
        states[obj] = _state(core)
        if not all(math.isfinite(v) for v in losses):
            print(f"[tiw/{obj}] rank {rank}: non-finite loss", flush=True)
    summary.update(world_size=world, batch_size_per_worker=bs, model=model_kw, disc_model=disc_kw)
    metrics = {f"{k}_loss_last": v["loss_last"] for k, v in summary.items() if isinstance(v, dict) and "loss_last" in v}
    metrics.update({f"{k}_param_sum": float(sum(v.double().sum() for v in st.values()))  # equal on all ranks (DDP)
                    for k, st in states.items()})
    if rank != 0:
        report(metrics)
        return
    tmp = tempfile.mkdtemp(prefix="tiw-ckpt-")
    for name, st in states.items():
        save_file(st, f"{tmp}/{name}.safetensors")
    Path(f"{tmp}/losses.json").write_text(json.dumps(summary, indent=2))
    rates = [f"{k} {v['it_per_s'] or 0:.1f} it/s, {v['seconds']:.1f} s" for k, v in summary.items()
             if isinstance(v, dict) and "it_per_s" in v]
    print("[tiw] done: " + "; ".join(rates), flush=True)
    report(metrics, tmp)  # persisted to storage, then removed


def fit_tiw(x_bias: np.ndarray | PartRows, x_ref: np.ndarray | PartRows, out_dir: Path, *, num_workers: int = 2, cpus_per_worker: int = 1,
            use_gpu: bool = False, storage_path: Path, run_key: str | None = None, **loop_kwargs: Any) -> dict[str, Any]:
    """Run ``tiw_train_loop`` with ``TorchTrainer`` on uint8 NHWC arrays (put in the object store) or PartRows
    (each worker reads the Parquet parts; Ray must be initialised; one restart on a worker failure,
    resumed from the last step checkpoint, as is a rerun with the same ``run_key`` after a killed driver); the
    final files land in ``out_dir`` (replaced atomically).  Returns the parsed ``losses.json``."""
    import ray

    _check_objectives(loop_kwargs.get("objectives", DEFAULTS["objectives"]))
    put = lambda x: ray.put(np.ascontiguousarray(x, np.uint8)) if isinstance(x, np.ndarray) else x  # noqa: E731
    config = {**DEFAULTS, "threads": cpus_per_worker, "image_size": int(x_bias.shape[1]), **loop_kwargs,
              "data_refs": {"bias": put(x_bias), "ref": put(x_ref)}}
    resources: dict[str, float] = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    name = keyed_train_run(as_path(storage_path), "tiw", run_key)
    ckpt = fit_torch(tiw_train_loop, config, num_workers=num_workers, resources=resources, storage=as_path(storage_path),
                     name=name, max_failures=1)
    if ckpt is None:
        raise RuntimeError("tiw: no checkpoint was reported")
    with ckpt.as_directory() as d, atomic_path(out_dir) as tmp:
        shutil.copytree(d, tmp)
    remove_path(as_path(storage_path) / name)  # Ray Train's copies; out_dir keeps the files
    return json.loads((as_path(out_dir) / "losses.json").read_text())


def load_eps_model(path: str | Path, model_kwargs: dict[str, Any]) -> EpsUNet:
    """An :class:`EpsUNet` (eval mode) from a ``<objective>.safetensors`` file."""
    model = EpsUNet(**model_kwargs)
    model.load_state_dict(load_safetensors(path))
    return model.eval()


@torch.no_grad()
def generate(model: nn.Module, n: int, seed: int, steps: int = 50, image_size: int = 32, channels: int = 3,
             schedule: VPSchedule | None = None, batch_size: int = 256) -> np.ndarray:
    """``n`` uint8 NHWC samples by DDIM (eta = 0, x̂0 clipped to [−1, 1]) from one ``torch.Generator`` seeded by
    ``seed``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = [np.zeros((0, image_size, image_size, channels), np.uint8)]
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        x = sample(model, (b, channels, image_size, image_size), schedule or VPSchedule(), steps, 0.0, gen, device,
                   clip_x0=1.0)
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def proportions(groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Fraction of samples in each group 0..num_groups-1 (zeros for an empty array)."""
    groups = np.asarray(groups, np.int64).reshape(-1)
    if len(groups) and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"group ids must lie in [0, {num_groups})")
    counts = np.bincount(groups, minlength=num_groups).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance 0.5 · ‖p − q‖₁."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())
