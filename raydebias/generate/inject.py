"""DiffInject / InjectFusion h-space content injection primitives (METHODS.md §3), pure tensor functions.

* ``slerp`` — batched spherical interpolation with a lerp fallback for near-colinear (and zero) vectors, where
  the public code divides by sin θ ≈ 0 and returns NaN.
* ``inject_h`` — h̃_t = Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ): the content bottleneck h_c rescaled to the style
  bottleneck's norm, so every interpolant keeps ‖h_t‖.
* ``asymmetric_ddim_step`` — the asymmetric reverse step of Asyrp / InjectFusion (DiffInject eq. 7):
  x_{t−1} = √ᾱ_{t−1}·P_t(ε_injected) + D_t(ε_original) + σ_t z.
"""

from __future__ import annotations

import json

import numpy as np
import torch


def _per_sample(v, ref: torch.Tensor) -> torch.Tensor:
    """A scalar or a (B,) tensor as a (B, 1, …, 1) tensor broadcastable against ``ref``."""
    v = torch.as_tensor(v, dtype=ref.dtype, device=ref.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (ref.ndim - 1)))


def slerp(a: torch.Tensor, b: torch.Tensor, gamma, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` (B, …), each sample flattened to one vector.

    slerp = sin((1−γ)θ)/sin θ · a + sin(γθ)/sin θ · b with cos θ = ⟨a, b⟩/(‖a‖‖b‖). For unit vectors this
    walks the great circle (norm 1, angle γθ from ``a``); for vectors of equal norm r it keeps norm r. Where
    |cos θ| > 1 − eps (colinear or antiparallel), or either vector is zero, it returns the lerp
    (1−γ)a + γb instead (for antiparallel inputs the great circle is undefined; lerp passes through the origin).
    ``gamma``: a float or a (B,) tensor. Computed in float32 at least; returned in ``a``'s dtype. Gradient-safe
    (no NaN gradient from the unused branch).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    out_dtype = a.dtype
    dtype = torch.promote_types(a.dtype, torch.float32)
    shape = a.shape
    a2, b2 = a.reshape(shape[0], -1).to(dtype), b.reshape(shape[0], -1).to(dtype)
    g = _per_sample(gamma, a2)
    na, nb = a2.norm(dim=1, keepdim=True), b2.norm(dim=1, keepdim=True)
    cos = (a2 * b2).sum(1, keepdim=True) / (na * nb).clamp_min(torch.finfo(dtype).tiny)
    degenerate = (cos.abs() > 1 - eps) | (na == 0) | (nb == 0)
    theta = torch.arccos(torch.where(degenerate, torch.zeros_like(cos), cos.clamp(-1.0, 1.0)))
    sin_t = torch.where(degenerate, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - g) * theta) / sin_t) * a2 + (torch.sin(g * theta) / sin_t) * b2
    linear = (1 - g) * a2 + g * b2
    return torch.where(degenerate, linear, spherical).reshape(shape).to(out_dtype)


def inject_h(h_t: torch.Tensor, h_c: torch.Tensor, gamma, eps: float = 1e-6) -> torch.Tensor:
    """h̃_t = Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ) per sample (norms over all but the batch dim).

    γ = 0 keeps the style bottleneck h_t; γ = 1 gives h_c's direction at ‖h_t‖'s norm; every γ keeps ‖h_t‖
    (both endpoints have that norm). ``h_c`` with batch 1 is broadcast over ``h_t``'s batch.
    """
    h_c = h_c.expand_as(h_t)
    dims = tuple(range(1, h_t.ndim))
    n_t = torch.linalg.vector_norm(h_t, dim=dims, keepdim=True)
    n_c = torch.linalg.vector_norm(h_c, dim=dims, keepdim=True).clamp_min(torch.finfo(h_c.dtype).tiny)
    return slerp(h_t, h_c * (n_t / n_c), gamma, eps=eps)


def asymmetric_ddim_step(x_t: torch.Tensor, eps_injected: torch.Tensor, eps_original: torch.Tensor, alpha_t,
                         alpha_prev, eta: float = 0.0, noise: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM reverse step x_t → x_{t−1} with the predicted x̂_0 from ``eps_injected`` (ε with h̃_t) and the
    direction term from ``eps_original`` (ε with the untouched h_t):

        x̂_0 = (x_t − √(1−ᾱ_t)·ε_inj) / √ᾱ_t
        σ_t = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t−1})
        x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1−ᾱ_{t−1}−σ_t²)·ε_orig + σ_t·z

    ``alpha_t`` / ``alpha_prev`` are *cumulative* products ᾱ (floats or (B,) tensors; ᾱ_{t−1} = 1 after the last
    step, as diffusers' ``set_alpha_to_one``). With ``eps_injected == eps_original`` this is the standard DDIM step
    (diffusers ``DDIMScheduler.step``, no clipping/thresholding). ``noise`` z defaults to N(0, I) from
    ``generator`` when η > 0; DiffInject uses η = 0 above t_boost and η > 0 below.
    """
    a_t, a_p = _per_sample(alpha_t, x_t), _per_sample(alpha_prev, x_t)
    x0 = (x_t - (1 - a_t).sqrt() * eps_injected) / a_t.sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t)).sqrt() * (1 - a_t / a_p).sqrt() if eta else torch.zeros_like(a_t)
    x_prev = a_p.sqrt() * x0 + (1 - a_p - sigma**2).clamp_min(0).sqrt() * eps_original
    if eta:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype, device=x_t.device)
        x_prev = x_prev + sigma * noise
    return x_prev


# --------------------------------------------------------------------------------------------------------------
# h-space injection with a diffusers UNet (DDIM inversion, cached bottlenecks, asymmetric reverse process)
# --------------------------------------------------------------------------------------------------------------


class HSpace:
    """Forward hook on ``unet.mid_block`` (the bottleneck, Asyrp's h-space).

    ``mode="record"`` stores the block's output in ``self.h``; ``mode="inject"`` expects a doubled batch
    [x, x] and replaces the second half of the output by ``inject_h(h, self.content, self.gamma)``, so one UNet call
    gives both ε_original and ε_injected. ``mode=None`` leaves the UNet untouched. Use as a context manager.
    """

    def __init__(self, unet) -> None:
        self.unet, self.mode, self.h, self.content, self.gamma = unet, None, None, None, 0.0
        self._handle = None

    def __enter__(self) -> "HSpace":
        self._handle = self.unet.mid_block.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self.mode = None

    def _hook(self, module, inputs, output):
        if self.mode == "record":
            self.h = output.detach()
        elif self.mode == "inject":
            b = output.shape[0] // 2
            return torch.cat([output[:b], inject_h(output[b:], self.content.to(output), self.gamma)])
        return None


def _eps(bundle, x: torch.Tensor, t, context: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The UNet's output at (x, t) as ε (v-prediction converted with ᾱ of ``x``'s level)."""
    out = bundle.predict(x, t, context.expand(x.shape[0], -1, -1))
    if bundle.noise_scheduler.config.prediction_type == "v_prediction":
        out = abar.sqrt() * out + (1 - abar).sqrt() * x
    return out


def _schedules(bundle, num_steps: int):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    fwd = DDIMScheduler.from_config(bundle.noise_scheduler.config)
    fwd.set_timesteps(num_steps)
    inv = DDIMInverseScheduler.from_config(bundle.noise_scheduler.config)
    inv.set_timesteps(num_steps)
    return fwd, inv


def _abar(sched, t: int) -> torch.Tensor:
    return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod


@torch.no_grad()
def ddim_invert(bundle, z0: torch.Tensor, num_steps: int, context: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T (diffusers ``DDIMInverseScheduler``; the model is evaluated at the
    current, less noisy latent with the next timestep, as diffusers' inversion pipelines do)."""
    _, inv = _schedules(bundle, num_steps)
    x = z0.to(bundle.device, bundle.dtype)
    for t in inv.timesteps:
        out = bundle.predict(x, t, context.expand(x.shape[0], -1, -1))
        x = inv.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def record_h(bundle, z_T: torch.Tensor, num_steps: int, context: torch.Tensor, t_edit: int) -> torch.Tensor:
    """Plain DDIM (η = 0) reconstruction from ``z_T`` recording the bottleneck h_t at every step with t ≥ t_edit:
    the content features InjectFusion injects. Returns (S_edit, B, C, H, W)."""
    fwd, _ = _schedules(bundle, num_steps)
    step = bundle.noise_scheduler.config.num_train_timesteps // num_steps
    x, hs = z_T.to(bundle.device, bundle.dtype), []
    with HSpace(bundle.unet) as hook:
        for t in fwd.timesteps:
            if int(t) < t_edit:
                break
            hook.mode = "record"
            a_t, a_p = _abar(fwd, int(t)), _abar(fwd, int(t) - step)
            eps = _eps(bundle, x, t, context, a_t)
            hs.append(hook.h)
            x = asymmetric_ddim_step(x, eps, eps, a_t, a_p)
    return torch.stack(hs) if hs else torch.zeros(0)


@torch.no_grad()
def inject_generate(bundle, z_T: torch.Tensor, h_content: torch.Tensor, num_steps: int, context: torch.Tensor,
                    t_edit: int, t_boost: int, gamma: float, eta: float = 1.0,
                    seeds: list[int] | None = None) -> torch.Tensor:
    """DiffInject generation from the style images' inverted latents ``z_T`` (B, …): for t ≥ t_edit the
    bottleneck is replaced by Slerp(h_t, ‖h_t‖·h_c/‖h_c‖, γ) (``h_content`` from :func:`record_h`, one
    (B, …) slice per edited step) with the asymmetric step; below t_edit plain DDIM, η = 0 above ``t_boost`` and
    ``eta`` (stochastic, per-row seeded noise) below. Returns x_0 latents."""
    fwd, _ = _schedules(bundle, num_steps)
    step = bundle.noise_scheduler.config.num_train_timesteps // num_steps
    x = z_T.to(bundle.device, bundle.dtype)
    gens = [torch.Generator().manual_seed(int(s)) for s in (seeds or range(x.shape[0]))]
    with HSpace(bundle.unet) as hook:
        for i, t in enumerate(fwd.timesteps):
            a_t, a_p = _abar(fwd, int(t)), _abar(fwd, int(t) - step)
            if int(t) >= t_edit and i < len(h_content):
                hook.mode, hook.content, hook.gamma = "inject", h_content[i], gamma
                eps_orig, eps_inj = _eps(bundle, torch.cat([x, x]), t, context, a_t).chunk(2)
                x = asymmetric_ddim_step(x, eps_inj, eps_orig, a_t, a_p)
            else:
                hook.mode = None
                eps = _eps(bundle, x, t, context, a_t)
                e = eta if int(t) < t_boost else 0.0
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x) if e else None
                x = asymmetric_ddim_step(x, eps, eps, a_t, a_p, eta=e, noise=noise)
    return x


# --------------------------------------------------------------------------------------------------------------
# Stages: ``mine`` (GCE-biased classifier → top-K loss samples), ``inject`` (one Ray task per batch of pairs)
# --------------------------------------------------------------------------------------------------------------


def run_mine(ctx):
    """Train the biased classifier f_B with GCE (q = ``diffinject.gce_q``, no val selection: it should stay
    biased), score every training row by its CE under f_B and keep the top-K per class (``mined.parquet``)."""
    import pyarrow as pa

    from raydebias._internal.io import atomic_write_json, atomic_write_table
    from raydebias.debias.amplifier import error_set_quality
    from raydebias.debias.lff import mine_conflicting
    from raydebias.debias.train import fit_classifier, score_train_split
    from raydebias.evaluate.metrics import conflicting_mask
    from raydebias.core import StageResult

    info, di = ctx.data_info, ctx.cfg.diffinject
    out = ctx.stage_dir("mine")
    phases = [{"name": "gce", "data": "train", "recipe": "gce", "epochs": di.biased_epochs, "sampler": "uniform",
               "recipe_args": {"q": di.gce_q}}]
    fit_classifier(ctx, "biased_gce", phases, out_name="mine/model")
    tr, probs, loss = score_train_split(ctx, out / "model")
    top = mine_conflicting(loss, tr["y"], k=di.top_k)
    atomic_write_table(out / "mined.parquet", pa.table({
        "id": tr["id"][top].tolist(), "label": tr["y"][top], "loss": loss[top].astype(np.float32)}))
    stats = {"mined": int(len(top)), "top_k": di.top_k,
             "biased_train_accuracy": float((probs.argmax(1) == tr["y"]).mean())}
    if info["num_bias"] is not None and (tr["a"] >= 0).all():
        conf = conflicting_mask(tr["y"], tr["a"], info["group_counts"]["train"])
        picked = np.zeros(len(conf), bool)
        picked[top] = True
        stats["mined_vs_conflicting"] = error_set_quality(~picked, conf)  # "errors" = the mined set
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[mine] top-{di.top_k} per class under the GCE model: {stats}")
    return StageResult([ctx.rel(out / "model"), ctx.rel(out / "mined.parquet"), ctx.rel(out / "stats.json")],
                       stats)


def inject_task(run_dir: str, di: dict, part: int, style_ids: list, content_ids: list, seeds: list[int],
                threads: int) -> str:
    """One Ray task: generate the synthetic images of one batch of (style, content) pairs and write
    ``parts/part-<n>.parquet``. DDIM inversions (style: x_T; content: x_T and the recorded h_t) are cached per
    image under ``cache/`` (safetensors) and reused by every task and rerun with the same model and steps."""
    from pathlib import Path

    import pyarrow as pa
    from safetensors.torch import load_file, save_file

    from raydebias._internal.io import atomic_path, atomic_write_table
    from raydebias.data.transforms import to_model_input
    from raydebias.data.splits import load_split
    from raydebias.diffusion.ddpm import load_ddpm
    from raydebias.models.diffusion import _to_uint8

    torch.set_num_threads(threads)
    run, out = Path(run_dir), Path(run_dir) / "stages" / "inject"
    info = json.loads((run / "stages" / "data" / "info.json").read_text())
    tr = load_split(run / "stages" / "data" / "train.parquet", info["image_size"])
    row = {i: k for k, i in enumerate(tr["id"])}
    bundle = load_ddpm(run)
    context = bundle.embed_prompts([di["prompt"]])
    cache = out / "cache" / di["cache_key"]
    cache.mkdir(parents=True, exist_ok=True)

    def inverted(ids: list, with_h: bool) -> dict[str, torch.Tensor]:
        import hashlib

        path = lambda i: cache / (hashlib.sha1(str(i).encode()).hexdigest() + ".safetensors")  # noqa: E731
        todo = [i for i in dict.fromkeys(ids) if not path(i).exists()
                or (with_h and "h" not in load_file(str(path(i))))]
        for lo in range(0, len(todo), 64):
            chunk = todo[lo : lo + 64]
            z0 = bundle.encode(to_model_input(tr["x"][[row[i] for i in chunk]]))
            z_T = ddim_invert(bundle, z0, di["num_steps"], context)
            hs = record_h(bundle, z_T, di["num_steps"], context, di["t_edit"]) if with_h else None
            for k, i in enumerate(chunk):
                tensors = {"z_T": z_T[k].contiguous()}
                if hs is not None:
                    tensors["h"] = hs[:, k].contiguous()
                with atomic_path(path(i)) as tmp:
                    save_file(tensors, str(tmp))
        return {i: load_file(str(path(i))) for i in dict.fromkeys(ids)}

    styles, contents = inverted(style_ids, False), inverted(content_ids, True)
    z_T = torch.stack([styles[i]["z_T"] for i in style_ids])
    h_c = torch.stack([contents[i]["h"] for i in content_ids], dim=1)
    z0 = inject_generate(bundle, z_T, h_c, di["num_steps"], context, di["t_edit"], di["t_boost"], di["gamma"],
                         di["eta"], seeds)
    pixels = _to_uint8(bundle.decode(z0))
    labels = tr["y"][[row[i] for i in content_ids]]
    path = out / "parts" / f"part-{part:05d}.parquet"
    atomic_write_table(path, pa.table({
        "row": np.arange(len(seeds), dtype=np.int64) + part * di["pairs_per_task"], "label": labels,
        "style_id": list(map(str, style_ids)), "content_id": list(map(str, content_ids)),
        "seed": np.asarray(seeds, np.int64), "pixels": [np.ascontiguousarray(p).tobytes() for p in pixels]}))
    return str(path)


def plan_pairs(ids: np.ndarray, mined: set, n: int, seed: int) -> tuple[list, list]:
    """``n`` (style, content) pairs: contents cycle through the mined (bias-conflicting) rows, styles are
    distinct randomly chosen non-mined (presumed bias-aligned) rows (with replacement only when too few)."""
    rng = np.random.default_rng(seed)
    aligned = np.array([i for i in ids if i not in mined], dtype=object)
    contents = sorted(mined)
    if not len(aligned) or not contents:
        raise ValueError("DiffInject needs mined (conflicting) and remaining (aligned) training rows")
    styles = rng.choice(aligned, size=n, replace=n > len(aligned))
    return list(styles), [contents[k % len(contents)] for k in rng.permutation(n)]


def run_inject(ctx):
    """Pairs → one Ray task per ``pairs_per_task`` → ``synthetic.parquet``. Resumable: finished parts are kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raydebias._internal.io import atomic_write_json, atomic_write_table, sha256_json
    from raydebias.data.splits import load_split
    from raydebias.core import StageResult

    cfg, info, di = ctx.cfg, ctx.data_info, ctx.cfg.diffinject
    out = ctx.stage_dir("inject")
    tr = load_split(ctx.run_dir / "stages" / "data" / "train.parquet", info["image_size"])
    mined = set(pq.read_table(ctx.run_dir / "stages" / "mine" / "mined.parquet").column("id").to_pylist())
    n = int(round(di.bias_conflict_ratio * (len(tr["id"]) - len(mined))))
    styles, contents = plan_pairs(tr["id"], mined, n, cfg.seed)
    seeds = [cfg.seed * 1_000_003 + i for i in range(n)]
    # the inversion cache depends only on the ddpm weights (their hashes in the manifest) and the inversion steps
    ddpm_hash = sha256_json(json.loads((ctx.run_dir / "manifest.json").read_text())["stages"]["ddpm"]["outputs"])
    task_cfg = {**di.model_dump(include={"prompt", "num_steps", "t_edit", "t_boost", "gamma", "eta",
                                         "pairs_per_task"}),
                "cache_key": sha256_json([ddpm_hash, di.num_steps, di.t_edit, di.prompt])[:16]}
    plan_key = sha256_json([ctx.node_key, task_cfg])
    parts_dir = out / "parts"
    if (out / "plan.json").exists() and json.loads((out / "plan.json").read_text()).get("key") != plan_key:
        import shutil

        shutil.rmtree(parts_dir, ignore_errors=True)  # a different plan: old parts are not rows of this one
    atomic_write_json(out / "plan.json", {"key": plan_key, "pairs": n})
    ctx.ensure_ray()
    task = ray.remote(num_cpus=di.cpus_per_task, num_gpus=cfg.ray.num_gpus_per_worker or 0,
                      max_retries=2, retry_exceptions=True)(inject_task)
    k = di.pairs_per_task
    refs, reused = [], 0
    for p, lo in enumerate(range(0, n, k)):
        if (parts_dir / f"part-{p:05d}.parquet").exists():
            reused += 1
            continue
        refs.append(task.remote(str(ctx.run_dir), task_cfg, p, styles[lo : lo + k], contents[lo : lo + k],
                                seeds[lo : lo + k], max(1, int(di.cpus_per_task))))
    ctx.log(f"[inject] {n} pairs ({len(mined)} mined contents, γ={di.gamma}, t_edit={di.t_edit}, {di.num_steps} "
            f"DDIM steps): {len(refs)} Ray task(s), {reused} finished part(s) reused")
    ray.get(refs)
    parts = sorted(parts_dir.glob("part-*.parquet"))
    tbl = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    if tbl is None or tbl.num_rows != n or len(set(tbl.column("row").to_pylist())) != n:
        raise RuntimeError(f"inject: expected {n} unique rows, found {0 if tbl is None else tbl.num_rows}")
    atomic_write_table(out / "synthetic.parquet", tbl.sort_by("row"))
    labels = tbl.column("label").to_numpy()
    stats = {"synthetic": n, "per_class": np.bincount(labels, minlength=info["num_classes"]).tolist(),
             "parts_reused": reused}
    atomic_write_json(out / "stats.json", stats)
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "stats.json")], stats)


def run_train_diffinject(ctx):
    """Retrain on D_orig ∪ D_syn (synthetic labels = the content image's label); val selects the epoch."""
    import pyarrow.parquet as pq

    from raydebias.debias.train import fit_augmented

    return fit_augmented(ctx, "diffinject", pq.read_table(ctx.run_dir / "stages" / "inject" / "synthetic.parquet"))
