"""DiffInject's config block (``diffinject:``)."""

from pydantic import Field

from raydebias.config import RESOURCE, Block


class DiffInjectConfig(Block):
    """DiffInject (docs/methods/diffinject.md): GCE-biased classifier → top-K CE rows per class (bias-conflicting) → their
    h-space content injected into randomly chosen aligned images (DDIM inversion, Slerp for t ≥ t_edit, the
    asymmetric step, stochastic below t_boost) → retrain on real ∪ synthetic. Uses the ``class_diffusion`` model
    unconditionally (``prompt`` "")."""

    gce_q: float = Field(0.7, gt=0, le=1)
    biased_epochs: int = Field(5, ge=1, description="GCE epochs; the last one is kept (no val selection)")
    top_k: int = Field(10, ge=1, description="mined rows per class (the code's K = 10)")
    bias_conflict_ratio: float = Field(0.2, gt=0, description="synthetic images = ratio × |non-mined rows|")
    num_steps: int = Field(20, ge=2, description="DDIM steps for inversion and generation")
    t_edit: int = Field(400, ge=0, le=1000, description="inject h for t ≥ t_edit (of 1000)")
    t_boost: int = Field(200, ge=0, le=1000, description="stochastic (η) steps for t < t_boost")
    gamma: float = Field(0.3, ge=0, le=1, description="content injection ratio of the Slerp")
    eta: float = Field(1.0, ge=0, le=1)
    prompt: str = Field("", description="the conditioning of every UNet call; '' = unconditional")
    pairs_per_task: int = Field(128, ge=1, description="pairs per Ray task (one output part each)")
    cpus_per_task: float = Field(1.0, json_schema_extra=RESOURCE, gt=0)
