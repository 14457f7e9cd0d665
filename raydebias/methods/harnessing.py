""""Harnessing diffusion" (docs/methods/clustered_dreambooth.md): the four variants — vanilla, lora, dreambooth,
clustered_dreambooth — share the finetune → generate → filter building blocks and train the two-stage classifier
(synthetic pre-training, then last-layer retraining on real data)."""

from __future__ import annotations

import json
from pathlib import Path


from typing import Literal

from pydantic import Field, field_validator

from raydebias.config import Block
from raydebias.core import Method, Stage, SyntheticSet, register
from raydebias.filter.stage import run_filter
from raydebias.finetune.stage import run_finetune
from raydebias.generate.text2img import run_generate
from raydebias.methods.shared import TRAIN_READS

# the four "Harnessing diffusion" variants: group-balanced synthetic data, then the two-stage classifier
GENERATIVE = ("vanilla", "lora", "dreambooth", "clustered_dreambooth")


Stage2 = Literal["all", "balanced", "groupdro", "ft_balanced", "ft_mixed"]


class TwoStageConfig(Block):
    """Stage 1: beta·CE + (1-beta)·SupCon on the filtered synthetic set; stage 2: last-layer retraining on real."""

    beta: float = Field(0.5, ge=0, le=1)
    temperature: float = Field(0.07, gt=0)
    epochs_synthetic: int = Field(10, ge=1)
    epochs_llr: int = Field(10, ge=1)
    llr: Stage2 | list[Stage2] = Field(
        "all", description="stage 2: last layer on the real train split with class-balanced (LLR_all) or "
                           "group-balanced batches (LLR_b), last layer with GroupDRO, the whole network with "
                           "group-balanced real batches (FT_b, the paper's ablation), or the whole network with "
                           "group-balanced batches of real ∪ synthetic (FT_mix); a list trains each from the "
                           "pre-trained model and selects among them on val")
    lr: float = Field(2e-3, gt=0)
    llr_lr: float = Field(1e-2, gt=0)

    @field_validator("llr")
    @classmethod
    def _distinct(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) < len(v)):
            raise ValueError(f"two_stage.llr: a list needs distinct variants, got {v}")
        return v


def run_train_generative(ctx, variant: str):
    """The two-stage classifier on the filtered synthetic set of ``variant`` (docs/methods/clustered_dreambooth.md)."""
    from raydebias.debias.train import fit_classifier
    from raydebias.data.stream import count_rows, parquet_parts
    from raydebias.debias.two_stage import two_stage_phases

    cfg = ctx.cfg
    synth = ctx.run_dir / "stages" / "filter" / variant / "synthetic.parquet"  # streamed by the workers
    phases = two_stage_phases(cfg.two_stage)
    return fit_classifier(ctx, variant, phases, extra_data={"synthetic": synth},
                          summary={"synthetic_rows": count_rows(parquet_parts(synth))})


def report_sections(variant: str):
    """The report's sections of a Harnessing variant: its kept synthetic samples, filter statistics, fidelity heat
    map, and the clusters (clustered_dreambooth)."""

    def sections(run_dir: Path, info: dict, report: dict, samples_per_group: int) -> list[str]:
        import html

        from raydebias.evaluate.report import _cluster_table, _fmt, fidelity_heatmaps, group_samples, sample_grid

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
                             + "".join(f"<td>{_fmt(v)}</td>" for v in shown.values()) + "</tr></table>"
                             + f"<img src='{grid}'>{heat}")
        cpath = run_dir / "stages" / "cluster" / "clusters.json"
        if variant == "clustered_dreambooth" and cpath.exists():
            cl = json.loads(cpath.read_text())
            parts.append(f"<h3>Clusters</h3><p>k_D = {cl['k_D']} (at most); clusters per (class, bias) group:</p>"
                         + _cluster_table(cl, info))
        return parts

    return sections


def _variant(v: str) -> Method:
    def stages(cfg) -> list[Stage]:
        prompts = ("data.prompt_template", "finetune.identifier", "seed")
        variant = lambda c: {"variant": v}  # noqa: E731
        return [
            Stage(f"finetune/{v}", "finetune", ("cluster", "diffusion", "data"), lambda ctx: run_finetune(ctx, v),
                  reads=("finetune", *prompts), key=variant),
            Stage(f"generate/{v}", "generate", (f"finetune/{v}", "diffusion", "clip", "data"),  # clip: embeddings
                  lambda ctx: run_generate(ctx, v), reads=("generate", "finetune.min_images", *prompts), key=variant),
            Stage(f"filter/{v}", "filter", (f"generate/{v}", "embed", "clip"), lambda ctx: run_filter(ctx, v),
                  reads=("filter",)),
            Stage(f"train/{v}", "train", (f"filter/{v}", "data"), lambda ctx: run_train_generative(ctx, v),
                  reads=(*TRAIN_READS, "two_stage")),
        ]

    return register(Method(
        v, stages, kinds=("finetune", "generate", "filter", "train"), shared=("clip", "embed", "cluster", "diffusion"),
        report=report_sections(v),
        config=("two_stage", TwoStageConfig), pretrained=("diffusion", "clip"),
        synthetic=(SyntheticSet(f"generate/{v}", f"generate/{v}/synthetic.parquet", "group", cas=False),
                   SyntheticSet(f"filter/{v}", f"filter/{v}/synthetic.parquet", "group", cas=True)),
        doc="docs/methods/clustered_dreambooth.md"))


for _v in GENERATIVE:
    _variant(_v)
