"""The ``report`` stage: ``report.html`` with the metrics table, per-group accuracy bars per method, a sample
grid per group, the group-count tables and links to the artefacts. Plots are matplotlib PNGs embedded inline."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raydebias._internal.io import atomic_write_text
from raydebias.core import StageResult
from raydebias.data.stream import first_per_group, read_columns, take_rows
from raydebias.evaluate.metrics import group_key

_COLUMNS = [("accuracy", "acc"), ("wga", "WGA"), ("aga", "AGA (unbiased)"), ("adjusted_avg", "adjusted avg"),
            ("aligned_acc", "aligned"), ("conflicting_acc", "conflicting"), ("bias", "Bias"), ("ba", "BA"),
            ("kl", "KL"), ("bpc_vs_erm", "BPC vs ERM")]


def png(fig) -> str:
    """A matplotlib figure as a PNG data URI for ``<img src=...>`` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def fmt(v: Any) -> str:
    """A table cell: floats to 3 decimals, None as a dash, anything else HTML-escaped."""
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


def accuracy_bars(rows: list[dict], info: dict) -> str:
    """One panel per method: a bar per (y, a) group, conflicting groups highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C, B = info["num_classes"], info["num_bias"]
    train = np.asarray(info["group_counts"]["train"])
    keys = [(y, a) for y in range(C) for a in range(B)]
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6, 0.12 * len(keys) + 2), 2.6 * len(rows)), squeeze=False)
    fig.subplots_adjust(hspace=0.55)
    for ax, r in zip(axes[:, 0], rows):
        acc = [r["per_group"].get(group_key(y, a)) for y, a in keys]
        colors = ["#4c72b0" if train[y].argmax() == a else "#dd8452" for y, a in keys]
        ax.bar(range(len(keys)), [0 if v is None else v for v in acc], color=colors, width=0.85)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{r['method']}: WGA {fmt(r.get('wga'))}, AGA {fmt(r.get('aga'))} "
                     "(blue = bias-aligned group, orange = conflicting)", fontsize=9)
        if len(keys) <= 24:
            ax.set_xticks(range(len(keys)), [f"{y},{a}" for y, a in keys], fontsize=7)
        else:
            ax.set_xticks([i * B for i in range(C)], [info["class_names"][y] for y in range(C)], fontsize=7)
    return png(fig)


def sample_grid(x: np.ndarray, y: np.ndarray, a: np.ndarray, info: dict, per_group: int = 1,
                title: str = "training samples per group (grey = no sample)") -> str:
    """Samples, one cell per (y, a) group (rows = classes, columns = bias values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C, B = info["num_classes"], info["num_bias"]
    fig, axes = plt.subplots(C, B * per_group, figsize=(0.8 * B * per_group + 1, 0.8 * C + 0.5), squeeze=False)
    for yy in range(C):
        for aa in range(B):
            idx = np.flatnonzero((y == yy) & (a == aa))[:per_group]
            for k in range(per_group):
                ax = axes[yy, aa * per_group + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(idx):
                    ax.imshow(x[idx[k]])
                else:
                    ax.set_facecolor("#eeeeee")
                if yy == 0 and k == 0:
                    ax.set_title(str(info["bias_names"][aa])[:10], fontsize=7)
                if aa == 0 and k == 0:
                    ax.set_ylabel(str(info["class_names"][yy])[:12], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return png(fig)


def fidelity_heatmaps(fs: dict, info: dict) -> str:
    """Two C×B heat maps of one synthetic set: per-group class fidelity and bias fidelity (blank = no image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C, B = info["num_classes"], info["num_bias"]
    kinds = [k for k in ("class", "bias") if any(k in g for g in fs["per_group"].values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(0.45 * B * len(kinds) + 2.5, 0.4 * C + 1.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        m = np.full((C, B), np.nan)
        for key, g in fs["per_group"].items():
            yy, aa = map(int, key.split(","))
            m[yy, aa] = g.get(kind, np.nan)
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for yy in range(C):
            for aa in range(B):
                if np.isfinite(m[yy, aa]) and C * B <= 144:
                    ax.text(aa, yy, f"{m[yy, aa]:.1f}", ha="center", va="center", fontsize=6,
                            color="white" if m[yy, aa] < 0.6 else "black")
        ax.set_xticks(range(B), [str(b)[:6] for b in info["bias_names"]], fontsize=6, rotation=90)
        ax.set_yticks(range(C), [str(c)[:10] for c in info["class_names"]], fontsize=6)
        ax.set_title(f"{kind} fidelity (probe on val)", fontsize=8)
    return png(fig)


def fidelity_section(report: dict, info: dict) -> str:
    """The generation-fidelity table of every synthetic set, with the probes' own accuracy as the ceiling."""
    fid = report.get("generation", {}).get("fidelity")
    if not fid:
        return ""
    cols = [("images", "images"), ("class_aligned", "class fid. aligned"), ("class_conflicting", "class fid. conflicting"),
            ("bias_aligned", "bias fid. aligned"), ("bias_conflicting", "bias fid. conflicting"),
            ("class_fidelity", "class fid. (all)"), ("aligned_fraction", "drawn in an aligned pairing")]
    body = ""
    for name, fs in fid["sets"].items():
        if "objectives" in fs:
            for obj, v in fs["objectives"].items():
                body += (f"<tr><td>{html.escape(name)}/{html.escape(obj)}</td><td>none</td>"
                         + "".join(f"<td>{fmt(v.get(k))}</td>" for k, _ in cols) + "<td>–</td></tr>")
            continue
        body += (f"<tr><td>{html.escape(name)}</td><td>{html.escape(fs['target'])}</td>"
                 + "".join(f"<td>{fmt(fs.get(k))}</td>" for k, _ in cols)
                 + f"<td>{fmt((fs.get('cas') or {}).get('aga'))}</td></tr>")
    acc = fid["probes"]["probe_test_accuracy"]
    return ("<h2>Generation fidelity</h2><p>Does an image generated for group (y, a) show class y and bias a? A class "
            "probe and a bias probe (the run's classifier backbone, trained on the real <b>val</b> split with "
            f"group-balanced batches) score every synthetic image; their own accuracy on real test — class "
            f"{fmt(acc.get('class'))}, bias {fmt(acc.get('bias'))} — is what a perfect generator would score. "
            "Means are over groups. CAS: the backbone trained on the synthetic set alone, unbiased accuracy on real "
            "test.</p><table><tr><th>synthetic set</th><th>target</th>"
            + "".join(f"<th>{n}</th>" for _, n in cols) + "<th>CAS (AGA)</th></tr>" + body + "</table>")


def image_rows(rows: list[tuple[str, np.ndarray]], title: str, per_row: int = 10) -> str:
    """A grid with one labelled row of up to ``per_row`` uint8 NHWC images per (label, images) entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), per_row, figsize=(0.8 * per_row + 1.5, 0.85 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for k in range(per_row):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            if k < len(imgs):
                ax.imshow(imgs[k])
            else:
                ax.set_facecolor("#eeeeee")
        axes[r, 0].set_ylabel(label[:18], fontsize=7)
    fig.suptitle(title, fontsize=9)
    return png(fig)


def group_samples(path: Path, info: dict, per_group: int, bias: str | None = "bias"):
    """The first ``per_group`` rows of every (label, ``bias``) group of a Parquet set (every class with
    ``bias=None``): ``(table without pixels, pixels)``. Only the small columns and the parts holding the chosen
    rows are read."""
    t = read_columns(path, ["label", *([bias] if bias else [])])
    y = t.column("label").to_numpy()
    a = t.column(bias).to_numpy() if bias else np.zeros(len(y), np.int64)
    return take_rows(path, first_per_group(y, np.maximum(a, 0), per_group), info["image_size"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = ", ".join(map(str, v)) if isinstance(v, list) else v
    return out


def kv_table(d: dict) -> str:
    """A stage summary as a labelled table: one column per (flattened, ``a.b``) key."""
    flat = _flat(d)
    return ("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in flat) + "</tr><tr>"
            + "".join(f"<td>{html.escape(v) if isinstance(v, str) else fmt(v)}</td>" for v in flat.values())
            + "</tr></table>")


def cluster_table(cl: dict, info: dict) -> str:
    nb = info["num_bias"] or 1
    names_b = info["bias_names"] or ["–"]
    body = "".join(
        f"<tr><td>{html.escape(str(info['class_names'][int(g) // nb]))}</td><td>{html.escape(str(names_b[int(g) % nb]))}"
        f"</td><td>{len(sizes)}</td><td>{html.escape(', '.join(map(str, sizes)))}</td></tr>"
        for g, sizes in sorted(cl["cluster_sizes"].items(), key=lambda kv: int(kv[0])))
    return ("<table><tr><th>class</th><th>bias</th><th>clusters</th><th>images per cluster</th></tr>"
            f"{body}</table>")


def summary_lines(report: dict, method: str | None) -> list[str]:
    """"What this run shows": the method against the best baseline on the headline metric, and what its
    generator produced on the groups the training set lacks."""
    head, rows = report["headline"], report["rows"]
    by = {r["method"]: r for r in rows if isinstance(r.get(head), float)}
    lines = []
    if method in by:
        others = [r for m, r in by.items() if m != method]
        if others:
            best = max(others, key=lambda r: r[head])
            diff = by[method][head] - best[head]
            lines.append(f"{method} reaches {head.upper()} {by[method][head]:.3f}, "
                         f"{'above' if diff > 0 else 'below'} the best other row ({best['method']}, "
                         f"{best[head]:.3f}) by {abs(diff):.3f} (one run: spread between seeds on 2 CPU cores is "
                         "several points).")
    for name, fs in report.get("generation", {}).get("fidelity", {}).get("sets", {}).items():
        if method and method in name and isinstance(fs.get("class_conflicting"), float):
            lines.append(f"Its synthetic set ({name}) carries the class on bias-conflicting groups "
                         f"{fs['class_conflicting']:.0%} of the time and the bias attribute "
                         + (f"{fs['bias_conflicting']:.0%}" if isinstance(fs.get("bias_conflicting"), float)
                            else "(no bias labels)") + " (probes trained on val; chance is one over the number of classes, resp. bias values).")
            break
    return lines


def _count_table(counts: list[list[int]], info: dict) -> str:
    head = "".join(f"<th>{html.escape(str(b))}</th>" for b in info["bias_names"])
    body = "".join(
        f"<tr><th>{html.escape(str(info['class_names'][y]))}</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for y, row in enumerate(counts)
    )
    return f"<table class='counts'><tr><th>class \\ bias</th>{head}</tr>{body}</table>"


def render_report(run_dir: Path, samples_per_group: int = 1, methods: list | None = None) -> str:
    """The HTML report; ``methods`` (registered declarations) add their own sections."""
    report = json.loads((run_dir / "metrics.json").read_text())
    info = json.loads((run_dir / "stages" / "data" / "info.json").read_text())
    rows = report["rows"]
    head = report["headline"]
    cfg_path = run_dir / "config.yaml"
    method = yaml.safe_load(cfg_path.read_text()).get("method") if cfg_path.exists() else None
    shows = summary_lines(report, method)
    parts = [f"<h1>raydebias report: {html.escape(report['run_id'])}</h1>",
             *(["<h2>What this run shows</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in shows) + "</ul>"]
               if shows else []),
             f"<p>Headline metric: <b>{html.escape(head.upper())}</b> — {html.escape(report['headline_description'])}. "
             f"Adjusted average = {html.escape(report['adjusted_avg_description'])}.</p>",
             "<p>Rows per split: " + ", ".join(f"{k} {v}" for k, v in info["counts"].items()) + f"; quarantined rows: {info['quarantined']}"
             + (" (<a href='quarantine.parquet'>quarantine.parquet</a>)" if info["quarantined"] else "") + "</p>"]
    cols = [(k, n) for k, n in _COLUMNS if any(r.get(k) is not None for r in rows)]
    parts.append("<h2>Test metrics</h2><table><tr><th>method</th>"
                 + "".join(f"<th>{'<u>' + n + '</u>' if k == head else n}</th>" for k, n in cols) + "</tr>"
                 + "".join("<tr><td>" + html.escape(r["method"]) + "</td>"
                           + "".join(f"<td>{fmt(r.get(k))}</td>" for k, _ in cols) + "</tr>" for r in rows)
                 + "</table>")
    parts.append(fidelity_section(report, info))
    if info["num_bias"] is not None and rows and rows[0].get("per_group"):
        parts.append(f"<h2>Per-group test accuracy</h2><img src='{accuracy_bars(rows, info)}'>")
        t, x = group_samples(run_dir / "stages" / "data" / "train.parquet", info, samples_per_group)
        grid = sample_grid(x, t.column("label").to_numpy(), t.column("bias").to_numpy(), info, samples_per_group)
        parts.append(f"<h2>Samples per group</h2><img src='{grid}'>")
        done = set()
        for m in methods or []:  # each method's own sections, from its declaration (once per function)
            if m.report is not None and m.report not in done:
                done.add(m.report)
                parts.extend(m.report(run_dir, info, report, samples_per_group))
        parts.append("<h2>Group counts (y, a) per split</h2>")
        for split, counts in info["group_counts"].items():
            parts.append(f"<h3>{split}</h3>" + _count_table(counts, info))
    links = ["config.yaml", "manifest.json", "metrics.json"] + [
        f"stages/train/{r['method']}/model.safetensors" for r in rows]
    parts.append("<h2>Artefacts</h2><ul>" + "".join(f"<li><a href='{l}'>{l}</a></li>" for l in links) + "</ul>")
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} table.counts td{font-size:80%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>raydebias report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"


def run_report(ctx):
    path = ctx.run_dir / "report.html"
    atomic_write_text(path, render_report(ctx.run_dir, ctx.cfg.report.samples_per_group, ctx.methods))
    ctx.log(f"[report] {path}")
    return StageResult(["report.html"], {"path": str(path)})
