"""Diffusing DeBias's config block (``ddb:``), shared by Recipe I and Recipe II."""

from typing import Any, Literal

from pydantic import Field, model_validator

from raydebias.config import RESOURCE, Block

# keys of the class-conditional model, which has its own block (read by DiffInject and GAMMA-FACE too)
_MOVED = ("prompt_template", "steps", "batch_size", "lr")


class DiffusingDebiasConfig(Block):
    """Diffusing DeBias (docs/methods/diffusing_debias.md): samples of the class-conditional model (``class_diffusion``;
    captions carry the class only, so no bias labels are needed) → bias amplifier trained on them alone → Recipe I:
    pseudo-groups (y, amplifier correct) on the real training split → GroupDRO; Recipe II: the frozen amplifier's
    loss reweights the debiased model's (LfF)."""

    images_per_class: int = Field(200, ge=1)
    num_steps: int = Field(10, ge=1, description="DDIM steps")
    guidance_scale: float = Field(2.0, ge=0, description="diffusers scale; the paper's weight 1 = (1 + w) form → 2")
    amplifier_epochs: int = Field(8, ge=1)
    recipe: Literal["groupdro"] = Field("groupdro", description="Recipe I's objective over the pseudo-groups")
    lff_ema: float = Field(0.7, ge=0, lt=1, description="Recipe II: EMA of the debiased model's per-sample loss")
    num_cpus: float = Field(2.0, json_schema_extra=RESOURCE, gt=0, description="sampling tasks (one CPU each)")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = [k for k in _MOVED if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{', '.join(moved)}: the class-conditional model's settings are in their own block: "
                             + ", ".join(f"class_diffusion.{k}" for k in moved))
        return data
