"""The ``tiw`` stage (docs/methods/tiw.md): TIW-DSM vs plain DSM on images from a biased training split and a small
unbiased reference sample, trained through Ray Train (:mod:`raydebias.methods.tiw.train`), then measured.

Reference set: ``tiw.reference_size`` rows drawn from a group-balanced split (``val``). Measurement (one Ray
task): a *group probe* — the project's classifier trained on the whole reference split to predict the group
g = (y, a) — labels every generated image; the stage reports the fraction of generated samples per group and in
the bias-aligned pairings against the reference proportions (total variation), and an FID computed with
torchmetrics on the probe's penultimate features (the offline stand-in for Inception). Lower is closer to the
unbiased distribution. TIW trains a generative model, not a classifier: its row lives under
``metrics.json["generation"]["tiw"]``.

Docs: docs/methods/tiw.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raydebias._internal.io import as_path, atomic_path, atomic_write_json, atomic_write_text
from raydebias.config import RunConfig
from raydebias.core import StageResult
from raydebias.data.stream import PartRows, PartSet, buffer_rows, parquet_parts
from raydebias.data.transforms import to_model_input
from raydebias.evaluate.fid import fid_kid
from raydebias.evaluate.metrics import conflicting_mask
from raydebias.evaluate.report import fmt, image_rows
from raydebias.methods.tiw.train import fit_tiw, generate, load_eps_model, proportions, total_variation
from raydebias.models.classifier import create_classifier, predict


class ProbeFeatures(nn.Module):
    """torchmetrics FID feature extractor: uint8 NCHW → the probe classifier's penultimate features."""

    def __init__(self, probe: nn.Module, num_features: int):
        super().__init__()
        self.probe, self.num_features = probe, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.probe(to_model_input(x.permute(0, 2, 3, 1)), return_features=True)[1].double()


def train_probe(cfg, x, g: np.ndarray, num_groups: int, epochs: int = 15, seed: int = 0) -> nn.Module:
    """The group probe: the run's classifier architecture trained with CE on (x, g). Measurement only (like an
    Inception net for FID), so it trains inside the measurement task rather than as a Ray Train job."""
    torch.manual_seed(seed)
    model = create_classifier(cfg.models.classifier, num_groups)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(g)), max(1, len(g) // 64)):
            loss = nn.functional.cross_entropy(model(to_model_input(x[b])), torch.as_tensor(g[b]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def measure_task(run_dir: str, cfg_json: str, model_kwargs: dict, threads: int) -> dict:
    """Ray task: train the group probe, sample every objective's model, measure proportions and FID; writes
    ``samples_<objective>.npy`` (64 samples each) and returns the per-objective stats."""

    torch.set_num_threads(threads)
    cfg = RunConfig.model_validate_json(cfg_json)
    t, run = cfg.tiw, as_path(run_dir)
    info = json.loads((run / "stages" / "data" / "info.json").read_text())
    size, B = info["image_size"], info["num_bias"]
    num_groups = info["num_classes"] * B
    ref_set = PartSet.open(parquet_parts(run / "stages" / "data" / f"{t.reference_split}.parquet"))
    ref = {"x": PartRows(ref_set, size, cache_rows=buffer_rows(cfg.train.shuffle_buffer_mb, size)), "y": ref_set.y, "a": ref_set.a}
    g_ref = ref["y"] * B + ref["a"]
    probe = train_probe(cfg, ref["x"], g_ref, num_groups, seed=cfg.seed)
    # per group id g = y·B + a: is (y, a) the train-majority (bias-aligned) pairing?
    aligned = ~conflicting_mask(np.arange(num_groups) // B, np.arange(num_groups) % B, info["group_counts"]["train"])
    feats = ProbeFeatures(probe, int(probe.head.in_features))
    p_ref = proportions(g_ref, num_groups)
    out: dict[str, Any] = {"reference_aligned_fraction": float(p_ref[aligned].sum()), "objectives": {}}
    for obj in t.objectives:
        model = load_eps_model(run / "stages" / "tiw" / "models" / f"{obj}.safetensors", model_kwargs)
        x = generate(model, t.num_samples, seed=cfg.seed, steps=t.sample_steps, image_size=size)
        p = proportions(predict(probe, x).argmax(1), num_groups)
        fk = fid_kid(ref["x"], x, feature=feats)
        out["objectives"][obj] = {"aligned_fraction": float(p[aligned].sum()), "tv_groups": total_variation(p, p_ref),
                                  "fid": fk["fid"], "kid": fk["kid"]}
        with atomic_path(run / "stages" / "tiw" / f"samples_{obj}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, x[:64])
    return out


def run_tiw(ctx):

    import ray

    cfg, info, t = ctx.cfg, ctx.data_info, ctx.cfg.tiw
    if info["num_bias"] is None:
        raise ValueError("tiw measures subgroup proportions: the dataset needs `bias` labels on the reference split")
    out = ctx.stage_dir("tiw")
    size = info["image_size"]
    # the splits' labels here; the Ray Train workers read the images from the parts (a bounded cache of decoded parts)
    data = ctx.run_dir / "stages" / "data"
    tr_set = PartSet.open(parquet_parts(data / "train.parquet"))
    ref_set = PartSet.open(parquet_parts(data / f"{t.reference_split}.parquet"))
    tr = {"x": PartRows(tr_set, size, cache_rows=buffer_rows(cfg.train.shuffle_buffer_mb, size)), "y": tr_set.y, "a": tr_set.a}
    rng = np.random.default_rng(cfg.seed)
    pick = rng.choice(len(ref_set.y), size=min(t.reference_size, len(ref_set.y)), replace=False)
    ref_x = PartRows(ref_set, size, cache_rows=buffer_rows(cfg.train.shuffle_buffer_mb, size)).select(pick)
    ctx.ensure_ray()
    key_file = out / "models.key"  # resume: models trained for this exact node key are reused
    if key_file.exists() and key_file.read_text() == ctx.node_key and (out / "models" / "losses.json").exists():
        summary = json.loads((out / "models" / "losses.json").read_text())
        ctx.log("[tiw] reusing the trained models (same inputs and config)")
    else:
        ctx.log(f"[tiw] D_bias = train ({len(tr['y'])}), D_ref = {len(pick)} {t.reference_split} rows; "
                f"{t.num_workers or 'local mode, no'} DDP workers; objectives {t.objectives}")
        summary = fit_tiw(
            tr["x"], ref_x, out / "models", num_workers=t.num_workers,
            cpus_per_worker=t.cpus_per_worker, use_gpu=cfg.ray.num_gpus_per_worker > 0,
            storage_path=ctx.run_dir / "stages" / "tiw" / "_ray", run_key=ctx.node_key, seed=cfg.seed,
            model={"factor": t.unshuffle, "block_out_channels": list(t.block_out_channels)},
            disc_steps=t.disc_steps, disc_lr=t.disc_lr, steps=t.steps, lr=t.lr, batch_size=t.batch_size,
            objectives=list(t.objectives), checkpoint_every=t.checkpoint_every)
        atomic_write_text(key_file, ctx.node_key)
    cpus = t.cpus_per_worker * max(1, t.num_workers)
    task = ray.remote(num_cpus=cpus, max_retries=1, retry_exceptions=True)(measure_task)
    measured = ray.get(task.remote(str(ctx.run_dir), cfg.model_dump_json(), summary["model"], max(1, int(cpus))))
    aligned_train = float((~conflicting_mask(tr["y"], tr["a"], info["group_counts"]["train"])).mean())
    stats: dict[str, Any] = {
        "reference": {"split": t.reference_split, "size": int(len(pick)),
                      "aligned_fraction": measured["reference_aligned_fraction"]},
        "train_aligned_fraction": aligned_train,
        "probe": "classifier on the whole reference split predicting g = (y, a); its features give the FID",
        "training": summary, "objectives": measured["objectives"],
    }
    for obj, v in stats["objectives"].items():
        ctx.log(f"[tiw] {obj}: aligned fraction {v['aligned_fraction']:.3f} (reference "
                f"{stats['reference']['aligned_fraction']:.3f}), TV {v['tv_groups']:.3f}, FID {v['fid']:.2f}")
    atomic_write_json(out / "stats.json", stats)
    return StageResult([ctx.rel(out / "models"), ctx.rel(out / "stats.json")]
                       + [ctx.rel(out / f"samples_{o}.npy") for o in t.objectives],
                       {o: v for o, v in stats["objectives"].items()})


def report_sections(run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
    """Group proportions of each objective's samples against the reference, and the samples."""
    import html

    import numpy as np

    parts, st, gen = [], run_dir / "stages", report.get("generation", {})
    if "tiw" in gen:
        tiw = gen["tiw"]
        ref = tiw["reference"]
        rows = "".join(f"<tr><td>{html.escape(o)}</td><td>{fmt(v['aligned_fraction'])}</td><td>{fmt(v['tv_groups'])}"
                       f"</td><td>{fmt(v['fid'])}</td></tr>" for o, v in tiw["objectives"].items())
        samples = [(o, np.load((st / "tiw" / f"samples_{o}.npy").open("rb"))) for o in tiw["objectives"]
                   if (st / "tiw" / f"samples_{o}.npy").exists()]
        parts.append(f"<h3>TIW: generated samples vs the unbiased reference</h3><p>reference: {ref['size']} "
                     f"{html.escape(ref['split'])} rows, aligned fraction {fmt(ref['aligned_fraction'])}; train "
                     f"aligned fraction {fmt(tiw['train_aligned_fraction'])}. Probe: {html.escape(tiw['probe'])}."
                     "</p><table><tr><th>objective</th><th>aligned fraction</th><th>TV to reference groups</th>"
                     f"<th>FID (probe features)</th></tr>{rows}</table>"
                     + (f"<img src='{image_rows(samples, 'TIW: samples per objective')}'>" if samples else ""))
    return parts


def console_lines(metrics: dict) -> list[str]:
    """What ``raydebias run`` prints for TIW under the results table: per objective, the samples' aligned fraction
    against the reference's, their total variation over the groups and FID."""
    tiw = metrics.get("generation", {}).get("tiw")
    if not tiw:
        return []
    lines = [f"TIW samples (reference aligned fraction {tiw['reference']['aligned_fraction']:.3f}):"]
    for obj, v in tiw["objectives"].items():
        lines.append(f"  {obj:<12} aligned fraction {v['aligned_fraction']:.3f}  TV to reference "
                     f"{v['tv_groups']:.3f}  FID {v['fid']:.2f}")
    return lines
