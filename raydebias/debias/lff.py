"""Generalized cross-entropy, the LfF recipe (Nam et al. 2020) and DiffInject's bias-conflicting mining.

docs/methods/diffinject.md (DiffInject) and the baselines line: the biased classifier f_B is trained with GCE, q = 0.7;
LfF trains f_B with GCE and the debiased model f_D with CE weighted per sample by
w(x) = L_B(x) / (L_B(x) + L_D(x)), the losses being per-sample exponential moving averages (α = 0.7).

**GCE form.** The paper's closed form is L = (1 − p_y^q) / q, whose gradient w.r.t. the logits is

    ∂L/∂z = −p_y^(q−1) · ∂p_y/∂z = −p_y^(q−1) · p_y (e_y − p) = −p_y^q (e_y − p) = p_y^q · ∂CE/∂z,

i.e. CE's gradient scaled by p_y^q (DiffInject eq. 2). The LfF public code (``GeneralizedCELoss``) instead
computes CE · (p_y^q)·q with p_y *detached*: its value differs from the closed form, and its gradient is
q · p_y^q · ∂CE/∂z — exactly q times the closed form's, which only acts as a learning-rate factor q (0.7).
raydebias uses the closed form (``form="paper"``, the default everywhere); ``form="lff_code"`` reproduces the
reference code. As q → 0, (1 − p_y^q)/q → −log p_y, i.e. GCE → CE.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GCE_FORMS = ("paper", "lff_code")


def gce_loss(logits: torch.Tensor, y: torch.Tensor, q: float = 0.7, reduction: str = "mean",
             form: str = "paper") -> torch.Tensor:
    """Generalized cross-entropy of ``logits`` (N, C) against integer targets ``y`` (N,).

    ``form="paper"``: (1 − p_y^q)/q, computed as −expm1(q·log p_y)/q from ``log_softmax`` (stable for tiny p_y
    and for q → 0). ``form="lff_code"``: CE · p_y.detach()^q · q (LfF's code; gradient = q × the paper's).
    ``q == 0`` returns plain cross-entropy (the limit). ``reduction``: "mean", "sum" or "none".
    """
    if form not in GCE_FORMS:
        raise ValueError(f"form must be one of {GCE_FORMS}, got {form!r}")
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    logp_y = F.log_softmax(logits, dim=1).gather(1, y.long().unsqueeze(1)).squeeze(1)
    if q == 0:
        losses = -logp_y
    elif form == "paper":
        losses = -torch.expm1(q * logp_y) / q
    else:
        losses = -logp_y * torch.exp(q * logp_y.detach()) * q
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class GCE:
    """Biased-model recipe: mean GCE (amplifies the easy, bias-aligned samples). Uniform sampling."""

    name = "gce"

    def __init__(self, num_groups: int, q: float = 0.7, form: str = "paper", **_):
        if form not in GCE_FORMS:
            raise ValueError(f"form must be one of {GCE_FORMS}, got {form!r}")
        self.num_groups, self.q, self.form = num_groups, q, form

    def sample_weights(self, labels: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
        return None

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return gce_loss(logits, y, q=self.q, form=self.form)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class LfF:
    """Learning from Failure: a biased model f_B (GCE) and a debiased model f_D (weighted CE), trained together.

    Train-loop contract (beyond the plain recipe interface, flagged by ``needs_index`` / ``needs_biased_logits``):
    the loop keeps a second model f_B with its own parameters and passes, for a batch of dataset rows ``idx``
    (positions 0..N−1 in the training split, the same ``b`` the loop already slices ``d["x"][b]`` with)::

        loss = recipe(logits_d, y, g, idx=torch.as_tensor(b), logits_b=model_b(x))
        loss.backward()            # one backward updates both models: the two terms share no parameters

    Per step, as in the reference code (alinlab/LfF ``train.py``):

    1. per-sample CE of both models (detached) updates the EMA buffers at ``idx``:
       ema[i] ← α·ema[i] + (1−α)·ℓ_i, except that a sample's first update stores ℓ_i itself;
    2. each EMA is divided by its class's maximum EMA over the *whole* training set (so that f_B's and f_D's
       scales are comparable); this needs every row's label: pass ``labels`` at construction, or let the loop's
       ``sample_weights(labels, groups)`` call bind them (it does so once, when unbound);
    3. w_i = L̃_B,i / (L̃_B,i + L̃_D,i + 1e-8) (no gradient);
    4. loss = mean_i GCE(logits_b)_i + mean_i w_i·CE(logits_d)_i.

    The EMA buffers live on the CPU and are per-process: under data parallelism each rank would only see its
    own shard's updates (the per-class max then differs across ranks) — use one worker, or all-gather.
    ``last_weights`` holds the latest batch's w for logging.
    """

    name = "lff"
    needs_index = True
    needs_biased_logits = True

    def __init__(self, num_groups: int, num_samples: int | None = None, labels=None, q: float = 0.7,
                 ema_alpha: float = 0.7, gce_form: str = "paper", normalize_per_class: bool = True, **_):
        if gce_form not in GCE_FORMS:
            raise ValueError(f"gce_form must be one of {GCE_FORMS}, got {gce_form!r}")
        self.num_groups, self.q, self.alpha, self.gce_form = num_groups, q, ema_alpha, gce_form
        self.normalize_per_class = normalize_per_class
        self.labels: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        if labels is not None:
            num_samples = len(labels) if num_samples is None else num_samples
        self._alloc(num_samples)
        if labels is not None:
            self.bind_labels(labels)

    def _alloc(self, n: int | None) -> None:
        n = 0 if n is None else int(n)
        self.ema_b = torch.zeros(n, dtype=torch.float64)
        self.ema_d = torch.zeros(n, dtype=torch.float64)
        self.updated = torch.zeros(n, dtype=torch.bool)

    def bind_labels(self, labels) -> None:
        """Record the training split's labels (for the per-class max); allocates the buffers if needed."""
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).flatten()
        if self.ema_b.numel() == 0:
            self._alloc(len(labels))
        if len(labels) != self.ema_b.numel():
            raise ValueError(f"{len(labels)} labels for {self.ema_b.numel()} EMA entries")
        self.labels = labels.clone()

    def sample_weights(self, labels: np.ndarray, groups: np.ndarray) -> np.ndarray | None:
        if self.labels is None:
            self.bind_labels(labels)
        return None  # uniform sampling; the reweighting is in the loss

    def update_ema(self, idx: torch.Tensor, loss_b: torch.Tensor, loss_d: torch.Tensor) -> None:
        """EMA update at rows ``idx`` with per-sample losses (detached, moved to the CPU)."""
        if self.ema_b.numel() == 0:
            raise RuntimeError("LfF needs num_samples or labels before the first step")
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        for ema, loss in ((self.ema_b, loss_b), (self.ema_d, loss_d)):
            loss = loss.detach().to("cpu", torch.float64)
            keep = torch.where(self.updated[idx], self.alpha, 0.0).to(torch.float64)
            ema[idx] = keep * ema[idx] + (1 - keep) * loss
        self.updated[idx] = True

    def _class_max(self, ema: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            raise RuntimeError("normalize_per_class needs the training labels (labels= or sample_weights())")
        num_classes = int(self.labels.max()) + 1
        cmax = torch.zeros(num_classes, dtype=ema.dtype).scatter_reduce(0, self.labels, ema, "amax")
        return cmax[y].clamp_min(1e-12)

    def weights(self, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """w = L̃_B / (L̃_B + L̃_D + 1e-8) for rows ``idx`` with labels ``y`` from the current EMA buffers."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        y = torch.as_tensor(y, dtype=torch.long).cpu()
        lb, ld = self.ema_b[idx].clone(), self.ema_d[idx].clone()
        if self.normalize_per_class:
            lb = lb / self._class_max(self.ema_b, y)
            ld = ld / self._class_max(self.ema_d, y)
        return lb / (lb + ld + 1e-8)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, *, idx: torch.Tensor,
                 logits_b: torch.Tensor) -> torch.Tensor:
        ce_d = F.cross_entropy(logits, y, reduction="none")
        ce_b = F.cross_entropy(logits_b.detach(), y, reduction="none")
        self.update_ema(idx, ce_b, ce_d)
        w = self.weights(idx, y).to(device=logits.device, dtype=ce_d.dtype)
        self.last_weights = w
        loss_b = gce_loss(logits_b, y, q=self.q, form=self.gce_form)
        return loss_b + (w * ce_d).mean()

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"ema_b": self.ema_b.clone(), "ema_d": self.ema_d.clone(), "updated": self.updated.to(torch.uint8)}
        if self.labels is not None:
            state["labels"] = self.labels.clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        self.ema_b = state["ema_b"].clone().to(torch.float64)
        self.ema_d = state["ema_d"].clone().to(torch.float64)
        self.updated = state["updated"].clone().bool()
        self.labels = state["labels"].clone().long() if "labels" in state else None


class FrozenBiasLfF(LfF):
    """LfF's reweighting with a *frozen* biased model whose per-sample losses are known in advance: Diffusing
    DeBias Recipe II, where the bias amplifier (trained on synthetic images only) replaces LfF's jointly trained
    f_B. w_i = L̃_BA,i / (L̃_BA,i + L̃_D,i + 1e-8) with L_BA the amplifier's fixed CE and L_D the debiased model's
    per-sample CE EMA (α = ``ema_alpha``), both divided by their class maximum as in LfF; loss = mean_i w_i·CE_i.

    ``bias_loss``: the amplifier's CE for every training row (positions 0..N−1, the loop's ``idx``).
    """

    name = "lff_frozen"
    needs_biased_logits = False

    def __init__(self, num_groups: int, bias_loss=None, labels=None, ema_alpha: float = 0.7,
                 normalize_per_class: bool = True, **_):
        if bias_loss is None:
            raise ValueError("FrozenBiasLfF needs bias_loss (the frozen biased model's per-sample CE)")
        bias_loss = torch.as_tensor(np.asarray(bias_loss, dtype=np.float64))
        if bias_loss.ndim != 1 or not torch.isfinite(bias_loss).all() or (bias_loss < 0).any():
            raise ValueError("bias_loss must be a 1-D array of finite, non-negative per-sample losses")
        super().__init__(num_groups, num_samples=len(bias_loss), labels=labels, ema_alpha=ema_alpha,
                         normalize_per_class=normalize_per_class)
        self.ema_b = bias_loss.clone()

    def update_ema(self, idx: torch.Tensor, loss_d: torch.Tensor) -> None:  # type: ignore[override]
        """EMA update of the debiased model's losses only (the biased model's are fixed)."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        loss = loss_d.detach().to("cpu", torch.float64)
        keep = torch.where(self.updated[idx], self.alpha, 0.0).to(torch.float64)
        self.ema_d[idx] = keep * self.ema_d[idx] + (1 - keep) * loss
        self.updated[idx] = True

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor, *,  # type: ignore[override]
                 idx: torch.Tensor) -> torch.Tensor:
        ce_d = F.cross_entropy(logits, y, reduction="none")
        self.update_ema(idx, ce_d)
        w = self.weights(idx, y).to(device=logits.device, dtype=ce_d.dtype)
        self.last_weights = w
        return (w * ce_d).mean()


def mine_conflicting(losses, labels, k: int = 10) -> np.ndarray:
    """DiffInject's mining (eqs. 3–4): per class, the indices of the ``k`` largest per-sample CE losses under f_B.

    Returns int64 dataset indices, classes in ascending order, each class's block sorted by loss descending
    (ties: lower index first). A class with fewer than ``k`` samples contributes all of them.
    """
    losses = losses.detach().cpu().numpy() if isinstance(losses, torch.Tensor) else np.asarray(losses)
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    losses, labels = losses.reshape(-1), labels.reshape(-1)
    if len(losses) != len(labels):
        raise ValueError(f"{len(losses)} losses for {len(labels)} labels")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    out = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        order = np.argsort(-losses[rows], kind="stable")
        out.append(rows[order[:k]])
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)
