"""``diffusion`` stage: the base text-to-image model. Pretrained → a pointer to the diffusers folder/id (loaded
with ``from_pretrained`` wherever it is used); bootstrap → a tiny UNet + CLIP text encoder trained on the train
split's captions through Ray Train (one worker), saved in the same diffusers layout so both sources load through
one code path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydebias._internal.io import (
    as_path,
    atomic_path,
    atomic_write_json,
    local_copy,
    local_weights_fingerprint,
    remove_path,
    save_weights,
)
from raydebias._internal.ray_utils import fit_torch, get_checkpoint, keyed_train_run, report
from raydebias.config import RunConfig
from raydebias.core import StageResult
from raydebias.data.stream import PartRows, PartSet, buffer_rows, parquet_parts
from raydebias.data.transforms import resize_uint8
from raydebias.debias.groupdro import group_mixture_probs
from raydebias.generate.plan import describe
from raydebias.models.clip import captions_for, clip_tokenizer
from raydebias.models.diffusion import bootstrap_diffusion, load_diffusion
from raydebias.models.diffusion_training import train_bootstrap_diffusion

if TYPE_CHECKING:
    from raydebias.data.stream import PartSet


def diffusion_weights(cfg: RunConfig) -> Any:
    """What the ``diffusion`` / ``class_diffusion`` cache keys read besides config: the pretrained weights' fingerprint."""
    return local_weights_fingerprint(cfg.models.diffusion.pretrained)


def load_stage_model(run_dir: Path, stage: str):
    """The diffusion bundle a stage's ``model.json`` names (``diffusion``: the base model; ``class_diffusion``: the
    class-conditional model of the biased split)."""
    spec = json.loads((as_path(run_dir) / "stages" / stage / "model.json").read_text())
    return load_diffusion(model_path(run_dir, spec), spec.get("dtype", "float32"), spec.get("revision"))


def load_base(run_dir: Path):
    """The run's base diffusion bundle (``models.diffusion.pretrained`` or the trained bootstrap model)."""
    return load_stage_model(run_dir, "diffusion")


def model_path(run_dir: Path, spec: dict) -> str:
    """A ``model.json``'s model: ``run_relative`` paths live in the run dir (a copied run dir loads its own
    model; from a remote run dir, a local copy of it), anything else is the user's folder or hub id."""
    return local_copy(as_path(run_dir) / spec["path"]) if spec.get("run_relative") else spec["path"]


def balanced_dropout_scale(groups: np.ndarray, draw_probs: np.ndarray | None = None) -> dict[int, float]:
    """Per group g: u_g / m_g, with u uniform over the present groups and m the probability that a training draw
    lands in g (``draw_probs`` per row, default uniform over rows). Word-dropout probabilities scaled by it drop a
    word as often on average (Σ m_g·u_g/m_g = 1), but the captions that lost a word are drawn uniformly over the
    groups, so the remaining word is not taught the other factor's majority value (BENCHMARKS.md, round 7)."""
    groups = np.asarray(groups)
    m = np.full(len(groups), 1.0 / len(groups)) if draw_probs is None else np.asarray(draw_probs, float)
    m = m / m.sum()
    present = np.unique(groups)
    return {int(g): float((1.0 / len(present)) / m[groups == g].sum()) for g in present}


def word_dropout(template: str, class_names: list[str], bias_names: list[str] | None, p_word: float,
                 p_all: float, p_bias: float | None = None, group_scale: dict[int, float] | None = None):
    """Per-factor caption dropout: drop the class word (``p_word``) or the bias word (``p_bias``, default
    ``p_word``) or everything (``p_all``), so that class and bias are learned as separate, recombinable words
    (docs/methods/bootstrap.md). In a biased set the bias word alone predicts the class; dropping it more often
    makes the class word carry the class's appearance. ``group_scale`` (group y·B + a → factor, from
    :func:`balanced_dropout_scale`) scales both word probabilities per group, capped at 1."""
    p_bias = p_word if p_bias is None else p_bias

    B = len(bias_names) if bias_names else 1

    def fn(caption: str, rng: np.random.Generator, y: int, a: int | None) -> str:
        if rng.random() < p_all:
            return ""
        r = group_scale.get(int(y) * B + int(a), 1.0) if group_scale is not None and a is not None else 1.0
        drop_class, drop_bias = rng.random() < min(1.0, p_word * r), rng.random() < min(1.0, p_bias * r)
        cls = "" if drop_class else class_names[y]
        bias = None if (drop_bias or a is None or bias_names is None) else bias_names[a]
        return describe(template, cls, bias) if (cls or bias) else ""

    return fn


def guard_set(run_dir: Path, info: dict, template: str, use_bias: bool, n: int, seed: int,
              train: PartSet) -> dict:
    """Up to ``n`` captioned images for the conditioning guard: the val split (held out, as every selection in
    this engine) when the captions name class and bias; the train split when they name the class only (the
    ``class_diffusion`` model of a biased split: its class word rightly implies the aligned bias, which a group-balanced val
    contradicts — measured: the gap on val fell to −0.033 while the samples carried the class 0.69 of the time) or
    when val is empty or lacks bias labels. Only the picked rows' images are read."""
    data = as_path(run_dir) / "stages" / "data"
    split, rows = "train", train
    if (data / "val.parquet").exists():
        va = PartSet.open(parquet_parts(data / "val.parquet"))
        if len(va.y) and use_bias and bool((va.a >= 0).all()):
            split, rows = "val", va
    pick = np.sort(np.random.default_rng(seed).permutation(len(rows.y))[:n])
    caps = captions_for(rows.y[pick], rows.a[pick] if use_bias else None, info["class_names"],
                        info["bias_names"], template)
    return {"x": PartRows(rows, info["image_size"]).take(pick), "captions": caps, "split": split}


def train_task(run_dir: str, cfg_json: str, threads: int, out_stage: str, template: str, steps: int,
               batch_size: int, lr: float, use_bias: bool = True, resume: dict | None = None,
               on_checkpoint=None) -> dict:
    """Train a bootstrap text-to-image model on the train split's captions and save it (diffusers layout) to
    ``stages/<out_stage>/model``. ``use_bias=False`` (or a train split without bias labels) captions the class
    only: a class-conditional model (Diffusing DeBias)."""
    import torch

    torch.set_num_threads(threads)
    cfg = RunConfig.model_validate_json(cfg_json)
    info = json.loads((as_path(run_dir) / "stages" / "data" / "info.json").read_text())
    # the train split's labels here; its images are read by the trainer a block of steps at a time
    tr = PartSet.open(parquet_parts(as_path(run_dir) / "stages" / "data" / "train.parquet"))
    has_bias = use_bias and info["num_bias"] is not None and bool((tr.a >= 0).all())
    caps = captions_for(tr.y, tr.a if has_bias else None, info["class_names"], info["bias_names"], template)
    # the caption dropout callable sees one caption at a time: look its factors up by caption text
    factors = {c: (int(y), int(a) if has_bias else None) for c, y, a in zip(caps, tr.y, tr.a)}
    weights = None
    groups = tr.y * info["num_bias"] + tr.a if has_bias else None
    if has_bias and (cfg.diffusion.group_balance > 0 or cfg.diffusion.group_mix > 0):
        # draw the rare (class, bias) pairs more often: with group_mix 0.5 about a third of each 99 %-aligned batch
        # is bias-conflicting, so the class word, not the bias word, has to explain the shape there
        weights = group_mixture_probs(groups, cfg.diffusion.group_mix, cfg.diffusion.group_balance)
    scale = balanced_dropout_scale(groups, weights) if has_bias and cfg.diffusion.balanced_word_dropout else None
    drop = word_dropout(template, info["class_names"], info["bias_names"] if has_bias else None,
                        cfg.diffusion.word_dropout, cfg.diffusion.caption_dropout, cfg.diffusion.bias_word_dropout,
                        group_scale=scale)
    coind = None
    if cfg.diffusion.coind_weight > 0 and has_bias:
        # CoInD's marginals: the class word alone, the bias word alone (the captions word dropout also makes)
        coind = [(describe(template, info["class_names"][y], None), describe(template, "", info["bias_names"][a]))
                 for y, a in zip(tr.y, tr.a)]
    guard = guard_set(as_path(run_dir), info, template, has_bias, cfg.diffusion.guard_images, cfg.seed, tr) \
        if cfg.diffusion.guard_every else {}
    bundle = bootstrap_diffusion(cfg.models.diffusion, tokenizer=clip_tokenizer())
    # the model's resolution (models.diffusion.resolution); generated images go back to the dataset's image_size
    res = lambda x: resize_uint8(x, bundle.resolution) if x is not None else None  # noqa: E731
    torch.manual_seed(cfg.seed)
    stats = train_bootstrap_diffusion(
        bundle, PartRows(tr, info["image_size"], bundle.resolution), caps, steps=steps, batch_size=batch_size, lr=lr,
        drop_probs={"all": 0.0},  # ``word_dropout`` applies diffusion.caption_dropout: the only empty-caption rate
        caption_dropout_fn=lambda c, rng: drop(c, rng, *factors[c]), seed=cfg.seed, shift=cfg.diffusion.shift,
        log_every=100,
        min_snr_gamma=cfg.diffusion.min_snr_gamma, ema_decay=cfg.diffusion.ema_decay,
        freeze_token_embedding=cfg.diffusion.freeze_token_embedding, p2_gamma=cfg.diffusion.p2_gamma,
        p2_k=cfg.diffusion.p2_k, sample_weights=weights, checkpoint_every=cfg.diffusion.checkpoint_every,
        lr_schedule=cfg.diffusion.lr_schedule,
        on_checkpoint=on_checkpoint, resume=resume, guard_every=cfg.diffusion.guard_every,
        guard_ratio=cfg.diffusion.guard_ratio, guard_min_gap=cfg.diffusion.guard_min_gap, guard_pixels=res(guard.get("x")),
        guard_captions=guard.get("captions"), coind_weight=cfg.diffusion.coind_weight if coind else 0.0,
        coind_captions=coind, coind_fraction=cfg.diffusion.coind_fraction,
        block_rows=buffer_rows(cfg.train.shuffle_buffer_mb, bundle.resolution),
    )
    if guard:
        stats["guard"]["images"] = f"{len(guard['x'])} {guard['split']}"
    if cfg.diffusion.coind_weight > 0 and not coind:
        stats["coind"] = "skipped: the captions carry no bias word"
    out = as_path(run_dir) / "stages" / out_stage / "model"
    with atomic_path(out) as tmp:
        bundle.save(tmp)
    return {**stats, "captions": "class + bias" if has_bias else "class only"}


_WEIGHT_PARTS = ("unet", "text_encoder", "best_unet", "best_text_encoder")  # the conditioning guard's best weights


def save_train_state(d: Path, state: dict) -> None:
    """A resumable training state: weights as safetensors, the rest (optimizer, generators) as tensors and plain
    values that ``torch.load(weights_only=True)`` reads back."""
    import torch

    parts = [p for p in _WEIGHT_PARTS if state.get(p) is not None]
    for part in parts:
        save_weights(d / f"{part}.safetensors", state[part])
    torch.save({k: v for k, v in state.items() if k not in parts}, d / "state.pt")


def load_train_state(d: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    state = torch.load(d / "state.pt", weights_only=True)
    return {**state, **{part: load_file(str(d / f"{part}.safetensors")) for part in _WEIGHT_PARTS
                        if (d / f"{part}.safetensors").exists()}}


def _train_loop(config: dict) -> None:
    """Ray Train loop: :func:`train_task`, reporting a resumable checkpoint every ``diffusion.checkpoint_every``
    steps (a restarted worker continues from the last one), then the stats (``stats.json``) as the final one."""
    import tempfile

    resume = None
    ckpt = get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            if (Path(d) / "state.pt").exists():
                resume = load_train_state(Path(d))

    def on_checkpoint(step: int, state: dict) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="diffusion-ckpt-"))
        save_train_state(tmp, state)
        report({"step": step}, tmp)

    stats = train_task(**config, resume=resume, on_checkpoint=on_checkpoint)
    tmp = Path(tempfile.mkdtemp(prefix="diffusion-stats-"))
    atomic_write_json(tmp / "stats.json", stats)
    report({"loss_last": stats["loss_last"]}, tmp)


def run_train_task(ctx, stage: str, template: str, steps: int, batch_size: int, lr: float, num_cpus: float,
                   use_bias: bool = True, num_workers: int = 1) -> dict:
    """Train the bootstrap model through Ray Train (:func:`~raydebias._internal.ray_utils.fit_torch`: one
    ``TorchTrainer`` worker of ``num_cpus`` CPUs, on a GPU when ``ray.num_gpus_per_worker``, or local mode in one
    Ray task with ``num_workers=0``; one restart on failure, resumed from the last checkpoint) and return its stats.
    The loop writes the model to the run directory (shared storage on a cluster, as for every stage)."""

    ctx.ensure_ray()
    gpus = ctx.cfg.ray.num_gpus_per_worker
    resources = {"CPU": num_cpus, **({"GPU": gpus} if gpus else {})}
    storage = ctx.run_dir / "stages" / stage / "_ray"
    name = keyed_train_run(storage, stage, getattr(ctx, "node_key", None))
    config = {"run_dir": str(ctx.run_dir), "cfg_json": ctx.cfg.model_dump_json(), "threads": max(1, int(num_cpus)),
              "out_stage": stage, "template": template, "steps": steps, "batch_size": batch_size, "lr": lr,
              "use_bias": use_bias}
    ckpt = fit_torch(_train_loop, config, num_workers=num_workers, resources=resources, storage=storage,
                     name=name, max_failures=1)
    if ckpt is None:
        raise RuntimeError(f"{stage}: no checkpoint was reported")
    with ckpt.as_directory() as d:
        stats = json.loads((Path(d) / "stats.json").read_text())
    remove_path(storage)
    return stats


def run_diffusion(ctx):
    cfg = ctx.cfg
    out = ctx.stage_dir("diffusion")
    if cfg.models.source == "pretrained":
        if not cfg.models.diffusion.pretrained:
            raise ValueError("models.source=pretrained needs models.diffusion.pretrained (a diffusers folder or id)")
        atomic_write_json(out / "model.json", {"path": cfg.models.diffusion.pretrained,
                                               "dtype": cfg.models.diffusion.dtype,
                                               "revision": cfg.models.diffusion.revision})
        return StageResult([ctx.rel(out / "model.json")], {"source": "pretrained"})
    d = cfg.diffusion
    ctx.log(f"[diffusion] training the bootstrap text-to-image model: {d.steps} steps, batch {d.batch_size}")
    stats = run_train_task(ctx, "diffusion", cfg.data.prompt_template, d.steps, d.batch_size, d.lr, d.num_cpus,
                           num_workers=d.num_workers)
    atomic_write_json(out / "model.json", {"path": ctx.rel(out / "model"), "run_relative": True, "dtype": "float32"})
    ctx.log(f"[diffusion] done: {stats}")
    return StageResult([ctx.rel(out / "model.json"), ctx.rel(out / "model")], stats)
