"""GroupDRO and ERM recipes: q-update and loss against a hand-computed example, sampling weights, gradients."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from raydebias.debias import ERM, RECIPES, GroupDRO
from raydebias.debias.groupdro import group_balanced_weights

LN2 = math.log(2.0)


def golden_batch():
    """Two classes, three groups; group 2 is absent from the batch.

    Cross-entropy of logits (a, b) with target t is log(e^a + e^b) - logit_t:
      row 0: logits (0, 0),    y=0, g=0 → log 2 - 0        = ln 2
      row 1: logits (0, 0),    y=1, g=1 → log 2 - 0        = ln 2
      row 2: logits (0, ln 7), y=0, g=1 → log(1 + 7) - 0   = ln 8 = 3 ln 2
    Group means: L_0 = ln 2, L_1 = (ln 2 + 3 ln 2) / 2 = 2 ln 2, L_2 = 0 (absent).
    (Were L_g a sum instead of a mean, L_1 would be 4 ln 2 and every number below would differ.)
    """
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, math.log(7.0)]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    g = torch.tensor([0, 1, 1])
    return logits, y, g


def test_group_losses_are_per_group_means_and_absent_groups_are_zero():
    logits, y, g = golden_batch()
    dro = GroupDRO(num_groups=3, eta=1.0)
    losses = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(losses, torch.tensor([LN2, LN2, 3 * LN2], dtype=torch.float64))
    group_loss, counts = dro.group_losses(losses, g)
    torch.testing.assert_close(group_loss, torch.tensor([LN2, 2 * LN2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))


def test_golden_q_update_and_loss_over_two_steps():
    logits, y, g = golden_batch()
    dro = GroupDRO(num_groups=3, eta=1.0)
    torch.testing.assert_close(dro.q, torch.full((3,), 1 / 3))

    # Step 1, eta = 1: q_g ∝ (1/3)·exp(L_g) = (1/3)·(e^{ln 2}, e^{2 ln 2}, e^0) = (1/3)·(2, 4, 1)
    #   → q = (2, 4, 1) / 7
    # loss = Σ q_g L_g = (2/7)·ln 2 + (4/7)·2 ln 2 + (1/7)·0 = (10/7)·ln 2 ≈ 0.990210
    loss = dro(logits, y, g)
    torch.testing.assert_close(dro.q.double(), torch.tensor([2 / 7, 4 / 7, 1 / 7], dtype=torch.float64))
    assert loss.item() == pytest.approx(10 / 7 * LN2, rel=1e-6)
    assert loss.item() == pytest.approx(0.990210, abs=1e-6)

    # Step 2, same batch: q_g ∝ (2/7·2, 4/7·4, 1/7·1) = (4, 16, 1)/7 → q = (4, 16, 1) / 21
    # loss = (4/21)·ln 2 + (16/21)·2 ln 2 = (36/21)·ln 2 = (12/7)·ln 2 ≈ 1.188252
    loss = dro(logits, y, g)
    torch.testing.assert_close(dro.q.double(), torch.tensor([4 / 21, 16 / 21, 1 / 21], dtype=torch.float64))
    assert loss.item() == pytest.approx(12 / 7 * LN2, rel=1e-6)


def test_absent_group_contributes_nothing_to_the_loss():
    """With group 2 absent, the loss is unchanged whatever weight q puts on it."""
    logits, y, g = golden_batch()
    a = GroupDRO(num_groups=3, eta=1.0)
    b = GroupDRO(num_groups=3, eta=1.0)
    b.q = torch.tensor([0.1, 0.1, 0.8])  # much more weight on the absent group
    # a: q = (2,4,1)/7 after the update → loss (10/7) ln 2.
    # b: q ∝ (0.1·2, 0.1·4, 0.8·1) = (0.2, 0.4, 0.8) → q = (1, 2, 4)/7 → loss (1/7) ln 2 + (2/7) 2 ln 2 = (5/7) ln 2
    assert a(logits, y, g).item() == pytest.approx(10 / 7 * LN2, rel=1e-6)
    assert b(logits, y, g).item() == pytest.approx(5 / 7 * LN2, rel=1e-6)
    torch.testing.assert_close(b.q.double(), torch.tensor([1 / 7, 2 / 7, 4 / 7], dtype=torch.float64))


def test_q_stays_a_distribution_and_favours_the_worst_group():
    gen = torch.Generator().manual_seed(0)
    dro = GroupDRO(num_groups=4, eta=0.05)
    for step in range(60):
        n = 16
        logits = torch.randn(n, 3, generator=gen)
        y = torch.randint(0, 3, (n,), generator=gen)
        g = torch.randint(0, 3, (n,), generator=gen)  # group 3 never appears
        # make group 1 consistently the hardest: its logits point confidently at a wrong class
        hard = g == 1
        logits[hard] = F.one_hot((y[hard] + 1) % 3, 3).float() * 5.0
        loss = dro(logits, y, g)
        assert torch.isfinite(loss)
        assert dro.q.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert bool((dro.q > 0).all()) and bool((dro.q <= 1).all())
    assert int(dro.q.argmax()) == 1
    assert dro.q[1] > 0.9
    assert dro.q[3] < dro.q[0] and dro.q[3] < dro.q[2]  # the never-seen group only decays


def test_state_dict_round_trip_including_safetensors(tmp_path):
    logits, y, g = golden_batch()
    a = GroupDRO(num_groups=3, eta=1.0)
    a(logits.float(), y, g)
    state = a.state_dict()
    assert set(state) == {"q"}
    state["q"].mul_(0)  # a copy: mutating it must not touch the recipe
    assert a.q.sum().item() == pytest.approx(1.0)

    save_file(a.state_dict(), str(tmp_path / "recipe.safetensors"))  # what the train loop checkpoints
    b = GroupDRO(num_groups=3, eta=1.0)
    b.load_state_dict(load_file(str(tmp_path / "recipe.safetensors")))
    torch.testing.assert_close(b.q, a.q)
    # the restored recipe continues exactly like the original
    la, lb = a(logits.float(), y, g), b(logits.float(), y, g)
    assert la.item() == lb.item()
    torch.testing.assert_close(b.q, a.q)
    torch.testing.assert_close(a.q.double(), torch.tensor([4 / 21, 16 / 21, 1 / 21], dtype=torch.float64))


def test_gradient_is_q_weighted_sum_of_group_gradients():
    gen = torch.Generator().manual_seed(1)
    n, C, G = 12, 3, 4
    logits = torch.randn(n, C, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (n,), generator=gen)
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])  # group 3 absent
    dro = GroupDRO(num_groups=G, eta=0.3)
    dro.q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    loss = dro(logits, y, g)
    (grad,) = torch.autograd.grad(loss, logits)

    q = dro.q.double()  # the updated q is what weights the loss (and it is detached)
    expected = torch.zeros_like(logits)
    for k in range(G):
        mask = g == k
        if mask.any():
            (gk,) = torch.autograd.grad(F.cross_entropy(logits[mask], y[mask]), logits)
            expected += q[k] * gk
    torch.testing.assert_close(grad, expected)
    # and the loss itself is Σ_g q_g L_g
    ref = sum(q[k] * F.cross_entropy(logits[g == k], y[g == k]) for k in range(3))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)


@pytest.mark.parametrize(
    "groups",
    [np.array([0, 0, 0, 1, 2, 2]), np.array([3, 3, 0, 3, 0, 5]), np.array([1] * 7 + [0])],
)
def test_group_balanced_weights_give_equal_total_weight_per_present_group(groups):
    w = group_balanced_weights(groups)
    assert w.shape == groups.shape
    assert np.all(w > 0)
    present = np.unique(groups)
    totals = np.array([w[groups == k].sum() for k in present])
    np.testing.assert_allclose(totals, 1.0)
    # as sampling probabilities: every present group is drawn with probability 1 / (#present groups)
    p = w / w.sum()
    np.testing.assert_allclose([p[groups == k].sum() for k in present], 1.0 / len(present))


def test_groupdro_samples_group_balanced_and_erm_uniformly():
    labels = np.array([0, 0, 1, 1, 1])
    groups = np.array([0, 0, 1, 1, 2])
    np.testing.assert_allclose(GroupDRO(3).sample_weights(labels, groups), [0.5, 0.5, 0.5, 0.5, 1.0])
    assert ERM(3).sample_weights(labels, groups) is None


def test_erm_loss_is_torch_cross_entropy_and_ignores_groups():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 4, generator=gen)
    y = torch.randint(0, 4, (10,), generator=gen)
    erm = ERM(num_groups=8)
    loss = erm(logits, y, torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    torch.testing.assert_close(erm(logits, y, torch.arange(10) % 8), loss)
    assert erm.state_dict() == {}
    erm.load_state_dict({})


def test_recipe_registry():
    from raydebias.debias import GCE, FrozenBiasLfF, SupConCE

    assert RECIPES == {"erm": ERM, "groupdro": GroupDRO, "supcon_ce": SupConCE, "gce": GCE,
                       "lff_frozen": FrozenBiasLfF}
    assert ERM.name == "erm" and GroupDRO.name == "groupdro"
    # the train loop builds every recipe the same way (plus the phase's recipe_args)
    args = {"lff_frozen": {"bias_loss": [0.1] * 6}}
    for name, cls in RECIPES.items():
        cls(6, eta=0.05, **args.get(name, {}))
    assert GroupDRO(6, eta=0.05).eta == 0.05


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_tempered_group_mass_is_count_to_the_one_minus_tau(tau):
    groups = np.repeat([0, 1, 2, 5], [400, 100, 4, 1])
    w = group_balanced_weights(groups, tau)
    mass = np.array([w[groups == g].sum() for g in (0, 1, 2, 5)])
    counts = np.array([400, 100, 4, 1], float)
    np.testing.assert_allclose(mass / mass.sum(), counts ** (1 - tau) / (counts ** (1 - tau)).sum())


def test_group_mixture_probs_mass_per_group():
    from raydebias.debias.groupdro import group_mixture_probs

    groups = np.array([0] * 90 + [1] * 9 + [2])
    p = group_mixture_probs(groups, mix=0.5)
    assert p.sum() == pytest.approx(1.0)
    mass = np.bincount(groups, weights=p)
    np.testing.assert_allclose(mass, 0.5 * np.array([90, 9, 1]) / 100 + 0.5 / 3)
    np.testing.assert_allclose(group_mixture_probs(groups, mix=0.0), np.full(100, 0.01))
    np.testing.assert_allclose(np.bincount(groups, weights=group_mixture_probs(groups, mix=1.0)), [1 / 3] * 3)
