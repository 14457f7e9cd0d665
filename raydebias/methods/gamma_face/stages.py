"""GAMMA-FACE (docs/methods/gamma_face.md): a GMM over intermediate latents of the edited diffusion model
(``editing_base``),
equal sampling per component, pseudo-labels from another method's classifier, augmented retraining
(``gmm.py`` beside this module holds the latent, GMM and sampling functions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raydebias._internal.io import (
    as_path,
    atomic_path,
    atomic_write_json,
    atomic_write_table,
    remove_path,
    replace_path,
)
from raydebias.config import RunConfig
from raydebias.core import StageResult
from raydebias.core.seeds import sample_seeds
from raydebias.data.stream import PartRows, PartSet, parquet_parts, read_columns, take_rows
from raydebias.data.transforms import resize_uint8
from raydebias.debias.train import fit_augmented
from raydebias.diffusion.base import load_stage_model
from raydebias.evaluate.report import image_rows, kv_table, png
from raydebias.methods.gamma_face.gmm import (
    bic_plot,
    collect_latents,
    continue_reverse,
    fit_gmm_bic,
    forward_latents,
    latent_shape,
    sample_components,
)
from raydebias.methods.shared import editing_base
from raydebias.models.classifier import load_classifier, predict


def gmm_task(run_dir: str, cfg_json: str, n_generate: int, threads: int, chunk: int = 1024) -> dict:
    """Ray task: latents (forward-noised real images or the model's reverse trajectories, unconditional)
    → BIC-selected GMM → equal sampling per component, finished and pseudo-labelled by the ``labeler`` classifier
    ``chunk`` images at a time (a multiple of the sampler's batch of 128: the same images as one pass), each chunk
    written as a part of ``stages/gmm/generated.parquet``. Writes ``stages/gmm/{latent_gmm.npz, bic.json}`` and
    returns the per-row components, labels and confidences."""
    # here, not at the top: the module is imported wherever a config is validated (its block), and
    # gmm pulls in the diffusion stack (diffusers models, transformers, sklearn): ~5 s per process

    import json

    torch.set_num_threads(threads)
    cfg = RunConfig.model_validate_json(cfg_json)
    g, out = cfg.gamma_face, as_path(run_dir) / "stages" / "gmm"
    bundle = load_stage_model(as_path(run_dir), editing_base(cfg))
    if g.latents == "forward":  # real training images noised to the split level (paper §4.3)

        info = json.loads((as_path(run_dir) / "stages" / "data" / "info.json").read_text())
        train = PartRows(PartSet.open(parquet_parts(as_path(run_dir) / "stages" / "data" / "train.parquet")),
                         info["image_size"])
        x = train[np.random.default_rng(cfg.seed).permutation(len(train))[: g.num_latents]]  # only these are read
        z = forward_latents(bundle, x, g.num_steps, g.t_frac, cfg.seed)
    else:  # the model's own reverse trajectories from noise, stopped at the split
        seeds = sample_seeds(cfg.seed, g.num_latents, offset=500_000)
        z = collect_latents(bundle, seeds, g.num_steps, g.t_frac)
    z = z.flatten(1).float().cpu().numpy()
    gmm, bics = fit_gmm_bic(z, k_max=g.k_max, seed=cfg.seed)
    k = int(gmm.n_components)
    per_component = -(-n_generate // k)
    zs, comp = sample_components(gmm, per_component, cfg.seed)
    zs, comp = zs[:n_generate], comp[:n_generate]
    with atomic_path(out / "latent_gmm.npz") as tmp, open(tmp, "wb") as f:  # our own format: plain arrays
        np.savez(f, weights=gmm.weights_, means=gmm.means_, covariances=gmm.covariances_)
    atomic_write_json(out / "bic.json", {"k": list(range(1, len(bics) + 1)), "bic": bics, "chosen": k,
                                         "latents": g.latents,
                                         "latent_dim": int(z.shape[1]), "num_latents": int(z.shape[0])})
    import pyarrow as pa

    size = json.loads((as_path(run_dir) / "stages" / "data" / "info.json").read_text())["image_size"]
    labeler, _ = load_classifier(as_path(run_dir) / "stages" / "train" / g.labeler)
    tmp = out / ".generated.parquet.tmp"
    remove_path(tmp)
    labels, confidence = [], []
    for i, lo in enumerate(range(0, len(zs), chunk)):
        z = torch.from_numpy(zs[lo:lo + chunk]).reshape(-1, *latent_shape(bundle))
        images = resize_uint8(continue_reverse(bundle, z, g.num_steps, g.t_frac), size)
        probs = predict(labeler, images)
        label, conf = probs.argmax(1).astype(np.int64), probs.max(1).astype(np.float32)
        atomic_write_table(tmp / f"part-{i:06d}.parquet", pa.table({
            "row": np.arange(lo, lo + len(label), dtype=np.int64), "component": comp[lo:lo + chunk],
            "label": label, "confidence": conf, "kept": conf >= g.min_confidence,
            "pixels": [np.ascontiguousarray(p).tobytes() for p in images]}))
        labels.append(label)
        confidence.append(conf)
    replace_path(tmp, out / "generated.parquet")
    cat = lambda v, t: np.concatenate(v) if v else np.zeros(0, t)  # noqa: E731
    return {"component": comp, "label": cat(labels, np.int64), "confidence": cat(confidence, np.float32), "k": k}


def run_gmm(ctx):
    """GAMMA-FACE generation (a Ray task) + pseudo-labels from the ``labeler`` classifier → ``generated.parquet``."""
    import ray

    cfg, info, g = ctx.cfg, ctx.data_info, ctx.cfg.gamma_face
    out = ctx.stage_dir("gmm")
    n_generate = max(1, int(round(g.mix_ratio * info["counts"]["train"])))
    ctx.log(f"[gmm] {g.num_latents} {g.latents} latents at {g.t_frac:.2f} of {g.num_steps} DDIM steps → GMM "
            f"(K ≤ {g.k_max} by BIC) → {n_generate} images, equal per component")
    ctx.ensure_ray()
    task = ray.remote(num_cpus=g.num_cpus, num_gpus=cfg.ray.num_gpus_per_worker or 0, max_retries=1,
                      retry_exceptions=True)(gmm_task)
    res = ray.get(task.remote(str(ctx.run_dir), cfg.model_dump_json(), n_generate, max(1, int(g.num_cpus))))
    label, conf = res["label"], res["confidence"]  # per row; the images were written by the task
    keep = conf >= g.min_confidence
    C = info["num_classes"]
    stats = {"k": res["k"], "generated": int(len(label)), "kept": int(keep.sum()), "labeler": g.labeler,
             "label_histogram_per_component": [np.bincount(label[res["component"] == c], minlength=C).tolist()
                                               for c in range(res["k"])]}
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[gmm] K = {res['k']}; kept {stats['kept']}/{stats['generated']} pseudo-labelled images")
    return StageResult([ctx.rel(out / p) for p in ("generated.parquet", "bic.json", "latent_gmm.npz", "stats.json")],
                       {k: v for k, v in stats.items() if k != "label_histogram_per_component"})


def run_train_gamma_face(ctx):
    """Retrain on real ∪ generated (the kept pseudo-labelled images); val selects the epoch."""
    return fit_augmented(ctx, "gamma_face", ctx.run_dir / "stages" / "gmm" / "generated.parquet", where="kept")


def report_sections(run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
    """The BIC curve, the chosen K and images per component."""


    parts, st, gen = [], run_dir / "stages", report.get("generation", {})
    if (st / "gmm" / "bic.json").exists() and "gmm" in gen:
        bic = json.loads((st / "gmm" / "bic.json").read_text())
        path = st / "gmm" / "generated.parquet"
        comp_all = read_columns(path, ["component"]).column("component").to_numpy()
        t, x = take_rows(path, np.concatenate([np.flatnonzero(comp_all == k)[:10] for k in range(bic["chosen"])]
                                              + [np.zeros(0, np.int64)]), info["image_size"])
        comp = t.column("component").to_numpy()
        grid = image_rows([(f"component {k}", x[comp == k][:10]) for k in range(bic["chosen"])],
                          "GAMMA-FACE: images generated equally from each GMM component")
        parts.append(f"<h3>GAMMA-FACE</h3><p>K = {bic['chosen']} by BIC over {len(bic['bic'])} fits on "
                     f"{bic['num_latents']} latents of dimension {bic['latent_dim']}.</p>" + kv_table(
                         {k: v for k, v in gen["gmm"].items() if k != "label_histogram_per_component"})
                     + f"<img src='{png(bic_plot(bic['k'], bic['bic'], bic['chosen']))}'><img src='{grid}'>")
    return parts
