"""The ``evaluate`` stage: every trained method on val and test → ``metrics.json`` (one row per method)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from raydebias._internal.io import atomic_write_json, remove_path, replace_path
from raydebias.core import StageResult
from raydebias.evaluate import metrics as M
from raydebias.evaluate.fidelity import measure_task, synthetic_sets
from raydebias.evaluate.predict import predict_splits
from raydebias.models.classifier import load_classifier


def headline_metric(num_groups: int) -> str:
    """WGA with few groups; unbiased accuracy (AGA on a group-balanced test) with many (docs/metrics.md)."""
    return "wga" if num_groups <= 8 else "aga"


def method_row(y, a, probs, info: dict[str, Any]) -> dict[str, Any]:
    """All metrics of one method on one split, from its softmax probabilities."""
    return metrics_row(y, a, probs.argmax(1), probs[np.arange(len(y)), y], info)


def metrics_row(y, a, pred, p_true, info: dict[str, Any]) -> dict[str, Any]:
    """All metrics of one method on one split, from its predictions and each row's probability of its true class."""
    C, B = info["num_classes"], info["num_bias"]
    if B is None:
        return {"accuracy": float((pred == y).mean()) if len(y) else None}
    known = a >= 0  # group metrics over rows with a known bias; overall accuracy over all rows
    acc = float((pred == y).mean())
    y, a, pred, p_true = y[known], a[known], pred[known], p_true[known]
    if not known.any():
        return {"accuracy": acc}
    train_counts = np.asarray(info["group_counts"]["train"])
    row = M.group_metrics(y, pred, a, C, B, train_group_counts=train_counts)
    row["accuracy"] = acc
    aligned_bias = train_counts.argmax(1)  # the majority bias value of each class in train
    kls = []
    for c in range(C):
        sel = y == c
        prot = (a[sel] == aligned_bias[c]).astype(int)
        if 0 < prot.sum() < len(prot):
            kls.append(M.score_kl(p_true[sel], prot))
    clean = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
    row.update(
        bias=clean(M.multiclass_bias(y, pred, a, C)),
        tpr=clean(M.multiclass_tpr(y, pred, C)),
        ba=clean(M.multiclass_ba(y, pred, a, C, form="zhao", train_group_counts=train_counts)),
        kl=clean(float(np.mean(kls)) if kls else None),
    )
    return row


def run_evaluate(ctx):
    cfg = ctx.cfg
    info = ctx.data_info
    out = ctx.stage_dir("evaluate")
    torch.set_num_threads(max(1, (cfg.ray.num_cpus or 2)))
    num_groups = info["num_classes"] * (info["num_bias"] or 1)
    headline = headline_metric(num_groups) if info["num_bias"] else "accuracy"
    methods = list(cfg.classifier_methods)
    pred_dirs = {m: out / f"predictions_{m}.parquet" for m in methods}
    tmp = {m: out / f".predictions_{m}.parquet.tmp" for m in methods}
    for d in tmp.values():
        remove_path(d)
        d.mkdir()
    preds = predict_splits(ctx, {"val": False, "test": True}, methods, out=tmp)
    rows, outputs = [], []
    for method in methods:
        _, meta = load_classifier(ctx.run_dir / "stages" / "train" / method)
        row: dict[str, Any] = {"method": method, "split": "test"}
        for split, d in preds.items():
            r = metrics_row(d["label"], d["bias"], d[f"pred:{method}"], d[f"p_true:{method}"], info) \
                if len(d.get("label", ())) else {}
            if split == "test":
                row.update(r)
                replace_path(tmp[method], pred_dirs[method])
                outputs.append(ctx.rel(pred_dirs[method]))
            else:
                row["val"] = {k: r.get(k) for k in ("accuracy", "wga", "aga")}
        row["selected_epoch"] = meta["best_epoch"]
        if meta.get("best_phase"):
            row["selected_phase"] = meta["best_phase"]
        rows.append(row)
        ctx.log(f"[evaluate] {method:>10}: test acc {row.get('accuracy')}  wga {row.get('wga')}  aga {row.get('aga')}")
    # BPC of every method against ERM (GAMMA-FACE eq. 13); ERM itself is 0 by definition.
    base = next((r for r in rows if r["method"] == "erm"), None)
    for r in rows:
        if base and r.get("bias") is not None and base.get("bias") and base.get("tpr"):
            r["bpc_vs_erm"] = M.bpc(base["bias"], r["bias"], base["tpr"], r["tpr"])
    report = {
        "run_id": ctx.run_dir.name,
        "headline": headline,
        "headline_description": {
            "wga": "worst-group accuracy on test",
            "aga": "unbiased accuracy: unweighted mean of per-group test accuracies (group-balanced test)",
            "accuracy": "overall test accuracy (no bias labels)",
        }[headline],
        "adjusted_avg_description": "per-group test accuracy weighted by TRAINING group proportions (WILDS convention)",
        "ba_form": "Zhao et al. 2017: positive = predictions amplify the train-set correlation (sign of each "
                   "(class, bias) term from the training counts)",
        "bias_form": "mean over classes (one-vs-rest) of the frequency-weighted mean |TPR_i - TPR_j| over bias values",
        "dataset": {k: info[k] for k in ("num_classes", "num_bias", "class_names", "bias_names", "counts", "quarantined")},
        "rows": rows,
    }
    done = set()
    for m in ctx.methods:  # what a method measures beyond the rows (its declaration's ``evaluate``)
        if m.evaluate is not None and m.evaluate not in done:
            done.add(m.evaluate)
            report.update(m.evaluate(ctx, info))
    # generation fidelity: class / bias probes trained on val score every synthetic set of the run's methods, in a
    # Ray task that streams val, test and the sets from their parts

    fidelity = None
    sets = synthetic_sets(ctx.methods)
    if cfg.evaluate.fidelity and sets:
        import ray

        ctx.ensure_ray()
        threads = max(1, min(int(cfg.ray.num_cpus or 2), int(ray.cluster_resources().get("CPU", 1))))
        task = ray.remote(num_cpus=threads, num_gpus=0)(measure_task)
        fidelity, lines = ray.get(task.remote(str(ctx.run_dir), sets, info, cfg.model_dump_json(), threads))
        for line in lines:
            ctx.log(line)
    if fidelity:
        report.setdefault("generation", {})["fidelity"] = fidelity
        for r in rows:  # the set each classifier trained on, in its row
            fs = next((v for v in fidelity["sets"].values() if v["method"] == r["method"] and "cas" in v), None)
            if fs:
                r.update(synthetic_class_fidelity=fs.get("class_fidelity"),
                         synthetic_class_conflicting=fs.get("class_conflicting"),
                         synthetic_bias_conflicting=fs.get("bias_conflicting"), synthetic_cas=fs["cas"].get("aga"))
    # what the synthetic-data stages of this run's methods measured (mining precision, GMM K, TIW proportions)
    for stage in dict.fromkeys(s for m in ctx.methods for s in m.stats):
        path = ctx.run_dir / "stages" / stage / "stats.json"
        if path.exists():
            report.setdefault("generation", {})[stage] = json.loads(path.read_text())
    atomic_write_json(ctx.run_dir / "metrics.json", report)
    outputs.append("metrics.json")
    return StageResult(outputs, {"headline": headline,
                                 "table": {r["method"]: {k: r.get(k) for k in ("wga", "aga", "accuracy")} for r in rows}})
