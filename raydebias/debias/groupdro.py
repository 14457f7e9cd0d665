"""GroupDRO (Sagawa et al. 2020): online mirror ascent on group weights, group-balanced sampling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def group_balanced_weights(groups: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Per-sample sampling weights n_g^-τ: group g is drawn ∝ n_g^(1-τ). τ = 1 (default): every present group
    equally often; τ = 0: as in the data; in between, tempered (the bootstrap generator's ``group_balance``)."""
    counts = np.bincount(groups)
    return 1.0 / counts[groups] ** float(tau)


def group_mixture_probs(groups: np.ndarray, mix: float, tau: float = 0.0) -> np.ndarray:
    """Per-sample draw probabilities (sum 1): a fraction ``mix`` of draws uniform over the present groups, the rest
    by :func:`group_balanced_weights` with ``tau`` (0: as in the data)."""
    base = group_balanced_weights(groups, tau)
    base = base / base.sum()
    if mix <= 0:
        return base
    uniform = group_balanced_weights(groups)
    return (1.0 - mix) * base + mix * uniform / uniform.sum()


class GroupDRO:
    """q_g ← q_g·exp(η·L_g), normalised; loss = Σ_g q_g L_g with L_g the batch's mean loss on group g.

    Groups absent from a batch contribute L_g = 0 (as in the reference implementation).
    """

    name = "groupdro"

    def __init__(self, num_groups: int, eta: float = 0.01, **_):
        self.num_groups = num_groups
        self.eta = eta
        self.q = torch.full((num_groups,), 1.0 / num_groups)

    def sample_weights(self, labels: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
        return group_balanced_weights(groups)

    def group_losses(self, losses: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(self.num_groups, dtype=losses.dtype, device=losses.device).index_add(0, g, losses)
        counts = torch.bincount(g, minlength=self.num_groups).to(losses.dtype)
        return sums / counts.clamp_min(1), counts

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        losses = F.cross_entropy(logits, y, reduction="none")
        group_loss, _ = self.group_losses(losses, g)
        q = self.q.to(losses.device) * torch.exp(self.eta * group_loss.detach())
        self.q = (q / q.sum()).cpu()
        return (self.q.to(losses.device) * group_loss).sum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.q = state["q"].clone()
