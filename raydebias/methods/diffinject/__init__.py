"""DiffInject (docs/methods/diffinject.md), one package: ``config`` holds its block (``diffinject``); ``stages`` the
stage functions (``mine``, ``inject``, ``train/diffinject``) and report sections; ``inject`` the tensor functions (DDIM
inversion, h-space recording and Slerp injection, the asymmetric step). This module declares the method and its
stage graph: importing it registers DiffInject and imports no algorithm code (a stage's function is imported when
the stage runs)."""

from raydebias.core import Method, Stage, SyntheticSet, ref, register
from raydebias.methods.diffinject.config import DiffInjectConfig
from raydebias.methods.shared import TRAIN_READS, editing_base

_STAGES = "raydebias.methods.diffinject.stages"
_MINE_READS = ("diffinject.gce_q", "diffinject.biased_epochs", "diffinject.top_k")


def stage_graph(cfg) -> list[Stage]:
    return [
        Stage("mine", "mine", ("data",), ref(f"{_STAGES}:run_mine"),
              reads=(*_MINE_READS, "train", "-train.epochs", "models.classifier", "seed")),
        Stage("inject", "inject", ("mine", editing_base(cfg), "data"), ref(f"{_STAGES}:run_inject"),
              reads=("diffinject", *(f"-{r}" for r in _MINE_READS), "seed")),
        Stage("train/diffinject", "train", ("inject", "data"), ref(f"{_STAGES}:run_train_diffinject"),
              reads=TRAIN_READS),
    ]


register(Method("diffinject", stage_graph, kinds=("mine", "inject", "train"), config=("diffinject", DiffInjectConfig),
                pretrained=("diffusion",),
                synthetic=(SyntheticSet("inject", "inject/synthetic.parquet", "style", cas=True),),
                stats=("mine", "inject"), report=ref(f"{_STAGES}:report_sections"), doc="docs/methods/diffinject.md"))

__all__ = ["DiffInjectConfig"]
