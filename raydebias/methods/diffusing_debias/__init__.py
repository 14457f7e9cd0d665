"""Diffusing DeBias (docs/methods/diffusing_debias.md), one package: ``config`` holds the block both recipes read
(``ddb``); ``stages`` the functions of the ``amplifier`` stage they share and of Recipe I's and Recipe II's classifier
stages, the report sections and the bias-detection measurement. This module declares Recipe I (``diffusing_debias``)
and Recipe II (``diffusing_debias_lff``) and their stage graph: importing it registers both and imports no algorithm
code."""

from raydebias.core import Method, Stage, SyntheticSet, ref, register
from raydebias.methods.diffusing_debias.config import DiffusingDebiasConfig
from raydebias.methods.shared import TRAIN_READS

_STAGES = "raydebias.methods.diffusing_debias.stages"

# Recipe I (pseudo-groups → GroupDRO) and Recipe II (frozen amplifier → LfF reweighting)
AMPLIFIED = ("diffusing_debias", "diffusing_debias_lff")

AMPLIFIER = Stage("amplifier", "amplifier", ("class_diffusion", "data"), ref(f"{_STAGES}:run_amplifier"),
                  reads=("ddb", "-ddb.recipe", "-ddb.lff_ema", "class_diffusion.prompt_template",
                         "train", "-train.epochs", "models.classifier", "seed"))
_run_train_ddb = ref(f"{_STAGES}:run_train_ddb")


def stage_graph(cfg, method: str) -> list[Stage]:
    """The amplifier (shared by both recipes) and ``train/<method>``."""
    return [AMPLIFIER,
            Stage(f"train/{method}", "train", ("amplifier", "data"), lambda ctx: _run_train_ddb(ctx, method),
                  reads=(*TRAIN_READS, "ddb.recipe", "ddb.lff_ema"))]


for _name in AMPLIFIED:
    register(Method(
        _name, lambda cfg, _m=_name: stage_graph(cfg, _m), kinds=("amplifier", "train"), shared=("class_diffusion",),
        config=("ddb", DiffusingDebiasConfig),
        synthetic=(SyntheticSet("amplifier", "amplifier/synthetic.parquet", "class", cas=True),),
        report=ref(f"{_STAGES}:report_sections"), evaluate=ref(f"{_STAGES}:bias_detection"),
        doc="docs/methods/diffusing_debias.md"))

__all__ = ["AMPLIFIED", "DiffusingDebiasConfig"]
