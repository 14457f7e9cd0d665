"""Group-robustness and GAMMA-FACE bias metrics (pure numpy).

Two families live here:

* **Group metrics** for datasets with a class label ``y`` (``C`` values) and a bias
  label ``a`` (``B`` values); group id ``g = y * B + a``. :func:`group_metrics` returns
  the JSON-ready dict written to ``metrics.json``: overall accuracy, per-group accuracy,
  WGA (worst group), AGA (unweighted mean over groups = "unbiased accuracy" on a
  group-balanced test), the *adjusted average* (group accuracies weighted by **training**
  group proportions, the WILDS/GroupDRO convention -- not the same thing as AGA), and
  accuracy on bias-aligned vs bias-conflicting groups.
* **GAMMA-FACE bias metrics** (GAMMA-FACE §3.5) for a binary target attribute ``A_t``
  and a protected attribute ``A_p``: Bias (weighted TPR gap), BPC, BA and the
  symmetric score KL, plus one-vs-rest multiclass wrappers.

Conventions: a group that has no samples in the evaluated split is *absent* and is
skipped (never counted as accuracy 0). Undefined scalar metrics are returned as
``float("nan")``; :func:`group_metrics` uses ``None`` instead so its output stays
strict JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "group_ids",
    "group_accuracy",
    "group_metrics",
    "group_key",
    "true_positive_rate",
    "multiclass_tpr",
    "tpr_by_group",
    "bias_tpr_gap",
    "bpc",
    "bias_amplification",
    "score_kl",
    "multiclass_bias",
    "multiclass_ba",
]


# --------------------------------------------------------------------------- helpers
def _as_1d(name: str, x: ArrayLike) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} must not be None")
    arr = np.asarray(x)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D array, got a scalar")
    if arr.ndim > 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"length mismatch: {desc}")


def _as_int_labels(name: str, x: np.ndarray, upper: int | None = None) -> np.ndarray:
    if x.dtype == bool:
        x = x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        if np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
            x = x.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer labels, got dtype {x.dtype}")
    if x.min() < 0:
        raise ValueError(f"{name} has negative labels (min {x.min()})")
    if upper is not None and x.max() >= upper:
        raise ValueError(f"{name} has label {x.max()} >= {upper}")
    return x.astype(np.int64)


def _py(v: Any) -> Any:
    """numpy scalar -> python scalar (for dict keys / JSON)."""
    return v.item() if isinstance(v, np.generic) else v


def group_key(y: int, a: int) -> str:
    """String key ``"y,a"`` used in :func:`group_metrics` output."""
    return f"{int(y)},{int(a)}"


# --------------------------------------------------------------------- group metrics
def group_ids(labels: ArrayLike, bias: ArrayLike, num_bias: int) -> np.ndarray:
    """Group id ``g = y * num_bias + a`` for every sample."""
    if num_bias < 1:
        raise ValueError(f"num_bias must be >= 1, got {num_bias}")
    y = _as_1d("labels", labels)
    a = _as_1d("bias", bias)
    _check_same_length(labels=y, bias=a)
    y = _as_int_labels("labels", y)
    a = _as_int_labels("bias", a, num_bias)
    return y * num_bias + a


def group_accuracy(y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike) -> dict[int, float]:
    """Accuracy per group id, for groups present in ``groups`` (empty groups skipped)."""
    yt = _as_1d("y_true", y_true)
    yp = _as_1d("y_pred", y_pred)
    g = _as_1d("groups", groups)
    _check_same_length(y_true=yt, y_pred=yp, groups=g)
    correct = yt == yp
    out: dict[int, float] = {}
    for gid in np.unique(g):
        m = g == gid
        out[int(gid)] = float(correct[m].mean())
    return out


def _train_counts_array(train_group_counts: Any, num_classes: int, num_bias: int) -> np.ndarray:
    if isinstance(train_group_counts, Mapping):
        arr = np.zeros((num_classes, num_bias), dtype=np.float64)
        for k, v in train_group_counts.items():
            if isinstance(k, str):
                parts = k.split(",")
                if len(parts) != 2:
                    raise ValueError(f"train_group_counts key {k!r} is not of the form 'y,a'")
                y, a = int(parts[0]), int(parts[1])
            else:
                y, a = (int(t) for t in k)
            if not (0 <= y < num_classes and 0 <= a < num_bias):
                raise ValueError(f"train_group_counts key {k!r} out of range ({num_classes}, {num_bias})")
            arr[y, a] = float(v)
    else:
        arr = np.asarray(train_group_counts, dtype=np.float64)
        if arr.shape != (num_classes, num_bias):
            raise ValueError(
                f"train_group_counts must have shape ({num_classes}, {num_bias}), got {arr.shape}"
            )
    if np.any(arr < 0) or not np.all(np.isfinite(arr)):
        raise ValueError("train_group_counts must be finite and non-negative")
    return arr


def group_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    bias: ArrayLike | None,
    num_classes: int,
    num_bias: int,
    train_group_counts: ArrayLike | Mapping[str, float] | None = None,
    aligned: ArrayLike | None = None,
) -> dict[str, Any]:
    """JSON-serialisable group metrics for ``metrics.json``.

    Keys: ``accuracy``, ``per_group`` ("y,a" -> acc), ``group_counts`` ("y,a" -> n test),
    ``wga`` (min over present groups), ``aga`` (unweighted mean over present groups),
    ``adjusted_avg`` (present-group accuracies weighted by *training* group proportions,
    renormalised over groups present in the test split; ``None`` without
    ``train_group_counts``), ``aligned_acc`` / ``conflicting_acc`` (unweighted mean over
    present aligned / conflicting groups), ``worst_group`` ("y,a" of the WGA group).

    ``aligned`` is an optional (C, B) bool array marking bias-aligned (y, a); if ``None``
    it is inferred from ``train_group_counts`` as the most frequent bias value of each
    class (first on ties; classes with no training samples have no aligned group).
    If ``bias`` is ``None`` only ``accuracy`` is filled; every group field is ``None``. Rows with an unknown bias
    (negative) count in ``accuracy`` and in ``unknown_bias`` but in no group.
    """
    if num_classes < 1 or num_bias < 1:
        raise ValueError(f"num_classes and num_bias must be >= 1, got {num_classes}, {num_bias}")
    yt = _as_1d("y_true", y_true)
    yp = _as_1d("y_pred", y_pred)
    _check_same_length(y_true=yt, y_pred=yp)
    yt = _as_int_labels("y_true", yt, num_classes)
    out: dict[str, Any] = {
        "accuracy": float(np.mean(yt == np.asarray(yp))),
        "per_group": None,
        "group_counts": None,
        "wga": None,
        "aga": None,
        "adjusted_avg": None,
        "aligned_acc": None,
        "conflicting_acc": None,
        "worst_group": None,
    }
    if bias is None:
        return out

    a = _as_1d("bias", bias)
    _check_same_length(y_true=yt, bias=a)
    known = np.asarray(a) >= 0  # an unknown bias (-1) is in no group: counted, left out of the group metrics
    out["unknown_bias"] = int((~known).sum())
    if not known.any():
        return out
    yt, yp, a = yt[known], np.asarray(yp)[known], np.asarray(a)[known]
    g = group_ids(yt, a, num_bias)
    accs = group_accuracy(yt, yp, g)  # sorted by group id
    gids = np.array(sorted(accs), dtype=np.int64)
    acc_vec = np.array([accs[int(k)] for k in gids])
    counts = np.bincount(g, minlength=num_classes * num_bias)
    keys = [group_key(k // num_bias, k % num_bias) for k in gids]

    out["per_group"] = {k: float(v) for k, v in zip(keys, acc_vec)}
    out["group_counts"] = {k: int(counts[gid]) for k, gid in zip(keys, gids)}
    worst = int(np.argmin(acc_vec))
    out["wga"] = float(acc_vec[worst])
    out["worst_group"] = keys[worst]
    out["aga"] = float(acc_vec.mean())

    train = None
    if train_group_counts is not None:
        train = _train_counts_array(train_group_counts, num_classes, num_bias)
        w = train.reshape(-1)[gids]
        if w.sum() > 0:
            out["adjusted_avg"] = float(np.sum(w * acc_vec) / w.sum())

    if aligned is not None:
        al = np.asarray(aligned, dtype=bool)
        if al.shape != (num_classes, num_bias):
            raise ValueError(f"aligned must have shape ({num_classes}, {num_bias}), got {al.shape}")
    elif train is not None:
        al = np.zeros((num_classes, num_bias), dtype=bool)
        for c in range(num_classes):
            if train[c].sum() > 0:
                al[c, int(np.argmax(train[c]))] = True
    else:
        al = None

    if al is not None:
        is_al = al.reshape(-1)[gids]
        if is_al.any():
            out["aligned_acc"] = float(acc_vec[is_al].mean())
        if (~is_al).any():
            out["conflicting_acc"] = float(acc_vec[~is_al].mean())
    return out


# ------------------------------------------------------------- GAMMA-FACE bias metrics
def _binary_inputs(
    y_true: ArrayLike, y_pred: ArrayLike, protected: ArrayLike, positive: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yt = _as_1d("y_true", y_true)
    yp = _as_1d("y_pred", y_pred)
    p = _as_1d("protected", protected)
    _check_same_length(y_true=yt, y_pred=yp, protected=p)
    return yt == positive, yp == positive, p


def true_positive_rate(y_true: ArrayLike, y_pred: ArrayLike, positive: Any = 1) -> float:
    """TPR = P(y_pred == positive | y_true == positive); ``nan`` if there are no positives."""
    yt = _as_1d("y_true", y_true)
    yp = _as_1d("y_pred", y_pred)
    _check_same_length(y_true=yt, y_pred=yp)
    pos = yt == positive
    if not pos.any():
        return float("nan")
    return float(np.mean(yp[pos] == positive))


def multiclass_tpr(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Mean one-vs-rest TPR over classes present in ``y_true`` (= balanced accuracy)."""
    yt = _as_int_labels("y_true", _as_1d("y_true", y_true), num_classes)
    yp = _as_1d("y_pred", y_pred)
    _check_same_length(y_true=yt, y_pred=yp)
    vals = [true_positive_rate(yt == c, yp == c, True) for c in range(num_classes) if (yt == c).any()]
    return float(np.mean(vals))


def tpr_by_group(
    y_true: ArrayLike, y_pred: ArrayLike, protected: ArrayLike, positive: Any = 1
) -> dict[Any, float]:
    """TPR of the target (``== positive``) per protected value.

    Protected values that have no positive samples (TPR undefined) are omitted.
    """
    pos_t, pos_p, p = _binary_inputs(y_true, y_pred, protected, positive)
    out: dict[Any, float] = {}
    for v in np.unique(p):
        m = (p == v) & pos_t
        if m.any():
            out[_py(v)] = float(pos_p[m].mean())
    return out


def bias_tpr_gap(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    protected: ArrayLike,
    positive: Any = 1,
    weighting: Literal["all", "positives"] = "all",
) -> float:
    """GAMMA-FACE Bias(A_t), eq. 12: weighted mean over pairs i<j of |TPR_i - TPR_j|.

    Pair weight is ``w_i * w_j``. The paper leaves ``w`` unspecified; we use the
    frequency of each protected value among **all** samples (``weighting="all"``,
    default) or among the target positives (``weighting="positives"``). We use the
    **absolute** TPR difference (the paper's signed form depends on the arbitrary
    order of protected values). Protected values with no positives are excluded;
    returns ``nan`` if fewer than two values have a defined TPR.
    """
    if weighting not in ("all", "positives"):
        raise ValueError(f"weighting must be 'all' or 'positives', got {weighting!r}")
    pos_t, _, p = _binary_inputs(y_true, y_pred, protected, positive)
    tprs = tpr_by_group(y_true, y_pred, protected, positive)
    vals = list(tprs)
    if len(vals) < 2:
        return float("nan")
    base = p if weighting == "all" else p[pos_t]
    w = {v: float(np.mean(base == v)) for v in vals}
    num = den = 0.0
    for i in range(len(vals)):
        for j in range(i + 1, len(vals)):
            wij = w[vals[i]] * w[vals[j]]
            num += abs(tprs[vals[i]] - tprs[vals[j]]) * wij
            den += wij
    return float(num / den) if den > 0 else float("nan")


def bpc(bias_base: float, bias_deb: float, tpr_base: float, tpr_deb: float) -> float:
    """Bias Performance Coefficient, eq. 13: ``(B - B_deb)/B - (TPR - TPR_deb)/TPR``.

    Higher is better. ``nan`` if ``bias_base`` or ``tpr_base`` is 0 (undefined).
    """
    if bias_base == 0 or tpr_base == 0:
        return float("nan")
    return float((bias_base - bias_deb) / bias_base - (tpr_base - tpr_deb) / tpr_base)


def bias_amplification(
    y_true_target: ArrayLike,
    y_pred_target: ArrayLike,
    protected: ArrayLike,
    positive: Any = 1,
    protected_value: Any | None = None,
    form: Literal["paper", "zhao"] = "paper",
    signs: dict[Any, float] | None = None,
) -> float:
    """Bias amplification of target ``A_t`` (``== positive``) w.r.t. protected ``A_p``.

    For a protected value ``a`` (event ``A_p = a``), with ``P = P(A_t | A_p)`` from the
    true labels and ``P~ = P(predicted A_t | A_p)``:

    * ``form="paper"`` (GAMMA-FACE eq. 14, literal): ``s * (P - P~) / P~``
    * ``form="zhao"`` (Zhao et al. 2017 / Wang & Russakovsky 2021 difference):
      ``s * (P~ - P)``

    with ``s = +1`` if ``P(A_t, A_p) > P(A_t) P(A_p)`` and ``-1`` otherwise (the paper's
    "otherwise" branch, so exact independence also gets ``-1``). Note the paper's form
    is *negative* when predictions amplify a positive correlation (P~ > P); "zhao" is
    positive then. ``protected_value=None`` averages over every protected value present;
    values where the term is undefined (``P~ = 0`` in the paper form) are skipped and
    ``nan`` is returned if none is defined. ``signs`` ({protected value: ±1}) overrides s, e.g. with the sign of
    the *training* correlation: on a group-balanced test set the evaluated set's own correlation is zero.
    """
    if form not in ("paper", "zhao"):
        raise ValueError(f"form must be 'paper' or 'zhao', got {form!r}")
    pos_t, pos_p, p = _binary_inputs(y_true_target, y_pred_target, protected, positive)
    values = np.unique(p) if protected_value is None else np.array([protected_value])
    n, n_t = len(p), int(pos_t.sum())
    terms = []
    for v in values:
        m = p == v
        n_a = int(m.sum())
        if n_a == 0:
            raise ValueError(f"protected_value {_py(v)!r} does not occur in protected")
        n_ta = int((pos_t & m).sum())
        p_true = n_ta / n_a
        p_pred = float(pos_p[m].mean())
        # P(A_t, A_p) > P(A_t) P(A_p)  <=>  n_ta * n > n_t * n_a  (exact in integers)
        s = 1.0 if n_ta * n > n_t * n_a else -1.0
        if signs is not None:
            s = float(signs[_py(v)])
        if form == "paper":
            if p_pred == 0:
                continue
            terms.append(s * (p_true - p_pred) / p_pred)
        else:
            terms.append(s * (p_pred - p_true))
    return float(np.mean(terms)) if terms else float("nan")


def _gaussian_smooth(h: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian filter, 'reflect' boundary (matches scipy.ndimage.gaussian_filter1d)."""
    if sigma <= 0:
        return h
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(h, r, mode="symmetric")
    return np.convolve(padded, k, mode="valid")


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def score_kl(
    scores: ArrayLike,
    protected: ArrayLike,
    bins: int = 20,
    eps: float = 1e-6,
    sigma: float = 1.0,
    value_range: tuple[float, float] | None = None,
    positive: Any = 1,
) -> float:
    """Symmetric KL (GAMMA-FACE eq. 15) between score histograms of A_p=+ and A_p=-.

    ``A_p=+`` is ``protected == positive``; ``A_p=-`` is every other sample. Both
    histograms share ``bins`` equal bins over ``value_range`` (default ``(0, 1)`` when
    all scores lie there, else ``[min, max]``). Each histogram is smoothed with a
    Gaussian of ``sigma`` bins (``sigma=0`` disables; Ramaswamy et al. use 1),
    normalised, then ``eps`` is added to every bin and it is renormalised. Returns
    ``KL(S- || S+) + KL(S+ || S-)``. To condition on the target label (the paper's
    ``S_{A_p, A_t}``), pass the scores of samples with that label only.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    s = _as_1d("scores", scores).astype(np.float64)
    p = _as_1d("protected", protected)
    _check_same_length(scores=s, protected=p)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    plus = p == positive
    if plus.all() or not plus.any():
        raise ValueError("score_kl needs samples in both A_p=+ and A_p=- groups")
    if value_range is None:
        lo, hi = (0.0, 1.0) if (s.min() >= 0 and s.max() <= 1) else (float(s.min()), float(s.max()))
    else:
        lo, hi = value_range
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)

    def dist(x: np.ndarray) -> np.ndarray:
        h = np.histogram(x, bins=edges)[0].astype(np.float64)
        h = _gaussian_smooth(h, sigma)
        h = h / h.sum() + eps
        return h / h.sum()

    s_plus, s_minus = dist(s[plus]), dist(s[~plus])
    return _kl(s_minus, s_plus) + _kl(s_plus, s_minus)


def multiclass_bias(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    bias: ArrayLike,
    num_classes: int,
    weighting: Literal["all", "positives"] = "all",
) -> float:
    """Mean over classes of one-vs-rest :func:`bias_tpr_gap` (target ``y == c``, A_p = bias).

    Classes whose gap is undefined (absent, or positives in < 2 bias values) are
    skipped; ``nan`` if none is defined.
    """
    yt = _as_int_labels("y_true", _as_1d("y_true", y_true), num_classes)
    yp = _as_1d("y_pred", y_pred)
    a = _as_1d("bias", bias)
    _check_same_length(y_true=yt, y_pred=yp, bias=a)
    vals = [bias_tpr_gap(yt == c, yp == c, a, True, weighting) for c in range(num_classes)]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def multiclass_ba(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    bias: ArrayLike,
    num_classes: int,
    form: Literal["paper", "zhao"] = "paper",
    train_group_counts: Any | None = None,
) -> float:
    """Mean over classes present in ``y_true`` of one-vs-rest :func:`bias_amplification`.

    Undefined (``nan``) classes are skipped; ``nan`` if none is defined. ``train_group_counts`` ((C, B) counts of
    the training split) makes the sign of each (class, bias value) term that of the *training* correlation
    (Zhao et al. 2017 measure how predictions amplify the training correlation); without it the sign comes from
    the evaluated labels, which is always −1 on a group-balanced test.
    """
    yt = _as_int_labels("y_true", _as_1d("y_true", y_true), num_classes)
    yp = _as_1d("y_pred", y_pred)
    a = _as_1d("bias", bias)
    _check_same_length(y_true=yt, y_pred=yp, bias=a)
    signs: list[dict | None] = [None] * num_classes
    if train_group_counts is not None:
        n = np.asarray(train_group_counts, dtype=np.int64)
        total, n_c, n_v = n.sum(), n.sum(1), n.sum(0)
        signs = [{v: (1.0 if n[c, v] * total > n_c[c] * n_v[v] else -1.0) for v in range(n.shape[1])}
                 for c in range(num_classes)]
    vals = [
        bias_amplification(yt == c, yp == c, a, True, None, form, signs=signs[c])
        for c in range(num_classes)
        if (yt == c).any()
    ]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def conflicting_mask(y: np.ndarray, a: np.ndarray, train_group_counts) -> np.ndarray:
    """True where (y, a) is not the majority (aligned) bias value of class y in train."""
    aligned = np.asarray(train_group_counts).argmax(1)
    return a != aligned[y]


def error_set_quality(correct: np.ndarray, conflicting: np.ndarray) -> dict[str, Any]:
    """Precision / recall / F1 of the error set (``~correct``) as a detector of the conflicting set."""
    err = ~np.asarray(correct, bool)
    conf = np.asarray(conflicting, bool)
    tp = int((err & conf).sum())
    precision = tp / err.sum() if err.sum() else None
    recall = tp / conf.sum() if conf.sum() else None
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else 0.0
    return {"errors": int(err.sum()), "conflicting": int(conf.sum()), "precision": precision, "recall": recall,
            "f1": f1}
