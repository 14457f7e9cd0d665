"""The stages of the four "Harnessing diffusion" variants and their report sections."""

from __future__ import annotations

import json
from pathlib import Path

from raydebias.data.stream import count_rows, parquet_parts
from raydebias.debias.train import fit_classifier
from raydebias.debias.two_stage import two_stage_phases
from raydebias.evaluate.report import cluster_table, fidelity_heatmaps, fmt, group_samples, sample_grid


def run_train_generative(ctx, variant: str):
    """The two-stage classifier on the filtered synthetic set of ``variant`` (docs/methods/clustered_dreambooth.md)."""
    cfg = ctx.cfg
    synth = ctx.run_dir / "stages" / "filter" / variant / "synthetic.parquet"  # streamed by the workers
    phases = two_stage_phases(cfg.two_stage)
    return fit_classifier(ctx, variant, phases, extra_data={"synthetic": synth},
                          summary={"synthetic_rows": count_rows(parquet_parts(synth))})


def report_sections(variant: str, run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
    """The report's sections of a Harnessing variant: its kept synthetic samples, filter statistics, fidelity heat
    map, and the clusters (clustered_dreambooth)."""
    import html

    parts = []
    rows = [r for r in report["rows"] if r["method"] == variant]
    for r in rows:
        fpath = run_dir / "stages" / "filter" / r["method"] / "synthetic.parquet"
        if fpath.exists():
            t, sx = group_samples(fpath, info, samples_per_group)
            grid = sample_grid(sx, t.column("label").to_numpy(), t.column("bias").to_numpy(), info,
                               samples_per_group, title=f"{r['method']}: kept synthetic samples per group")
            stats = json.loads((run_dir / "stages" / "filter" / r["method"] / "stats.json").read_text())
            fs = report.get("generation", {}).get("fidelity", {}).get("sets", {}).get(f"filter/{r['method']}")
            heat = f"<img src='{fidelity_heatmaps(fs, info)}'>" if fs and fs.get("per_group") else ""
            shown = {k: v for k, v in stats.items() if not isinstance(v, dict)}
            parts.append(f"<h3>Synthetic data: {html.escape(r['method'])}</h3><table><tr>"
                         + "".join(f"<th>{html.escape(k)}</th>" for k in shown) + "</tr><tr>"
                         + "".join(f"<td>{fmt(v)}</td>" for v in shown.values()) + "</tr></table>"
                         + f"<img src='{grid}'>{heat}")
    cpath = run_dir / "stages" / "cluster" / "clusters.json"
    if variant == "clustered_dreambooth" and cpath.exists():
        cl = json.loads(cpath.read_text())
        parts.append(f"<h3>Clusters</h3><p>k_D = {cl['k_D']} (at most); clusters per (class, bias) group:</p>"
                     + cluster_table(cl, info))
    return parts
