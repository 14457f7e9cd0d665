"""GAMMA-FACE (docs/methods/gamma_face.md), one package: ``config`` holds its block (``gamma_face``) and config check;
``stages`` the stage functions (``gmm``, ``train/gamma_face``) and report sections; ``gmm`` the latent collection, the
GMM fit with K chosen by BIC and the sampling per component. This module declares the method and its stage graph:
importing it registers GAMMA-FACE and imports no algorithm code."""

from raydebias.core import Method, Stage, SyntheticSet, ref, register
from raydebias.methods.gamma_face.config import GammaFaceConfig, check
from raydebias.methods.shared import TRAIN_READS, editing_base

_STAGES = "raydebias.methods.gamma_face.stages"


def stage_graph(cfg) -> list[Stage]:
    # pseudo-labels come from another method's classifier (``gamma_face.labeler``): that one trains first
    return [
        Stage("gmm", "gmm", (editing_base(cfg), f"train/{cfg.gamma_face.labeler}", "data"), ref(f"{_STAGES}:run_gmm"),
              reads=("gamma_face", "seed")),
        Stage("train/gamma_face", "train", ("gmm", "data"), ref(f"{_STAGES}:run_train_gamma_face"),
              reads=TRAIN_READS),
    ]


register(Method("gamma_face", stage_graph, kinds=("gmm", "train"), config=("gamma_face", GammaFaceConfig),
                pretrained=("diffusion",), check=check,
                synthetic=(SyntheticSet("gmm", "gmm/generated.parquet", "pseudo", cas=False),),
                stats=("gmm",), report=ref(f"{_STAGES}:report_sections"), doc="docs/methods/gamma_face.md"))

__all__ = ["GammaFaceConfig"]
