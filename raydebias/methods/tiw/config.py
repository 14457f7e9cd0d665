"""TIW's config block (``tiw:``)."""

from typing import Literal

from pydantic import Field

from raydebias.config import RESOURCE, Block, Channels


class TIWConfig(Block):
    """TIW (docs/methods/tiw.md): a time-dependent discriminator (train vs the small unbiased ``reference_split``
    sample) and diffusion models trained with TIW-DSM and, for comparison, plain DSM on train ∪ reference,
    via Ray Train (DDP over ``num_workers``). Reported: subgroup proportions and FID of their samples."""

    reference_split: Literal["val"] = Field("val", description="group-balanced split the reference set is drawn from")
    reference_size: int = Field(500, ge=2)
    objectives: list[Literal["dsm", "tiw_paper", "tiw_code"]] = Field(default_factory=lambda: ["dsm", "tiw_paper"])
    disc_steps: int = Field(300, ge=1)
    disc_lr: float = Field(3e-4, gt=0)
    steps: int = Field(1000, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=2)
    block_out_channels: Channels = Field(default_factory=lambda: [64, 128])
    unshuffle: int = Field(4, ge=1)
    num_workers: int = Field(2, ge=0, description="DDP workers; 0 = Ray Train's local mode in one Ray task")
    cpus_per_worker: float = Field(1.0, json_schema_extra=RESOURCE, gt=0)
    num_samples: int = Field(1000, ge=2)
    sample_steps: int = Field(50, ge=2)
    checkpoint_every: int = Field(250, json_schema_extra=RESOURCE, ge=0,
                                  description="steps between resumable checkpoints of each phase (0: none)")
