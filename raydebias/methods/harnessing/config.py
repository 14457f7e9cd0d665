"""The two-stage classifier's config block (``two_stage:``), read by every "Harnessing diffusion" variant."""

from typing import Literal

from pydantic import Field, field_validator

from raydebias.config import Block

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
