""""Harnessing diffusion" (docs/methods/clustered_dreambooth.md): the four variants — vanilla, lora, dreambooth,
clustered_dreambooth — share the finetune → generate → filter building blocks and train the two-stage classifier
(synthetic pre-training, then last-layer retraining on real data)."""

from __future__ import annotations


import numpy as np
import pyarrow.parquet as pq

from raydebias.config import GENERATIVE
from raydebias.core import Method, Stage, SyntheticSet, register
from raydebias.filter.stage import run_filter
from raydebias.finetune.stage import run_finetune
from raydebias.generate.text2img import run_generate
from raydebias.methods.shared import TRAIN_READS


def run_train_generative(ctx, variant: str):
    """The two-stage classifier on the filtered synthetic set of ``variant`` (docs/methods/clustered_dreambooth.md)."""
    from raydebias.debias.train import fit_classifier
    from raydebias.debias.two_stage import two_stage_phases

    cfg, info = ctx.cfg, ctx.data_info
    from raydebias.data.transforms import pixels_from_column

    t = pq.read_table(ctx.run_dir / "stages" / "filter" / variant / "synthetic.parquet")
    synth = {"x": pixels_from_column(t.column("pixels").to_pylist(), info["image_size"]),
             "y": t.column("label").to_numpy().astype(np.int64), "a": t.column("bias").to_numpy().astype(np.int64)}
    phases = two_stage_phases(cfg.two_stage)
    return fit_classifier(ctx, variant, phases, extra_data={"synthetic": synth},
                          summary={"synthetic_rows": int(len(synth["y"]))})


def _variant(v: str) -> Method:
    def stages(cfg) -> list[Stage]:
        prompts = ("data.prompt_template", "finetune.identifier", "seed")
        variant = lambda c: {"variant": v}  # noqa: E731
        return [
            Stage(f"finetune/{v}", "finetune", ("cluster", "diffusion", "data"), lambda ctx: run_finetune(ctx, v),
                  reads=("finetune", *prompts), key=variant),
            Stage(f"generate/{v}", "generate", (f"finetune/{v}", "diffusion", "data"),
                  lambda ctx: run_generate(ctx, v), reads=("generate", "finetune.min_images", *prompts), key=variant),
            Stage(f"filter/{v}", "filter", (f"generate/{v}", "embed", "clip"), lambda ctx: run_filter(ctx, v),
                  reads=("filter",)),
            Stage(f"train/{v}", "train", (f"filter/{v}", "data"), lambda ctx: run_train_generative(ctx, v),
                  reads=(*TRAIN_READS, "two_stage")),
        ]

    return register(Method(
        v, stages, shared=("clip", "embed", "cluster", "diffusion"),
        synthetic=(SyntheticSet(f"generate/{v}", f"generate/{v}/synthetic.parquet", "group", cas=False),
                   SyntheticSet(f"filter/{v}", f"filter/{v}/synthetic.parquet", "group", cas=True)),
        doc="docs/methods/clustered_dreambooth.md"))


for _v in GENERATIVE:
    _variant(_v)
