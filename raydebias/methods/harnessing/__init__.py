""""Harnessing diffusion" (docs/methods/clustered_dreambooth.md): the four variants — vanilla, lora, dreambooth,
clustered_dreambooth — share the finetune → generate → filter building blocks and train the two-stage classifier
(synthetic pre-training, then last-layer retraining on real data).

One package: ``config`` holds the two-stage classifier's block (``two_stage``); ``stages`` each variant's stages and
report sections. This module declares the four variants and their stage graph: importing it registers them and
imports no algorithm code."""

from functools import partial

from raydebias.core import Method, Stage, SyntheticSet, ref, register
from raydebias.methods.harnessing.config import TwoStageConfig
from raydebias.methods.shared import TRAIN_READS

_STAGES = "raydebias.methods.harnessing.stages"

# the four "Harnessing diffusion" variants: group-balanced synthetic data, then the two-stage classifier
GENERATIVE = ("vanilla", "lora", "dreambooth", "clustered_dreambooth")

_run_finetune = ref("raydebias.finetune.stage:run_finetune")
_run_generate = ref("raydebias.generate.text2img:run_generate")
_run_filter = ref("raydebias.filter.stage:run_filter")
_run_train = ref(f"{_STAGES}:run_train_generative")


def stage_graph(cfg, variant: str) -> list[Stage]:
    """``finetune`` → ``generate`` → ``filter`` → ``train`` of one variant."""
    v = variant
    prompts = ("data.prompt_template", "finetune.identifier", "seed")
    key = lambda c: {"variant": v}  # noqa: E731
    return [
        Stage(f"finetune/{v}", "finetune", ("cluster", "diffusion", "data"), lambda ctx: _run_finetune(ctx, v),
              reads=("finetune", *prompts), key=key),
        Stage(f"generate/{v}", "generate", (f"finetune/{v}", "diffusion", "clip", "data"),  # clip: embeddings
              lambda ctx: _run_generate(ctx, v), reads=("generate", "finetune.min_images", *prompts), key=key),
        Stage(f"filter/{v}", "filter", (f"generate/{v}", "embed", "clip"), lambda ctx: _run_filter(ctx, v),
              reads=("filter",)),
        Stage(f"train/{v}", "train", (f"filter/{v}", "data"), lambda ctx: _run_train(ctx, v),
              reads=(*TRAIN_READS, "two_stage")),
    ]


for _v in GENERATIVE:
    register(Method(
        _v, lambda cfg, _v=_v: stage_graph(cfg, _v), kinds=("finetune", "generate", "filter", "train"),
        shared=("clip", "embed", "cluster", "diffusion"), report=partial(ref(f"{_STAGES}:report_sections"), _v),
        config=("two_stage", TwoStageConfig), pretrained=("diffusion", "clip"),
        synthetic=(SyntheticSet(f"generate/{_v}", f"generate/{_v}/synthetic.parquet", "group", cas=False),
                   SyntheticSet(f"filter/{_v}", f"filter/{_v}/synthetic.parquet", "group", cas=True)),
        doc="docs/methods/clustered_dreambooth.md"))

__all__ = ["GENERATIVE", "TwoStageConfig"]
