"""ERM: plain cross-entropy on uniformly shuffled data."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class ERM:
    """Empirical risk minimisation. ``groups`` are ignored (kept for a uniform recipe interface)."""

    name = "erm"

    def __init__(self, num_groups: int, **_):
        self.num_groups = num_groups

    def sample_weights(self, labels: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
        return None  # uniform sampling without replacement

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass
