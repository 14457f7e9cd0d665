"""Diffusing DeBias (docs/methods/diffusing_debias.md): the bias amplifier and Recipe I.

``amplifier`` stage: sample ``images_per_class`` images per class from the class-conditional model (``class_diffusion``),
train a classifier on those synthetic images *only* (it never sees a real training image, so it cannot memorise
the real bias-conflicting ones), and mark every real training sample as amplifier-correct or not. Errors of a
bias-amplified model are the bias-conflicting samples; ``stats.json`` says how well they match when the train
split has bias labels (precision/recall of the error set against the true conflicting set).

``train/diffusing_debias``: Recipe I — pseudo-groups (y, amplifier correct) on the real training split →
GroupDRO. ``train/diffusing_debias_lff``: Recipe II — the frozen amplifier replaces LfF's biased model. No bias
labels are used on the training split; val (with bias labels) selects the epoch.

Docs: docs/methods/diffusing_debias.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydebias._internal.io import atomic_write_json, atomic_write_table, remove_path, replace_path
from raydebias.core import StageResult
from raydebias.core.seeds import sample_seeds
from raydebias.data.stream import PartSet, parquet_parts
from raydebias.data.transforms import resize_uint8
from raydebias.debias.train import fit_classifier, score_train_split
from raydebias.diffusion.class_conditional import load_class_diffusion
from raydebias.evaluate.metrics import conflicting_mask, error_set_quality
from raydebias.evaluate.report import fmt, group_samples, sample_grid
from raydebias.generate.plan import describe
from raydebias.models.sampling import sample


def _sample_task(run_dir: str, labels: list[int], prompts: list[str], seeds: list[int], num_steps: int,
                 guidance: float, threads: int, image_size: int, dst: str) -> int:
    """Ray task: the class-conditional model's images for ``prompts``, written with their labels to ``dst``."""
    import torch

    torch.set_num_threads(threads)
    x = resize_uint8(sample(load_class_diffusion(run_dir), prompts, num_steps=num_steps, guidance_scale=guidance, seeds=seeds),
                     image_size)
    atomic_write_table(dst, pa.table({"label": np.asarray(labels, np.int64), "seed": np.asarray(seeds, np.int64),
                                      "prompt": prompts, "pixels": [np.ascontiguousarray(im).tobytes() for im in x]}))
    return len(x)


def run_amplifier(ctx):
    import ray

    cfg, info = ctx.cfg, ctx.data_info
    d = cfg.ddb
    out = ctx.stage_dir("amplifier")
    C = info["num_classes"]
    y_syn = np.repeat(np.arange(C), d.images_per_class)
    prompts = [describe(cfg.class_diffusion.prompt_template, info["class_names"][c], None) for c in y_syn]
    seeds = sample_seeds(cfg.seed, len(y_syn))
    ctx.ensure_ray()
    # Two Ray tasks over halves of the prompts (one per CPU by default); each loads the model once and writes its
    # part of synthetic.parquet
    n_tasks = max(1, int(d.num_cpus))
    task = ray.remote(num_cpus=1, num_gpus=cfg.ray.num_gpus_per_worker or 0, max_retries=2)(_sample_task)
    parts = [p for p in np.array_split(np.arange(len(y_syn)), n_tasks) if len(p)]
    tmp = out / ".synthetic.parquet.tmp"
    remove_path(tmp)
    ray.get([task.remote(str(ctx.run_dir), y_syn[p].tolist(), [prompts[i] for i in p], [seeds[i] for i in p],
                         d.num_steps, d.guidance_scale, 1, info["image_size"], str(tmp / f"part-{k:06d}.parquet"))
             for k, p in enumerate(parts)])
    replace_path(tmp, out / "synthetic.parquet")
    ctx.log(f"[amplifier] sampled {len(y_syn)} bias-amplified images ({d.images_per_class} per class)")

    phases = [{"name": "amplifier", "data": "synthetic", "recipe": "erm", "epochs": d.amplifier_epochs,
               "sampler": "uniform"}]  # no val selection: the amplifier should stay biased; the last epoch is kept
    fit_classifier(ctx, "amplifier", phases, extra_data={"synthetic": out / "synthetic.parquet"},
                   out_name="amplifier/model")

    tr, probs, loss = score_train_split(ctx, out / "model")
    correct = probs.argmax(1) == tr["y"]
    groups = pa.table({"id": tr["id"].tolist(), "label": tr["y"], "amplifier_correct": correct,
                       "amplifier_loss": loss.astype(np.float32)})
    atomic_write_table(out / "pseudo_groups.parquet", groups)
    stats: dict[str, Any] = {"synthetic": int(len(y_syn)), "train_rows": int(len(correct)),
                             "amplifier_train_accuracy": float(correct.mean()),
                             "pseudo_group_sizes": {f"{c},{k}": int(((tr['y'] == c) & (correct == bool(k))).sum())
                                                    for c in range(C) for k in (0, 1)}}
    if info["num_bias"] is not None and (tr["a"] >= 0).all():
        stats["error_set_vs_conflicting"] = error_set_quality(
            correct, conflicting_mask(tr["y"], tr["a"], info["group_counts"]["train"]))
    atomic_write_json(out / "stats.json", stats)
    ctx.log(f"[amplifier] {stats.get('error_set_vs_conflicting', {})}; train accuracy "
            f"{stats['amplifier_train_accuracy']:.3f}")
    return StageResult([ctx.rel(out / "synthetic.parquet"), ctx.rel(out / "model"),
                        ctx.rel(out / "pseudo_groups.parquet"), ctx.rel(out / "stats.json")],
                       {k: v for k, v in stats.items() if k != "pseudo_group_sizes"})


def _train_with_pseudo(ctx) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The train split's parts, its labels and each row's amplifier verdict (correct) and loss, in row order."""
    files = parquet_parts(ctx.run_dir / "stages" / "data" / "train.parquet")
    ids = [i for f in files for i in pq.read_table(str(f), columns=["id"]).column("id").to_pylist()]
    pg = pq.read_table(str(ctx.run_dir / "stages" / "amplifier" / "pseudo_groups.parquet"))
    rows = {i: k for k, i in enumerate(pg.column("id").to_pylist())}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise RuntimeError(f"train/diffusing_debias: {len(missing)} training rows have no pseudo-group "
                           f"(first: {missing[0]!r}); rerun the amplifier stage")
    order = np.array([rows[i] for i in ids], dtype=np.int64)
    correct = pg.column("amplifier_correct").to_numpy(zero_copy_only=False)[order].astype(np.int64)
    loss = pg.column("amplifier_loss").to_numpy()[order].astype(np.float64)
    return files, PartSet.open(files).y, correct, loss


def run_train_ddb(ctx, method: str = "diffusing_debias"):
    """Recipe I (``diffusing_debias``): GroupDRO over pseudo-groups g = 2·y + amplifier_correct.
    Recipe II (``diffusing_debias_lff``): LfF-style CE reweighting w = L_BA / (L_BA + L_D) with the frozen
    amplifier's per-sample loss L_BA (:class:`~raydebias.debias.lff.FrozenBiasLfF`). Both on the real training
    split without its bias labels; val selects the epoch."""
    cfg, info = ctx.cfg, ctx.data_info
    files, y, correct, loss = _train_with_pseudo(ctx)
    data = {"files": files, "groups": (2 * y + correct).tolist()}  # the workers stream the real split
    if method == "diffusing_debias":
        phase = {"name": "groupdro_pseudo", "recipe": cfg.ddb.recipe, "sampler": "recipe",
                 "num_groups": 2 * info["num_classes"]}
        summary = {"recipe": "I (pseudo-groups → GroupDRO)"}
    elif method == "diffusing_debias_lff":
        phase = {"name": "lff_frozen_amplifier", "recipe": "lff_frozen", "sampler": "recipe",  # binds the labels
                 "num_groups": 2 * info["num_classes"],
                 "recipe_args": {"bias_loss": loss.tolist(), "ema_alpha": cfg.ddb.lff_ema}}
        summary = {"recipe": "II (frozen amplifier → LfF reweighting)"}
    else:
        raise ValueError(f"not a Diffusing DeBias method: {method!r}")
    phases = [{**phase, "data": "train_pseudo", "epochs": cfg.train.epochs, "select": True}]
    return fit_classifier(ctx, method, phases, extra_data={"train_pseudo": data},
                          summary={**summary, "pseudo_conflicting": int((correct == 0).sum())})


def report_sections(run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
    """Bias-amplified samples, and how well the amplifier's errors find the bias-conflicting training rows."""
    import html

    parts = []
    apath = run_dir / "stages" / "amplifier" / "synthetic.parquet"
    if apath.exists():  # Diffusing DeBias: bias-amplified samples and how well the amplifier finds conflicts
        k = min(8, samples_per_group * 8)
        t, sx = group_samples(apath, info, k, bias=None)
        grid = sample_grid(sx, t.column("label").to_numpy(), np.zeros(t.num_rows, np.int64), info, k,
                           title="diffusing_debias: class-conditional samples")
        parts.append(f"<h3>Diffusing DeBias: bias-amplified synthetic samples</h3><img src='{grid}'>")
    det = report.get("bias_detection")
    if det:
        parts.append("<h3>Bias-conflicting sample detection (training split)</h3><p>"
                     + html.escape(det["description"]) + "</p><table><tr><th>detector</th><th>errors</th>"
                     "<th>conflicting</th><th>precision</th><th>recall</th><th>F1</th></tr>"
                     + "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(
                         f"<td>{fmt(v.get(c))}</td>" for c in ("errors", "conflicting", "precision", "recall", "f1"))
                               + "</tr>" for k, v in det.items() if isinstance(v, dict)) + "</table>")
    return parts


def bias_detection(ctx, info: dict[str, Any]) -> dict[str, Any]:
    """Diffusing DeBias's central claim, measured: how well the error set of its bias amplifier (trained on
    synthetic images only) matches the true bias-conflicting training samples, next to the error set of ERM
    trained on the real training split (which memorises the conflicting samples)."""
    stats_path = ctx.run_dir / "stages" / "amplifier" / "stats.json"
    if not stats_path.exists():
        return {}
    amp = json.loads(stats_path.read_text()).get("error_set_vs_conflicting")
    if amp is None:
        return {}
    out = {"description": "precision/recall of the classifier's training-set errors as a detector of the "
                          "bias-conflicting training samples", "diffusing_debias_amplifier": amp}
    erm_dir = ctx.run_dir / "stages" / "train" / "erm"
    if (erm_dir / "model.safetensors").exists():
        tr, probs, _ = score_train_split(ctx, erm_dir)
        correct = probs.argmax(1) == tr["y"]
        out["erm_on_real"] = error_set_quality(correct, conflicting_mask(tr["y"], tr["a"], info["group_counts"]["train"]))
    return {"bias_detection": out}
