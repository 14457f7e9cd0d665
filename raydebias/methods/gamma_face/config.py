"""GAMMA-FACE's config block (``gamma_face:``) and the check of a run config that uses it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raydebias.config import RESOURCE, Block
from raydebias.core import get_method


class GammaFaceConfig(Block):
    """GAMMA-FACE (docs/methods/gamma_face.md): latents at an intermediate step of the (unconditional) ``class_diffusion`` model's reverse
    process → diagonal GMM, K by BIC over 1..k_max → equal sampling per component → pseudo-labels from the ``labeler``
    classifier → retrain on real ∪ generated (``mix_ratio`` generated : original)."""

    latents: Literal["forward", "reverse"] = Field(
        "forward", description="forward: real training images noised to the split level (paper §4.3); reverse: "
                               "the model's own unconditional trajectories stopped there")
    num_latents: int = Field(1000, ge=2, description="latents that fit the GMM")
    num_steps: int = Field(10, ge=2, description="DDIM steps of the whole reverse process")
    t_frac: float = Field(0.7, gt=0, lt=1, description="where the latents are taken (fraction of the steps done; "
                                                      "0.7 of 10 trailing steps = t 299)")
    k_max: int = Field(11, ge=1)
    mix_ratio: float = Field(1.0, gt=0, description="generated : original images (paper's best 1:1)")
    labeler: str = Field("erm", description="the trained classifier (a baseline of this run) giving pseudo-labels")
    min_confidence: float = Field(0.0, ge=0, lt=1, description="drop generated images labelled below this")
    num_cpus: float = Field(2.0, json_schema_extra=RESOURCE, gt=0)


def check(cfg) -> None:
    """The labeler is another classifier method of the same run (it trains first)."""
    labelers = [m for m in cfg.methods if m != "gamma_face" and get_method(m).classifier]
    if cfg.gamma_face.labeler not in labelers:
        raise ValueError(f"gamma_face.labeler={cfg.gamma_face.labeler!r} must be another method of this run "
                         f"(e.g. add it to baselines); have {cfg.methods}")
