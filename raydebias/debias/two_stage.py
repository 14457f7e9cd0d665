"""Two-stage classifier of "Harnessing diffusion" (docs/methods/clustered_dreambooth.md): β·CE + (1−β)·SupCon on the filtered synthetic
set, then last-layer retraining (LLR) on the real training split with the encoder frozen (or, FT_b, the whole
network on group-balanced real batches; FT_mix, the whole network on group-balanced batches of real ∪ synthetic)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# stage 2 variants: (recipe, sampler, whole network trained?, data)
_STAGE2 = {"all": ("erm", "class_balanced", False, "train"), "balanced": ("erm", "group_balanced", False, "train"),
           "groupdro": ("groupdro", "recipe", False, "train"), "ft_balanced": ("erm", "group_balanced", True, "train"),
           "ft_mixed": ("erm", "group_balanced", True, "train+synthetic")}


def two_stage_phases(ts) -> list[dict[str, Any]]:
    """The phases of :func:`raydebias.debias.train.fit_classifier` for a ``TwoStageConfig``: synthetic
    pre-training, then stage 2 on the real train split (or, ``ft_mixed``, on real ∪ synthetic). Every epoch of
    every phase is a candidate of the selection on val, so a stage 2 that undoes the synthetic pre-training (at
    99.9 % aligned, fine-tuning on real data drifts back to the bias: BENCHMARKS.md, "Round 10") keeps the better
    model. With several ``llr`` variants, each starts from the pre-trained model and val picks among them."""
    variants = [ts.llr] if isinstance(ts.llr, str) else list(ts.llr)
    phases = [{"name": "synthetic", "data": "synthetic", "recipe": "supcon_ce", "epochs": ts.epochs_synthetic,
               "sampler": "uniform", "lr": ts.lr, "recipe_args": {"beta": ts.beta, "temperature": ts.temperature},
               "select": True}]
    for v in variants:
        recipe, sampler, full, data = _STAGE2[v]
        phases.append({"name": v if full else f"llr_{v}", "data": data, "recipe": recipe, "epochs": ts.epochs_llr,
                       "sampler": sampler, "lr": ts.lr if full else ts.llr_lr, "freeze_encoder": not full,
                       "select": True, **({"from": "synthetic"} if len(variants) > 1 else {})})
    return phases


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the L_out form) on L2-normalised ``features``.

    For anchor i with positives P(i) (same label, j ≠ i):
    ℓ_i = −1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) ); the loss is the mean of ℓ_i over
    all anchors, where anchors without positives contribute 0 (the reference code's guard; never NaN).
    """
    z = F.normalize(features, dim=1)
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1) / n_pos.clamp_min(1)
    return torch.where(n_pos > 0, per_anchor, torch.zeros_like(per_anchor)).mean()


class SupConCE:
    """Stage-1 objective: β·CE(logits) + (1−β)·SupCon(features)."""

    name = "supcon_ce"
    needs_features = True

    def __init__(self, num_groups: int, beta: float = 0.5, temperature: float = 0.07, **_):
        self.beta, self.temperature = beta, temperature

    def sample_weights(self, labels, groups):
        return None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.beta * F.cross_entropy(logits, y) + (1 - self.beta) * supcon_loss(features, y, self.temperature)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state) -> None:
        pass
