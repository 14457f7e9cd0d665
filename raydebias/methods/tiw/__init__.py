"""TIW (docs/methods/tiw.md), one package: ``config`` holds its block (``tiw``); ``stages`` the ``tiw`` stage's function
with the measurement, report sections and console lines; ``objectives`` the time-dependent discriminator, the density
ratio and the DSM / TIW-DSM losses (the 2-D proof runs on them); ``train`` the image models and their Ray Train
loop. This module declares the method: importing it registers TIW and imports no algorithm code."""

from raydebias.core import Method, Stage, SyntheticSet, ref, register
from raydebias.methods.tiw.config import TIWConfig

_STAGES = "raydebias.methods.tiw.stages"


def stage_graph(cfg) -> list[Stage]:
    return [Stage("tiw", "tiw", ("data",), ref(f"{_STAGES}:run_tiw"), reads=("tiw", "seed"))]


register(Method("tiw", stage_graph, config=("tiw", TIWConfig), kinds=("tiw",),
                synthetic=(SyntheticSet("tiw", "tiw", "samples", cas=False),), stats=("tiw",), classifier=False,
                report=ref(f"{_STAGES}:report_sections"), console=ref(f"{_STAGES}:console_lines"), result="tiw",
                doc="docs/methods/tiw.md"))

__all__ = ["TIWConfig"]
