"""Training the bootstrap text-to-image model (UNet + text encoder), with resumable checkpoints and the
conditioning guard (docs/methods/bootstrap.md)."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from raydebias.data.transforms import to_model_input
from raydebias.models.diffusion import DiffusionBundle, coind_loss, diffusion_loss


@torch.no_grad()
def conditioning_gap(bundle: DiffusionBundle, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor,
                     seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """Mean denoising loss of ``latents`` with their captions' token ``ids`` and with the empty caption, at the
    same timesteps and noise (drawn from ``seed``): ``(loss_conditional, loss_unconditional)``. Their relative
    difference measures how much the model uses its captions; it falls to ~0 when it stops following them."""
    was_training = bundle.unet.training, bundle.text_encoder.training
    bundle.unet.eval()
    bundle.text_encoder.eval()
    totals = [0.0, 0.0]  # conditional, unconditional
    for i in range(0, len(latents), batch_size):
        z = latents[i : i + batch_size]
        for k, rows in enumerate((ids, empty_ids)):  # the same generator seed: the same t and noise for both
            g = torch.Generator().manual_seed(seed + i)
            loss = diffusion_loss(bundle, z, bundle.embed_ids(rows[i : i + batch_size]), generator=g)
            totals[k] += float(loss) * len(z)
    bundle.unet.train(was_training[0])
    bundle.text_encoder.train(was_training[1])
    return totals[0] / len(latents), totals[1] / len(latents)


def train_bootstrap_diffusion(
    bundle: DiffusionBundle,
    pixels: Any,
    captions: list[str],
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    drop_probs: dict[str, float] | None = None,
    caption_dropout_fn: Callable[[str, np.random.Generator], str] | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    shift: int = 0,
    log_every: int = 100,
    min_snr_gamma: float = 0.0,
    ema_decay: float = 0.0,
    freeze_token_embedding: bool = False,
    p2_gamma: float = 0.0,
    p2_k: float = 1.0,
    sample_weights: np.ndarray | None = None,
    checkpoint_every: int = 0,
    lr_schedule: str = "constant",
    on_checkpoint: Callable[[int, dict], None] | None = None,
    resume: dict | None = None,
    guard_pixels: np.ndarray | None = None,
    guard_captions: list[str] | None = None,
    guard_every: int = 0,
    guard_ratio: float = 0.5,
    guard_min_gap: float = 0.005,
    coind_weight: float = 0.0,
    coind_captions: list[tuple[str, str]] | None = None,
    coind_fraction: float = 0.25,
    block_rows: int = 8192,
) -> dict:
    """Train UNet + text encoder jointly (AdamW, grad-clip 1) on uint8 NHWC ``pixels`` with their captions.
    ``pixels`` is an array or a random-access reader with ``take(rows)`` (:class:`raydebias.data.stream.PartRows`):
    each batch draws rows with replacement, and the rows of ``block_rows / batch_size`` steps are read together.

    Conditioning guard (``guard_every`` > 0, on held-out ``guard_pixels``/``guard_captions``): every ``guard_every``
    steps :func:`conditioning_gap` measures how much the captions lower the denoising loss. The weights (and
    optimizer) with the largest gap so far are kept in memory; when the gap falls below ``guard_ratio`` × that best
    (the model stopped following its captions: the conditioning collapse in BENCHMARKS.md, "Generation fidelity:
    findings") training rolls back to them and continues at half the learning rate, and a collapsed final model is
    replaced by them. Both act only once the best gap reached ``guard_min_gap`` (early in training the gap is ~0 and
    noisy).

    ``lr_schedule``: ``constant`` after the warm-up, or ``cosine`` decay to 0 at ``steps``.
    Every ``checkpoint_every`` steps ``on_checkpoint(steps_done, state)`` gets the full training state (weights,
    optimizer, schedule, EMA, both random generators, losses); ``resume=state`` continues from it, so a run
    resumed at step k ends with the same weights as an uninterrupted one.

    Caption dropout for classifier-free guidance: the whole caption becomes "" with probability
    ``drop_probs["all"]`` (default 0.1); otherwise ``caption_dropout_fn(caption, rng)`` (e.g. per-word
    dropout built by the caller) is applied. ``shift`` > 0 adds a random translation of up to ``shift`` pixels
    (zero padding). ``min_snr_gamma``, ``p2_gamma``, ``p2_k``: see :func:`diffusion_loss`. ``ema_decay`` > 0 keeps
    an exponential moving average of the weights (diffusers ``EMAModel`` with warm-up, decay capped at
    ``ema_decay``) and leaves the averaged weights in the model at the end (no measurable gain in 1,000-step CPU runs; meant for long runs).
    ``freeze_token_embedding`` leaves the text encoder's token table at its (random) initial values.
    ``sample_weights`` (one per image) draws each batch with those relative probabilities instead of uniformly.
    ``coind_weight`` > 0 adds λ × :func:`coind_loss` on the first ``coind_fraction`` of each batch, with
    ``coind_captions[i]`` = (class-only, bias-only) caption of image i.
    Returns loss statistics and the speed.
    """
    if len(pixels) != len(captions):
        raise ValueError(f"{len(pixels)} images but {len(captions)} captions")
    if len(pixels) == 0 or steps <= 0:
        raise ValueError("need at least one image and one step")
    if sample_weights is not None and len(sample_weights) != len(pixels):
        raise ValueError(f"{len(sample_weights)} sample weights for {len(pixels)} images")
    if coind_weight > 0 and (coind_captions is None or len(coind_captions) != len(pixels)):
        raise ValueError("coind_weight > 0 needs one (class-only, bias-only) caption pair per image")
    probs = None if sample_weights is None else np.asarray(sample_weights, np.float64) / np.sum(sample_weights)
    n = len(pixels)
    size = min(batch_size, n)
    take = (lambda i: pixels[i]) if isinstance(pixels, np.ndarray) else pixels.take  # noqa: E731
    per_block = max(1, block_rows // size)
    block: dict[str, Any] = {"index": -1}

    def batch_for(step: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``step``'s rows and images. The rows of ``per_block`` steps are drawn together from a generator
        seeded by (seed, block), so a step's rows do not depend on where training resumed; the block's images are
        read in one pass (a stream reads each part once per block, not once per step)."""
        b = step // per_block
        if block["index"] != b:
            r = np.random.default_rng([seed, b])
            draws = r.integers(0, n, size=(per_block, size)) if probs is None else \
                r.choice(n, (per_block, size), p=probs)
            uniq, inv = np.unique(draws, return_inverse=True)
            block.update(index=b, draws=draws, inv=inv.reshape(draws.shape), x=take(uniq))
        k = step % per_block
        return block["draws"][k], block["x"][block["inv"][k]]

    p_all = float((drop_probs or {"all": 0.1}).get("all", 0.0))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    device = bundle.device
    unet, te = bundle.unet, bundle.text_encoder
    frozen = {id(te.get_input_embeddings().weight)} if freeze_token_embedding else set()
    params = [p for m in (unet, te) for p in m.parameters() if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(100, steps // 10))

    def lr_factor(i: int) -> float:  # linear warm-up, then constant or cosine decay to 0 at ``steps``
        if i + 1 < warmup:
            return (i + 1) / warmup
        if lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (i + 1 - warmup) / max(1, steps - warmup))))
        return 1.0

    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = None
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, foreach=True)
    token_cache: dict[str, torch.Tensor] = {}

    def ids_for(caps: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(caps) if c not in token_cache]
        if missing:
            for c, row in zip(missing, bundle.tokenize(missing)):
                token_cache[c] = row
        return torch.stack([token_cache[c] for c in caps])

    guard = None
    if guard_every > 0:
        if guard_pixels is None or guard_captions is None or len(guard_pixels) != len(guard_captions) \
                or len(guard_pixels) == 0:
            raise ValueError("guard_every > 0 needs guard_pixels and as many guard_captions")
        with torch.no_grad():
            guard_z = bundle.encode(to_model_input(guard_pixels).to(device, unet.dtype))
        guard_ids = (ids_for(list(guard_captions)), ids_for([""] * len(guard_captions)))
        guard = {"best_gap": -math.inf, "best_step": 0, "history": [], "rollbacks": [], "restored_best": False}
    best: dict | None = None

    def snapshot() -> dict:
        clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731
        return {"unet": clone(unet.state_dict()), "text_encoder": clone(te.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()), "ema": copy.deepcopy(ema.state_dict()) if ema else None}

    def restore(snap: dict, optimizer: bool = True) -> None:
        unet.load_state_dict(snap["unet"])
        te.load_state_dict(snap["text_encoder"])
        if optimizer:
            opt.load_state_dict(snap["optimizer"])
            if ema is not None and snap["ema"] is not None:
                ema.load_state_dict(snap["ema"])

    def check_guard(step_done: int) -> float:
        nonlocal best
        lc, lu = conditioning_gap(bundle, guard_z, *guard_ids, seed=seed)
        gap = (lu - lc) / max(lu, 1e-12)
        guard["history"].append([step_done, round(lc, 5), round(gap, 5)])
        if log is not None:
            log(f"diffusion step {step_done}/{steps} conditioning gap {gap:.4f} (val loss {lc:.4f})")
        if gap >= guard["best_gap"]:
            guard["best_gap"], guard["best_step"], best = gap, step_done, snapshot()
        elif guard["best_gap"] >= guard_min_gap and gap < guard_ratio * guard["best_gap"] and step_done < steps:
            restore(best)
            sch.base_lrs = [b * 0.5 for b in sch.base_lrs]
            guard["rollbacks"].append([step_done, guard["best_step"]])
            if log is not None:
                log(f"diffusion step {step_done}: conditioning gap {gap:.4f} < {guard_ratio} x best "
                    f"{guard['best_gap']:.4f} (step {guard['best_step']}): rolled back, lr halved")
        return gap

    losses: list[float] = []
    coind_losses: list[float] = []
    start = 0
    if resume is not None:
        start = int(resume["step"])
        unet.load_state_dict(resume["unet"])
        te.load_state_dict(resume["text_encoder"])
        opt.load_state_dict(resume["optimizer"])
        sch.load_state_dict(resume["scheduler"])
        if ema is not None and resume.get("ema") is not None:
            ema.load_state_dict(resume["ema"])
        rng.bit_generator.state = resume["numpy_rng"]
        gen.set_state(resume["torch_rng"])
        losses = list(resume["losses"])
        coind_losses = list(resume.get("coind_losses", []))
        if guard is not None and resume.get("guard") is not None:
            guard = resume["guard"]
            best = {k: resume[f"best_{k}"] for k in ("unet", "text_encoder", "optimizer", "ema")}
        if log is not None:
            log(f"diffusion: resumed at step {start}/{steps}")
    unet.train()
    te.train()
    t0 = time.perf_counter()
    try:
        for step in range(start, steps):
            idx, xb = batch_for(step)
            x = to_model_input(xb).to(device)
            if shift > 0:
                h, w = x.shape[-2:]
                xp = F.pad(x, (shift, shift, shift, shift), value=-1.0)
                dy, dx = rng.integers(0, 2 * shift + 1, size=(2, len(idx)))
                x = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(len(idx))])
            caps = []
            for i in idx:
                c = captions[i]
                if rng.random() < p_all:
                    c = ""
                elif caption_dropout_fn is not None:
                    c = caption_dropout_fn(c, rng)
                caps.append(c)
            with torch.no_grad():
                z = bundle.encode(x.to(unet.dtype))
            emb = bundle.embed_ids(ids_for(caps))
            loss = diffusion_loss(bundle, z, emb, generator=gen, min_snr_gamma=min_snr_gamma, p2_gamma=p2_gamma,
                                  p2_k=p2_k)
            if coind_weight > 0:
                m = max(1, round(coind_fraction * len(idx)))
                sub = idx[:m]
                caps4 = ([captions[i] for i in sub], [coind_captions[i][0] for i in sub],
                         [coind_captions[i][1] for i in sub], [""] * m)
                ci = coind_loss(bundle, z[:m], tuple(bundle.embed_ids(ids_for(c)) for c in caps4), generator=gen)
                coind_losses.append(float(ci.detach()))
                loss = loss + coind_weight * ci
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sch.step()
            if ema is not None:
                ema.step(params)
            losses.append(float(loss.detach()))
            if guard is not None and (step + 1) % guard_every == 0:
                check_guard(step + 1)
            if on_checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                    and step + 1 < steps:
                on_checkpoint(step + 1, {
                    "step": step + 1, "unet": unet.state_dict(), "text_encoder": te.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sch.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "numpy_rng": rng.bit_generator.state, "torch_rng": gen.get_state(), "losses": losses,
                    "coind_losses": coind_losses,
                    **({"guard": guard, **{f"best_{k}": v for k, v in best.items()}} if best is not None else {})})
            if log is not None and log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                rate = (step + 1 - start) / (time.perf_counter() - t0)
                log(f"diffusion step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({rate:.2f} it/s)")
        if ema is not None:
            ema.copy_to(params)
        if guard is not None:
            final = guard["history"][-1][2] if guard["history"] and guard["history"][-1][0] == steps \
                else check_guard(steps)
            if best is not None and guard["best_gap"] >= guard_min_gap and final < guard_ratio * guard["best_gap"]:
                restore(best, optimizer=False)
                if ema is not None and best["ema"] is not None:
                    ema.load_state_dict(best["ema"])
                    ema.copy_to(params)
                guard["restored_best"] = True
                if log is not None:
                    log(f"diffusion: final conditioning gap {final:.4f} < {guard_ratio} x best "
                        f"{guard['best_gap']:.4f}: kept the step-{guard['best_step']} weights")
    finally:
        unet.eval()
        te.eval()
        for p in params:
            p.requires_grad_(False)
    secs = time.perf_counter() - t0
    k = max(1, steps // 10)
    return {
        "steps": steps,
        "resumed_at": start,
        "batch_size": int(size),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "loss_mean": float(np.mean(losses)),
        "seconds": secs,
        "it_per_s": (steps - start) / secs if secs > 0 else float("inf"),
        **({"guard": {k: v for k, v in guard.items()}} if guard is not None else {}),
        **({"coind_loss_first": float(np.mean(coind_losses[:k])), "coind_loss_last": float(np.mean(coind_losses[-k:]))}
           if coind_losses else {}),
    }
