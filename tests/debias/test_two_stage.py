"""SupCon against a hand-computed golden value and an independent loop implementation; the stage-1 objective."""

import math

import pytest
import torch
import torch.nn.functional as F

from raydebias.debias.two_stage import SupConCE, supcon_loss


def test_supcon_golden_value():
    # Three unit vectors: z0 = z1 = (1, 0), z2 = (0, 1); labels 0, 0, 1; tau = 1.
    # Anchor 0: positives {1}; denominator over a≠0: e^{z0·z1} + e^{z0·z2} = e + 1 → ℓ0 = -log(e/(e+1)).
    # Anchor 1: same → ℓ1 = -log(e/(e+1)). Anchor 2: no positive → 0.  Mean over 3 anchors:
    expected = 2 * -math.log(math.e / (math.e + 1)) / 3
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = supcon_loss(z, torch.tensor([0, 0, 1]), temperature=1.0)
    assert abs(got.item() - expected) < 1e-6


def _reference(z, y, tau):
    """Independent double loop over anchors/positives (no masking tricks)."""
    z = F.normalize(z, dim=1)
    losses = []
    for i in range(len(y)):
        others = [a for a in range(len(y)) if a != i]
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in others]), 0)
        pos = [p for p in others if y[p] == y[i]]
        losses.append(sum(-(z[i] @ z[p] / tau - denom) for p in pos) / len(pos) if pos else torch.tensor(0.0))
    return torch.stack(losses).mean()


def test_supcon_matches_reference_loop_and_has_finite_grad():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2, 4, 1])  # class 4 has a single anchor (no positive)
    got = supcon_loss(z, y, 0.07)
    torch.testing.assert_close(got, _reference(z, y, 0.07), rtol=1e-5, atol=1e-5)
    got.backward()
    assert torch.isfinite(z.grad).all()


def test_supcon_no_positives_is_zero_not_nan():
    z = torch.randn(4, 3)
    assert supcon_loss(z, torch.arange(4)).item() == 0.0


def test_supcon_prefers_clustered_features():
    y = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1], [0.1, 0.99]])
    assert supcon_loss(clustered, y) < supcon_loss(mixed, y)


def test_stage1_objective_mixes_ce_and_supcon():
    g = torch.Generator().manual_seed(1)
    logits, feats = torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    obj = SupConCE(9, beta=0.25, temperature=0.1)
    want = 0.25 * F.cross_entropy(logits, y) + 0.75 * supcon_loss(feats, y, 0.1)
    torch.testing.assert_close(obj(logits, y, y, features=feats), want)
    assert SupConCE(9, beta=1.0)(logits, y, y, features=feats) == F.cross_entropy(logits, y)


def test_stage_two_variants():
    from raydebias.methods.harnessing import TwoStageConfig
    from raydebias.debias.two_stage import two_stage_phases

    pre, llr = two_stage_phases(TwoStageConfig(llr="all", lr=1e-3, llr_lr=1e-2))
    # the pre-trained model is a candidate of the val selection too (stage 2 may undo it at 99.9 %)
    assert pre["data"] == "synthetic" and pre["recipe"] == "supcon_ce" and pre["select"]
    assert (llr["data"], llr["sampler"], llr["freeze_encoder"], llr["lr"], llr["select"]) == (
        "train", "class_balanced", True, 1e-2, True)
    _, ft = two_stage_phases(TwoStageConfig(llr="ft_balanced", lr=1e-3, llr_lr=1e-2))
    # FT_b: the whole network, group-balanced real batches, at the pre-training learning rate
    assert (ft["sampler"], ft["freeze_encoder"], ft["lr"], ft["recipe"]) == ("group_balanced", False, 1e-3, "erm")
    _, mix = two_stage_phases(TwoStageConfig(llr="ft_mixed", lr=1e-3))
    # FT_mix: as FT_b, on the union of the real train split and the synthetic set (fit_classifier joins them)
    assert (mix["data"], mix["sampler"], mix["freeze_encoder"], mix["lr"]) == ("train+synthetic", "group_balanced",
                                                                               False, 1e-3)
    # a list: each variant starts from the pre-trained model ("from"), val picks among every epoch
    pre, ft, mix = two_stage_phases(TwoStageConfig(llr=["ft_balanced", "ft_mixed"]))
    assert (ft["name"], ft["from"], mix["name"], mix["from"]) == ("ft_balanced", "synthetic", "ft_mixed", "synthetic")
    assert pre["select"] and ft["select"] and mix["select"]
    with pytest.raises(ValueError, match="distinct"):
        TwoStageConfig(llr=["ft_mixed", "ft_mixed"])
    _, dro = two_stage_phases(TwoStageConfig(llr="groupdro"))
    assert (dro["recipe"], dro["sampler"], dro["freeze_encoder"]) == ("groupdro", "recipe", True)
