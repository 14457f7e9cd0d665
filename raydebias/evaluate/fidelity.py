"""Generation fidelity: does an image generated for group (y, a) show class y and bias value a?

Two probes, the run's classifier backbone trained on the real **val** split (never test) with group-balanced
batches, so that neither can read one attribute off the other: a class probe (y) and a bias probe (a). Every
synthetic image made for (y, a) is scored by both; per-group fractions are summarised over the bias-aligned and
the bias-conflicting groups (unweighted means over groups). CAS (classification accuracy score, Ravuri & Vinyals
2019) trains the same backbone on the synthetic set alone and reports its unbiased accuracy (AGA) on real test —
a measurement, never used to select anything. With ``evaluate.fidelity_probes`` > 1 each probe is an ensemble of
that many backbones trained from different seeds (softmax averaged): one probe's seed moves the fidelity of a
synthetic set by several points (BENCHMARKS.md, "probe variance"), an ensemble less. Generators without a target
group (Diffusing DeBias's class-only prompts, GAMMA-FACE, TIW) get the probes' view of what they drew instead
(``describe_unconditional``). docs/metrics.md.

Images are uint8 NHWC arrays or :class:`~raydebias.data.stream.PartSet` streams of Parquet parts: the evaluate
stage runs :func:`measure_task` in a Ray task that streams val, test and every synthetic set a part at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raydebias._internal.io import as_path
from raydebias.config import ClassifierModelConfig, RunConfig
from raydebias.data.stream import PartSet, iter_parts, parquet_parts, stream_epoch
from raydebias.data.transforms import to_model_input
from raydebias.debias.groupdro import group_balanced_weights
from raydebias.evaluate.metrics import conflicting_mask, group_key, group_metrics
from raydebias.models.classifier import create_classifier

Images = np.ndarray | PartSet  # uint8 NHWC in memory, or Parquet parts streamed


def fit_backbone(x: Images, y: np.ndarray, num_classes: int, cfg: ClassifierModelConfig,
                 groups: np.ndarray | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 128,
                 seed: int = 0, image_size: int | None = None, buffer_rows: int = 8192) -> torch.nn.Module:
    """Train ``cfg``'s backbone in-process (seconds on a val-sized set) on ``x`` (uint8 NHWC, or a PartSet streamed
    at ``image_size`` through a shuffle buffer of ``buffer_rows`` rows); with ``groups``, every epoch draws each
    group equally often (with replacement)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = create_classifier(cfg, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    ys = torch.as_tensor(np.asarray(y, np.int64))
    w = None if groups is None else group_balanced_weights(np.asarray(groups))
    n = len(ys)
    streamed = isinstance(x, PartSet)
    xs = None if streamed else to_model_input(x)

    def step(b: np.ndarray, inputs: torch.Tensor) -> None:
        loss = F.cross_entropy(model(inputs), ys[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for epoch in range(epochs):
        order = rng.permutation(n) if w is None else rng.choice(n, n, replace=True, p=w / w.sum())
        if streamed:
            counts = np.bincount(order, minlength=n)
            for b, px in stream_epoch(x, counts, image_size, batch_size, buffer_rows, [seed, epoch]):
                if len(b) >= 2:
                    step(b, to_model_input(px))
            continue
        for i in range(0, n, batch_size):
            b = order[i : i + batch_size]
            if len(b) >= 2:
                step(b, xs[b])
    return model.eval()


class ProbeEnsemble(torch.nn.Module):
    """Backbones trained from different seeds; ``forward`` returns the mean of their softmax outputs."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.softmax(m(x), 1) for m in self.members]).mean(0)


def fit_probe(x: Images, y: np.ndarray, num_classes: int, cfg: ClassifierModelConfig, groups: np.ndarray,
              epochs: int, seed: int, members: int = 1, image_size: int | None = None) -> torch.nn.Module:
    """One backbone (``members`` = 1) or a :class:`ProbeEnsemble` of ``members`` backbones seeded ``seed + 10·k``."""
    fits = [fit_backbone(x, y, num_classes, cfg, groups=groups, epochs=epochs, seed=seed + 10 * k,
                         image_size=image_size) for k in range(members)]
    return fits[0] if members == 1 else ProbeEnsemble(fits).eval()


@torch.no_grad()
def predict_labels(model: torch.nn.Module, x: Images, batch_size: int = 512, image_size: int | None = None) -> np.ndarray:
    """Argmax predictions on an array, or on a PartSet read a part at a time (at ``image_size``)."""
    chunks = (px for _, px in iter_parts(x, image_size)) if isinstance(x, PartSet) else (x,)
    out = [model(to_model_input(c[i : i + batch_size])).argmax(1) for c in chunks for i in range(0, len(c), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


@dataclass
class Probes:
    """A class probe and (with bias labels in val) a bias probe, with their own accuracy on real test."""

    class_probe: torch.nn.Module
    bias_probe: torch.nn.Module | None
    info: dict[str, Any]
    accuracy: dict[str, float | None]

    @property
    def members(self) -> int:
        """Backbones per probe (``evaluate.fidelity_probes``)."""
        p = self.class_probe
        return len(p.members) if isinstance(p, ProbeEnsemble) else 1

    def summary(self) -> dict[str, Any]:
        return {"trained_on": "val (group-balanced batches)", "probe_test_accuracy": self.accuracy,
                "members": self.members}


def train_probes(val: dict[str, np.ndarray], test: dict[str, np.ndarray] | None, info: dict[str, Any],
                 cfg: ClassifierModelConfig, epochs: int = 10, seed: int = 0, members: int = 1) -> Probes:
    """Fit the class and bias probes on ``val`` (``x``, ``y``, ``a``), each an ensemble of ``members`` backbones;
    their accuracy on ``test`` is the ceiling a perfect generator would score."""
    C, B, size = info["num_classes"], info["num_bias"], info.get("image_size")
    has_bias = B is not None and len(val["a"]) > 0 and bool((val["a"] >= 0).all())
    groups = val["y"] * B + val["a"] if has_bias else val["y"]
    cp = fit_probe(val["x"], val["y"], C, cfg, groups, epochs, seed, members, size)
    bp = fit_probe(val["x"], val["a"], B, cfg, groups, epochs, seed + 1, members, size) if has_bias else None
    acc: dict[str, float | None] = {"class": None, "bias": None}
    if test is not None and len(test["y"]):
        acc["class"] = float((predict_labels(cp, test["x"], image_size=size) == test["y"]).mean())
        known = test["a"] >= 0
        if bp is not None and known.any():
            acc["bias"] = float((predict_labels(bp, test["x"], image_size=size)[known] == test["a"][known]).mean())
    return Probes(cp, bp, info, acc)


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def group_fidelity(probes: Probes, x: Images, y: np.ndarray, a: np.ndarray | None) -> dict[str, Any]:
    """Per-group class and bias fidelity of images generated for groups (y, a) (``a`` = −1 or None: no bias
    target), and their means over the bias-aligned and bias-conflicting groups."""
    info = probes.info
    y = np.asarray(y, np.int64)
    pc = predict_labels(probes.class_probe, x, image_size=info.get("image_size"))
    out: dict[str, Any] = {"images": int(len(y)), "class_fidelity": float((pc == y).mean()) if len(y) else None}
    if a is None or info["num_bias"] is None or not (np.asarray(a) >= 0).any():
        out["per_class"] = {str(c): float((pc[y == c] == c).mean()) for c in np.unique(y)}
        return out
    a = np.asarray(a, np.int64)
    known = a >= 0
    pb = predict_labels(probes.bias_probe, x, image_size=info.get("image_size")) \
        if probes.bias_probe is not None else None
    conflicting = conflicting_mask(y, np.maximum(a, 0), info["group_counts"]["train"])
    per_group, summ = {}, {k: [] for k in ("class_aligned", "class_conflicting", "bias_aligned", "bias_conflicting")}
    for yy, aa in sorted(set(zip(y[known].tolist(), a[known].tolist()))):
        sel = known & (y == yy) & (a == aa)
        kind = "conflicting" if conflicting[sel][0] else "aligned"
        g = {"n": int(sel.sum()), "class": float((pc[sel] == yy).mean()), "kind": kind}
        summ[f"class_{kind}"].append(g["class"])
        if pb is not None:
            g["bias"] = float((pb[sel] == aa).mean())
            summ[f"bias_{kind}"].append(g["bias"])
        per_group[group_key(yy, aa)] = g
    out.update({k: _mean(v) for k, v in summ.items()})
    if pb is None:
        out["note"] = "val has no bias labels: bias fidelity skipped"
    else:
        out["bias_fidelity"] = float((pb[known] == a[known]).mean())
    out["per_group"] = per_group
    return out


def describe_unconditional(probes: Probes, x: Images, labels: np.ndarray | None = None) -> dict[str, Any]:
    """For images made without a target group: the probes' class and bias histograms, the fraction the probes
    put in a bias-aligned pairing, and (with ``labels``, e.g. pseudo-labels) the class probe's agreement."""
    info = probes.info
    size = info.get("image_size")
    pc = predict_labels(probes.class_probe, x, image_size=size)
    n = len(pc)
    out: dict[str, Any] = {"images": n,
                           "class_histogram": np.bincount(pc, minlength=info["num_classes"]).tolist()}
    if labels is not None:
        out["class_fidelity"] = float((pc == np.asarray(labels)).mean()) if n else None
    if probes.bias_probe is not None:
        pb = predict_labels(probes.bias_probe, x, image_size=size)
        out["bias_histogram"] = np.bincount(pb, minlength=info["num_bias"]).tolist()
        y_ref = pc if labels is None else np.asarray(labels, np.int64)
        counts = np.asarray(info["group_counts"]["train"])
        # "aligned" needs bias labels in train: without them no pairing is the aligned one
        out["aligned_fraction"] = float((~conflicting_mask(y_ref, pb, counts)).mean()) \
            if n and counts.sum() > 0 else None
    return out


def cas(x: Images, y: np.ndarray, test: dict[str, Any], info: dict[str, Any],
        cfg: ClassifierModelConfig, epochs: int = 10, seed: int = 0) -> dict[str, Any]:
    """Classification accuracy score: the backbone trained on the synthetic set alone, unbiased accuracy (AGA)
    and WGA on real test (plain accuracy without bias labels)."""
    C, B = info["num_classes"], info["num_bias"]
    if len(np.unique(y)) < 2:
        return {"aga": None, "wga": None, "accuracy": None, "note": "fewer than two classes in the synthetic set"}
    model = fit_backbone(x, y, C, cfg, groups=np.asarray(y), epochs=epochs, seed=seed,
                         image_size=info.get("image_size"))
    pred = predict_labels(model, test["x"], image_size=info.get("image_size"))
    if B is None or not (test["a"] >= 0).any():
        return {"accuracy": float((pred == test["y"]).mean()), "aga": None, "wga": None}
    known = test["a"] >= 0
    m = group_metrics(test["y"][known], pred[known], test["a"][known], C, B)
    return {"aga": m["aga"], "wga": m["wga"], "accuracy": float((pred == test["y"]).mean())}


def synthetic_sets(methods: list) -> list[dict[str, Any]]:
    """The synthetic sets the ``methods`` (registered :class:`raydebias.core.Method` declarations) write, each once,
    as ``{"method", "name", "path" (under stages/), "target", "cas"}`` (targets: :class:`raydebias.core.SyntheticSet`)."""
    sets: list[dict[str, Any]] = []
    for m in methods:
        for s in m.synthetic:
            if not any(have["name"] == s.name for have in sets):
                sets.append({"method": m.name, "name": s.name, "path": s.path, "target": s.target, "cas": s.cas})
    return sets


def measure_run(run_dir, sets: list[dict[str, Any]], info: dict[str, Any], val: dict, test: dict,
                cfg: ClassifierModelConfig, train: dict | None = None, seed: int = 0, epochs: int = 8,
                log=None, probe_members: int = 1) -> dict[str, Any] | None:
    """Fidelity (and CAS) of the synthetic ``sets`` (:func:`synthetic_sets`) that exist under ``run_dir/stages``; ``val``, ``test``: ``{"x", "y", "a"}`` (``x`` an array or a PartSet); ``train``: its
    ``id`` and ``a`` (only DiffInject's style target reads it). Each synthetic set is streamed from its parts."""

    import pyarrow.parquet as pq

    st = as_path(run_dir) / "stages"
    sets = [s for s in sets if (st / s["path"]).exists()]
    if not sets or not len(val["y"]):
        return None
    probes = train_probes(val, test, info, cfg, epochs=epochs, seed=seed, members=probe_members)
    out: dict[str, Any] = {"probes": probes.summary(), "sets": {}}
    for s in sets:
        if s["target"] == "samples":
            res = {obj.stem.removeprefix("samples_"): describe_unconditional(probes, np.load(obj.open("rb")))
                   for obj in sorted((st / s["path"]).glob("samples_*.npy"))}
            out["sets"][s["name"]] = {"method": s["method"], "target": "none (unconditional)", "objectives": res}
            continue
        files = parquet_parts(st / s["path"])
        x = PartSet.open(files, bias=False)
        y = x.y
        if s["target"] == "pseudo":
            res = describe_unconditional(probes, x, labels=y)
        else:
            a = None
            if s["target"] == "group":
                a = np.concatenate([pq.read_table(str(f), columns=["bias"]).column("bias").to_numpy() for f in files]
                                   ).astype(np.int64) if files else np.zeros(0, np.int64)
            elif s["target"] == "style" and train is not None:
                row = {i: k for k, i in enumerate(train["id"].tolist())}
                styles = [i for f in files for i in pq.read_table(str(f), columns=["style_id"]).column(0).to_pylist()]
                a = train["a"][[row[i] for i in styles]]
            res = group_fidelity(probes, x, y, a)
            if s["target"] == "class":
                res.update({k: v for k, v in describe_unconditional(probes, x, labels=y).items()
                            if k in ("bias_histogram", "aligned_fraction")})
        if s["cas"] and len(y):
            res["cas"] = cas(x, y, test, info, cfg, epochs=epochs, seed=seed)
        out["sets"][s["name"]] = {"method": s["method"], "target": s["target"], **res}
        if log:
            keys = ("class_aligned", "class_conflicting", "bias_aligned", "bias_conflicting", "class_fidelity")
            log(f"[evaluate] fidelity {s['name']}: " + ", ".join(
                f"{k} {res[k]:.3f}" for k in keys if isinstance(res.get(k), float))
                + (f", CAS {res['cas']['aga']:.3f}" if isinstance(res.get("cas", {}).get("aga"), float) else ""))
    return out


def measure_task(run_dir: str, sets: list[dict[str, Any]], info: dict[str, Any], cfg_json: str, threads: int) -> tuple:
    """Ray task: :func:`measure_run` on the run's val and test splits streamed from their parts; returns the
    result and its log lines."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.set_num_threads(max(1, threads))
    cfg = RunConfig.model_validate_json(cfg_json)
    data = as_path(run_dir) / "stages" / "data"
    splits = {}
    for name in ("val", "test"):
        ps = PartSet.open(parquet_parts(data / f"{name}.parquet"))
        splits[name] = {"x": ps, "y": ps.y, "a": ps.a}
    train = None
    if any(s["target"] == "style" for s in sets):  # only DiffInject's target reads train
        t = pa.concat_tables([pq.read_table(str(f), columns=["id", "bias"])
                              for f in parquet_parts(data / "train.parquet")])
        train = {"id": np.asarray(t.column("id").to_pylist(), dtype=object), "a": t.column("bias").to_numpy()}
    logs: list[str] = []
    res = measure_run(run_dir, sets, info, splits["val"], splits["test"], cfg.models.classifier, train=train,
                      seed=cfg.seed, epochs=cfg.evaluate.fidelity_epochs, log=logs.append,
                      probe_members=cfg.evaluate.fidelity_probes)
    return res, logs
