"""Tests for raydebias.evaluate.metrics (reference libs + hand-computed golden values)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raydebias.evaluate import metrics as M


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def rand_groups():
    rng = np.random.default_rng(0)
    n, C, B = 600, 3, 4
    y = rng.integers(0, C, n)
    a = rng.integers(0, B, n)
    # predictions correct with a group-dependent probability so groups differ
    p_correct = 0.3 + 0.6 * ((y * B + a) % 5) / 4
    correct = rng.random(n) < p_correct
    pred = np.where(correct, y, (y + 1 + rng.integers(0, C - 1, n)) % C)
    return y, pred, a, C, B


@pytest.fixture
def tiny_groups():
    # C=2, B=2. Groups and predictions:
    #   (0,0): 4 samples, preds 0,0,0,1 -> acc 3/4
    #   (0,1): 2 samples, preds 0,1     -> acc 1/2
    #   (1,0): 2 samples, preds 0,0     -> acc 0
    #   (1,1): 4 samples, preds 1,1,1,0 -> acc 3/4
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    a = np.array([0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])
    p = np.array([0, 0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0])
    train = np.array([[90, 10], [20, 80]])
    return y, p, a, train


# ---------------------------------------------------------------------- group metrics
def test_group_ids():
    g = M.group_ids([0, 1, 2, 2], [3, 0, 1, 4], num_bias=5)
    # y*5 + a: 0*5+3, 1*5+0, 2*5+1, 2*5+4
    np.testing.assert_array_equal(g, [3, 5, 11, 14])


def test_group_accuracy_skips_empty():
    acc = M.group_accuracy([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], groups=[2, 2, 7, 7, 7])
    assert acc == {2: 0.5, 7: pytest.approx(2 / 3)}


def test_group_metrics_match_fairlearn(rand_groups):
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score

    y, pred, a, C, B = rand_groups
    mf = MetricFrame(
        metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features={"y": y, "a": a}
    )
    out = M.group_metrics(y, pred, a, C, B)
    assert out["accuracy"] == pytest.approx(mf.overall)
    assert out["wga"] == pytest.approx(mf.group_min())
    assert out["aga"] == pytest.approx(mf.by_group.mean())
    by_group = {f"{yy},{aa}": v for (yy, aa), v in mf.by_group.items()}
    assert set(out["per_group"]) == set(by_group)
    for k, v in by_group.items():
        assert out["per_group"][k] == pytest.approx(v), k
    ya, aa = out["worst_group"].split(",")
    assert mf.by_group.loc[(int(ya), int(aa))] == pytest.approx(mf.group_min())
    # group_counts sum to n and match a direct count for one group
    assert sum(out["group_counts"].values()) == len(y)
    assert out["group_counts"]["2,3"] == int(np.sum((y == 2) & (a == 3)))
    json.dumps(out, allow_nan=False)


def test_unknown_bias_is_left_out_of_groups(rand_groups):
    from fairlearn.metrics import MetricFrame
    from sklearn.metrics import accuracy_score

    y, pred, a, C, B = rand_groups
    a = np.array(a, copy=True)
    a[::7] = -1  # unknown bias in val/test (a null in the dataset)
    known = a >= 0
    out = M.group_metrics(y, pred, a, C, B)
    mf = MetricFrame(metrics=accuracy_score, y_true=y[known], y_pred=pred[known],
                     sensitive_features={"y": y[known], "a": a[known]})
    assert out["unknown_bias"] == int((~known).sum()) > 0
    assert out["accuracy"] == pytest.approx(np.mean(y == pred))  # every row counts in overall accuracy
    assert out["wga"] == pytest.approx(mf.group_min()) and out["aga"] == pytest.approx(mf.by_group.mean())
    assert sum(out["group_counts"].values()) == int(known.sum())
    none = M.group_metrics(y, pred, np.full_like(a, -1), C, B)
    assert none["wga"] is None and none["unknown_bias"] == len(y)


def test_group_metrics_golden(tiny_groups):
    y, p, a, train = tiny_groups
    out = M.group_metrics(y, p, a, 2, 2, train_group_counts=train)
    assert out["accuracy"] == pytest.approx(7 / 12)  # 3+1+0+3 correct of 12
    assert out["per_group"] == {"0,0": 0.75, "0,1": 0.5, "1,0": 0.0, "1,1": 0.75}
    assert out["group_counts"] == {"0,0": 4, "0,1": 2, "1,0": 2, "1,1": 4}
    assert out["wga"] == 0.0
    assert out["worst_group"] == "1,0"
    assert out["aga"] == pytest.approx(0.5)  # (0.75+0.5+0+0.75)/4
    # train proportions 90,10,20,80 / 200 = .45,.05,.10,.40
    # .45*.75 + .05*.5 + .10*0 + .40*.75 = .3375+.025+0+.3 = .6625
    assert out["adjusted_avg"] == pytest.approx(0.6625)
    # inferred aligned: class 0 -> a=0 (90>10), class 1 -> a=1 (80>20)
    assert out["aligned_acc"] == pytest.approx(0.75)  # (0.75+0.75)/2
    assert out["conflicting_acc"] == pytest.approx(0.25)  # (0.5+0)/2
    json.dumps(out, allow_nan=False)


def test_group_metrics_dict_counts_and_explicit_aligned(tiny_groups):
    y, p, a, _ = tiny_groups
    counts = {"0,0": 90, "0,1": 10, "1,0": 20, "1,1": 80}
    aligned = np.array([[False, True], [True, False]])
    out = M.group_metrics(y, p, a, 2, 2, train_group_counts=counts, aligned=aligned)
    assert out["adjusted_avg"] == pytest.approx(0.6625)
    assert out["aligned_acc"] == pytest.approx(0.25)  # groups (0,1),(1,0): (0.5+0)/2
    assert out["conflicting_acc"] == pytest.approx(0.75)


def test_group_metrics_missing_test_group_renormalises(tiny_groups):
    y, p, a, train = tiny_groups
    keep = ~((y == 0) & (a == 1))  # drop group (0,1) from the test split
    out = M.group_metrics(y[keep], p[keep], a[keep], 2, 2, train_group_counts=train)
    assert "0,1" not in out["per_group"]
    # (.45*.75 + .10*0 + .40*.75) / (.45+.10+.40) = .6375/.95
    assert out["adjusted_avg"] == pytest.approx(0.6375 / 0.95)
    assert out["aga"] == pytest.approx(0.5)  # (0.75+0+0.75)/3
    assert out["conflicting_acc"] == pytest.approx(0.0)  # only (1,0) left


def test_group_metrics_without_bias_or_train(tiny_groups):
    y, p, a, _ = tiny_groups
    out = M.group_metrics(y, p, None, 2, 2)
    assert out["accuracy"] == pytest.approx(7 / 12)
    for k in ("per_group", "group_counts", "wga", "aga", "adjusted_avg", "aligned_acc",
              "conflicting_acc", "worst_group"):
        assert out[k] is None, k
    out2 = M.group_metrics(y, p, a, 2, 2)
    assert out2["adjusted_avg"] is None and out2["aligned_acc"] is None
    assert out2["wga"] == 0.0
    json.dumps(out, allow_nan=False)


# --------------------------------------------------------------------- TPR references
def test_tpr_by_group_matches_fairlearn_and_torchmetrics():
    import torch
    from fairlearn.metrics import MetricFrame, true_positive_rate
    from torchmetrics.classification import BinaryGroupStatRates

    rng = np.random.default_rng(1)
    n = 400
    prot = rng.integers(0, 4, n)
    yt = rng.integers(0, 2, n)
    yp = np.where(rng.random(n) < 0.5 + 0.1 * prot, yt, 1 - yt)

    ours = M.tpr_by_group(yt, yp, prot)
    mf = MetricFrame(metrics=true_positive_rate, y_true=yt, y_pred=yp, sensitive_features=prot)
    assert set(ours) == {0, 1, 2, 3}
    for g, v in mf.by_group.items():
        assert ours[int(g)] == pytest.approx(v)

    rates = BinaryGroupStatRates(num_groups=4)(
        torch.tensor(yp, dtype=torch.float32), torch.tensor(yt), torch.tensor(prot)
    )
    for g in range(4):
        tp, fp, tn, fn = rates[f"group_{g}"].tolist()
        assert ours[g] == pytest.approx(tp / (tp + fn), abs=1e-6)

    # Bias from fairlearn's TPRs and group frequencies over all samples
    t = mf.by_group.to_numpy()
    w = np.bincount(prot) / n
    num = den = 0.0
    for i in range(4):
        for j in range(i + 1, 4):
            num += abs(t[i] - t[j]) * w[i] * w[j]
            den += w[i] * w[j]
    assert M.bias_tpr_gap(yt, yp, prot) == pytest.approx(num / den)
    assert M.bias_tpr_gap(yt, yp, prot) > 0.01


def test_multiclass_tpr_is_balanced_accuracy(rand_groups):
    from sklearn.metrics import balanced_accuracy_score

    y, pred, _, C, _ = rand_groups
    assert M.multiclass_tpr(y, pred, C) == pytest.approx(balanced_accuracy_score(y, pred))


# -------------------------------------------------------------------- GAMMA-FACE golden
@pytest.fixture
def tiny_bias():
    # a=0: y 1,1,0,0 pred 1,1,0,1 -> TPR 2/2 = 1.0
    # a=1: y 1,1,1,1 pred 1,0,0,0 -> TPR 1/4 = 0.25
    # a=2: y 1,0     pred 0,0     -> TPR 0/1 = 0.0
    prot = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    yt = np.array([1, 1, 0, 0, 1, 1, 1, 1, 1, 0])
    yp = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0, 0])
    return yt, yp, prot


def test_bias_golden(tiny_bias):
    yt, yp, prot = tiny_bias
    assert M.tpr_by_group(yt, yp, prot) == {0: 1.0, 1: 0.25, 2: 0.0}
    # w (all samples) = .4,.4,.2 ; pairs: (0,1) .75*.16, (0,2) 1*.08, (1,2) .25*.08
    # num = .12+.08+.02 = .22 ; den = .32 -> .6875
    assert M.bias_tpr_gap(yt, yp, prot) == pytest.approx(0.6875)
    # w (positives) = 2/7,4/7,1/7 ; pair weights *49: 8,2,4 ; num 6+2+1=9 ; den 14
    assert M.bias_tpr_gap(yt, yp, prot, weighting="positives") == pytest.approx(9 / 14)
    # group order must not matter (absolute difference)
    assert M.bias_tpr_gap(yt, yp, 2 - prot) == pytest.approx(0.6875)


def test_bias_undefined_and_zero():
    # only one protected value has positives -> nan
    assert math.isnan(M.bias_tpr_gap([1, 0, 0], [1, 0, 0], [0, 1, 1]))
    # equal TPR across groups -> 0
    assert M.bias_tpr_gap([1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]) == 0.0


def test_bpc_golden():
    # (0.5-0.2)/0.5 - (0.8-0.9)/0.8 = 0.6 + 0.125
    assert M.bpc(0.5, 0.2, 0.8, 0.9) == pytest.approx(0.725)
    assert M.bpc(0.4, 0.4, 0.7, 0.7) == 0.0  # baseline vs itself
    assert math.isnan(M.bpc(0.0, 0.1, 0.8, 0.9))


@pytest.fixture
def tiny_ba():
    # a=1: y 1,1,1,0 pred 1,1,0,0 ; a=0: y 1,0,0,0 pred 1,1,1,0
    prot = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    yt = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    yp = np.array([1, 1, 0, 0, 1, 1, 1, 0])
    return yt, yp, prot


def test_bias_amplification_golden(tiny_ba):
    yt, yp, prot = tiny_ba
    # n=8, n_t=4.
    # a=1: n_a=4, n_ta=3 -> P(t,a)=3/8 > 1/2*1/2 -> s=+1 ; P=3/4, P~=2/4
    #      paper: (0.75-0.5)/0.5 = 0.5 ; zhao: 0.5-0.75 = -0.25
    # a=0: n_ta=1 -> 1/8 < 1/4 -> s=-1 ; P=1/4, P~=3/4
    #      paper: -(0.25-0.75)/0.75 = 2/3 ; zhao: -(0.75-0.25) = -0.5
    assert M.bias_amplification(yt, yp, prot, protected_value=1) == pytest.approx(0.5)
    assert M.bias_amplification(yt, yp, prot, protected_value=0) == pytest.approx(2 / 3)
    assert M.bias_amplification(yt, yp, prot) == pytest.approx((0.5 + 2 / 3) / 2)
    assert M.bias_amplification(yt, yp, prot, form="zhao") == pytest.approx(-0.375)


def test_bias_amplification_independence_and_undefined():
    # P(t,a)=1/4 == P(t)P(a)=1/4 -> paper's "otherwise" branch, s=-1
    # a=1: P=0.5, P~=1.0 -> -(0.5-1)/1 = 0.5
    assert M.bias_amplification([1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], protected_value=1) == 0.5
    # never predicted positive -> P~=0 everywhere -> undefined
    assert math.isnan(M.bias_amplification([1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]))
    with pytest.raises(ValueError, match="does not occur"):
        M.bias_amplification([1, 0], [1, 0], [0, 0], protected_value=5)


def test_multiclass_bias_and_ba_golden():
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    b = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    # class 0 vs rest: TPR a0 = 2/2, a1 = 1/2 -> gap .5 ; class 1: a0 2/2, a1 2/2 -> 0
    assert M.multiclass_bias(y, p, b, 2) == pytest.approx(0.25)
    # BA paper form, every (t,a) has n_ta*n = 16 == n_t*n_a = 16 -> s=-1
    # class 0: a0 P=.5 P~=.5 -> 0 ; a1 P=.5 P~=.25 -> -(.25/.25) = -1 ; mean -.5
    # class 1: a0 P=.5 P~=.5 -> 0 ; a1 P=.5 P~=.75 -> -(-.25/.75) = 1/3 ; mean 1/6
    assert M.multiclass_ba(y, p, b, 2) == pytest.approx((-0.5 + 1 / 6) / 2)
    # class absent from y_true is skipped (num_classes=3)
    assert M.multiclass_bias(y, p, b, 3) == pytest.approx(0.25)


def test_score_kl_golden():
    # bins=2 over (0,1): A_p=+ -> [1,3]/4, A_p=- -> [3,1]/4
    # KL(p||q) = .25 ln(1/3) + .75 ln 3 = .5 ln 3 ; symmetric -> ln 3 (eps 1e-6 shifts ~1e-6)
    s = np.array([0.1, 0.6, 0.7, 0.9, 0.1, 0.2, 0.3, 0.8])
    prot = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    assert M.score_kl(s, prot, bins=2, sigma=0) == pytest.approx(math.log(3), abs=1e-4)
    # symmetric in the two groups
    assert M.score_kl(s, 1 - prot, bins=2, sigma=0) == pytest.approx(math.log(3), abs=1e-4)
    # identical score distributions -> 0
    assert M.score_kl([0.2, 0.7, 0.2, 0.7], [1, 1, 0, 0], bins=5) == pytest.approx(0.0, abs=1e-12)
    # disjoint supports: large but finite thanks to eps
    big = M.score_kl([0.05, 0.05, 0.95, 0.95], [1, 1, 0, 0], bins=10, sigma=0)
    assert 10 < big < 40


def test_score_kl_smoothing_matches_scipy():
    from scipy.ndimage import gaussian_filter1d

    rng = np.random.default_rng(3)
    prot = rng.integers(0, 2, 300)
    s = np.clip(rng.normal(0.4 + 0.2 * prot, 0.15), 0, 1)
    edges = np.linspace(0, 1, 21)

    def dist(x):
        h = gaussian_filter1d(np.histogram(x, edges)[0].astype(float), 1.0, mode="reflect")
        h = h / h.sum() + 1e-6
        return h / h.sum()

    p, q = dist(s[prot == 1]), dist(s[prot == 0])
    expected = np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))
    got = M.score_kl(s, prot, bins=20, sigma=1.0)
    assert got == pytest.approx(expected, rel=1e-9)
    # smoothing reduces divergence relative to the raw histogram
    assert got < M.score_kl(s, prot, bins=20, sigma=0)


# ------------------------------------------------------------------------ error cases
@pytest.mark.parametrize(
    "call",
    [
        lambda: M.group_metrics([0, 1], [0], [0, 1], 2, 2),
        lambda: M.group_metrics([0, 1], [0, 1], [0], 2, 2),
        lambda: M.group_accuracy([0, 1], [0, 1], [0]),
        lambda: M.tpr_by_group([1, 0], [1, 0, 1], [0, 1]),
        lambda: M.bias_tpr_gap([1, 0], [1, 0], [0, 1, 1]),
        lambda: M.bias_amplification([1, 0, 1], [1, 0], [0, 1, 1]),
        lambda: M.score_kl([0.1, 0.2], [0, 1, 1]),
        lambda: M.multiclass_bias([0, 1], [0, 1], [0], 2),
    ],
)
def test_length_mismatch(call):
    with pytest.raises(ValueError, match="length mismatch"):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: M.group_metrics([], [], [], 2, 2),
        lambda: M.group_ids([], [], 2),
        lambda: M.tpr_by_group([], [], []),
        lambda: M.score_kl([], []),
        lambda: M.multiclass_ba([], [], [], 2),
    ],
)
def test_empty_input(call):
    with pytest.raises(ValueError, match="empty"):
        call()


def test_other_validation(tiny_groups):
    y, p, a, _ = tiny_groups
    with pytest.raises(ValueError, match="bias has label 2 >= 2"):
        M.group_metrics(y, p, a + 1, 2, 2)
    with pytest.raises(ValueError, match="shape"):
        M.group_metrics(y, p, a, 2, 2, train_group_counts=np.ones((3, 2)))
    with pytest.raises(ValueError, match="shape"):
        M.group_metrics(y, p, a, 2, 2, aligned=np.ones((2, 3), bool))
    with pytest.raises(ValueError, match="1-D"):
        M.group_metrics(y.reshape(3, 4), p.reshape(3, 4), a.reshape(3, 4), 2, 2)
    with pytest.raises(ValueError, match="both"):
        M.score_kl([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="y_true has label"):
        M.group_metrics([0, 5], [0, 1], [0, 1], 2, 2)


def test_multiclass_ba_takes_its_signs_from_the_training_correlation():
    """Group-balanced test (2 classes × 2 bias values, 2 rows each): the test's own correlation is zero, so every
    sign would be −1 and BA ≈ 0; with the training counts (class c aligned with bias c) a predictor that follows
    the bias has P̃(ŷ=c | a=c) = 1 vs P(y=c | a=c) = 0.5 → zhao terms +0.5 (aligned, s=+1) and −(0 − 0.5) = +0.5
    (conflicting, s=−1) per class: BA = 0.5."""
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    b = np.array([0, 0, 1, 1, 0, 0, 1, 1])
    follows_bias = b.copy()
    train = [[98, 2], [2, 98]]
    assert M.multiclass_ba(y, follows_bias, b, 2, form="zhao", train_group_counts=train) == pytest.approx(0.5)
    assert M.multiclass_ba(y, follows_bias, b, 2, form="zhao") == pytest.approx(0.0)  # own signs: all −1
    assert M.multiclass_ba(y, y, b, 2, form="zhao", train_group_counts=train) == pytest.approx(0.0)  # unbiased


def test_conflicting_mask_uses_the_training_majority():
    from raydebias.evaluate.metrics import conflicting_mask

    counts = [[5, 1, 0], [0, 2, 9]]  # class 0 aligned with bias 0, class 1 with bias 2
    y, a = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 2, 0, 1])
    assert conflicting_mask(y, a, counts).tolist() == [False, True, False, True, True]
