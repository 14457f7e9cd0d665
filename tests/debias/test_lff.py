"""GCE (value, gradient against the derived closed form, LfF-code variant, q → 0), the GCE and LfF recipes on a
hand-computed example, and DiffInject's top-K mining."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from raydebias.debias.lff import GCE, LfF, gce_loss, mine_conflicting

torch.set_num_threads(1)
LN2 = math.log(2.0)


def random_batch(n=16, c=5, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, c, (n,), generator=gen)
    return logits, y


def closed_form_grad(logits, y, q):
    """d/dz of (1 − p_y^q)/q = −p_y^(q−1)·p_y(e_y − p) = −p_y^q (e_y − p), per row (reduction "sum")."""
    p = torch.softmax(logits, dim=1)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return -(p.gather(1, y[:, None]) ** q) * (onehot - p)


def autograd_grad(logits, y, **kw):
    z = logits.clone().requires_grad_(True)
    gce_loss(z, y, reduction="sum", **kw).backward()
    return z.grad


@pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 1.0])
def test_gce_value_is_the_closed_form(q):
    logits, y = random_batch()
    p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(gce_loss(logits, y, q=q, reduction="none"), (1 - p_y**q) / q)
    torch.testing.assert_close(gce_loss(logits, y, q=q), ((1 - p_y**q) / q).mean())
    torch.testing.assert_close(gce_loss(logits, y, q=q, reduction="sum"), ((1 - p_y**q) / q).sum())


@pytest.mark.parametrize("q", [0.1, 0.5, 0.7, 1.0])
def test_gce_gradient_equals_derived_closed_form(q):
    logits, y = random_batch(seed=1)
    torch.testing.assert_close(autograd_grad(logits, y, q=q), closed_form_grad(logits, y, q))
    # equivalently p_y^q × CE's gradient (DiffInject eq. 2)
    z = logits.clone().requires_grad_(True)
    F.cross_entropy(z, y, reduction="sum").backward()
    p_y = torch.softmax(logits, 1).gather(1, y[:, None])
    torch.testing.assert_close(autograd_grad(logits, y, q=q), p_y**q * z.grad)


@pytest.mark.parametrize("q", [0.3, 0.7])
def test_lff_code_form_gradient_is_q_times_closed_form(q):
    logits, y = random_batch(seed=2)
    g_code = autograd_grad(logits, y, q=q, form="lff_code")
    torch.testing.assert_close(g_code, q * closed_form_grad(logits, y, q))
    torch.testing.assert_close(g_code, q * autograd_grad(logits, y, q=q))
    # its value is CE·p_y^q·q, not the closed form
    p_y = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(gce_loss(logits, y, q=q, reduction="none", form="lff_code"), ce * p_y**q * q)


def test_gce_tends_to_ce_as_q_goes_to_zero():
    logits, y = random_batch(seed=3)
    ce = F.cross_entropy(logits, y, reduction="none")
    small = gce_loss(logits, y, q=1e-4, reduction="none")
    torch.testing.assert_close(small, ce, rtol=1e-3, atol=1e-3)
    assert (small - ce).abs().max() < (gce_loss(logits, y, q=1e-2, reduction="none") - ce).abs().max()
    z = logits.clone().requires_grad_(True)
    F.cross_entropy(z, y, reduction="sum").backward()
    torch.testing.assert_close(autograd_grad(logits, y, q=1e-4), z.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gce_loss(logits, y, q=0.0, reduction="none"), ce)


def test_gce_is_stable_for_tiny_probabilities_and_validates_arguments():
    logits = torch.tensor([[0.0, 200.0]], requires_grad=True)  # p_0 = e^-200 underflows in float32
    loss = gce_loss(logits, torch.tensor([0]), q=0.7)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(loss, torch.tensor(1 / 0.7))
    with pytest.raises(ValueError):
        gce_loss(logits, torch.tensor([0]), form="nope")
    with pytest.raises(ValueError):
        gce_loss(logits, torch.tensor([0]), reduction="max")


def test_gce_recipe_interface():
    logits, y = random_batch(seed=4)
    g = torch.zeros_like(y)
    r = GCE(num_groups=4, eta=0.01)  # the train loop passes eta to every recipe
    assert r.name == "gce" and r.sample_weights(np.zeros(3, int), np.zeros(3, int)) is None
    torch.testing.assert_close(r(logits, y, g), gce_loss(logits, y, q=0.7))
    torch.testing.assert_close(GCE(4, q=0.5, form="lff_code")(logits, y, g),
                               gce_loss(logits, y, q=0.5, form="lff_code"))
    assert r.state_dict() == {}
    r.load_state_dict({})


def two_class(rows):
    """Logits (0, ln k) per row: CE with y=0 is ln(1+k), with y=1 it is ln((1+k)/k)."""
    return torch.tensor([[0.0, math.log(k)] for k in rows], dtype=torch.float64)


def test_lff_ema_and_weights_on_a_hand_computed_example():
    """N = 4 rows, labels (0, 0, 1, 1), α = 0.7.

    Step 1, rows (0, 1, 2):  CE_B = (ln2, ln4, ln2)   CE_D = (ln4, ln2, ln(8/7))   (first update stores CE)
      class max of the EMA over the *whole* set (row 3 is still 0): B (2ln2, ln2), D (2ln2, ln(8/7))
      normalised B (1/2, 1, 1), D (1, 1/2, 1) → w = (1/3, 2/3, 1/2)
    Step 2, rows (0, 3):  CE_B = (ln8, ln2)  CE_D = (ln2, ln4)
      EMA_B[0] = .7 ln2 + .3·3ln2 = 1.6 ln2, EMA_B[3] = ln2 (first);  EMA_D[0] = .7·2ln2 + .3 ln2 = 1.7 ln2, EMA_D[3] = 2ln2
      class max B: c0 = 2ln2 (row 1, not in the batch), c1 = ln2; D: c0 = 1.7 ln2, c1 = 2ln2
      row 0: 0.8 / (0.8 + 1) = 4/9; row 3: 1 / (1 + 1) = 1/2
    """
    labels = np.array([0, 0, 1, 1])
    lff = LfF(num_groups=4, eta=0.01)
    assert lff.name == "lff" and lff.needs_index and lff.needs_biased_logits
    assert lff.sample_weights(labels, labels) is None  # binds the labels, allocates N = 4
    assert lff.ema_b.shape == (4,)

    y1 = torch.tensor([0, 0, 1])
    lb1 = two_class([1, 3, 1]).requires_grad_(True)
    ld1 = two_class([3, 1, 7]).requires_grad_(True)
    loss1 = lff(ld1, y1, y1, idx=torch.tensor([0, 1, 2]), logits_b=lb1)
    torch.testing.assert_close(lff.ema_b, torch.tensor([LN2, 2 * LN2, LN2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(lff.ema_d, torch.tensor([2 * LN2, LN2, math.log(8 / 7), 0.0], dtype=torch.float64))
    w1 = torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64)
    torch.testing.assert_close(lff.last_weights, w1)

    p_y = torch.tensor([1 / 2, 1 / 4, 1 / 2], dtype=torch.float64)
    expected = ((1 - p_y**0.7) / 0.7).mean() + (w1 * torch.tensor([2 * LN2, LN2, math.log(8 / 7)])).mean()
    torch.testing.assert_close(loss1, expected.to(torch.float64))
    # one backward: f_B gets the GCE gradient only, f_D the w-weighted CE gradient only
    loss1.backward()
    torch.testing.assert_close(lb1.grad, closed_form_grad(lb1.detach(), y1, 0.7) / 3)
    p_d = torch.softmax(ld1.detach(), 1)
    torch.testing.assert_close(ld1.grad, w1[:, None] * (p_d - F.one_hot(y1, 2)) / 3)

    y2 = torch.tensor([0, 1])
    lff(two_class([1, 1 / 3]), y2, y2, idx=torch.tensor([0, 3]), logits_b=two_class([7, 1]))
    torch.testing.assert_close(lff.ema_b, torch.tensor([1.6 * LN2, 2 * LN2, LN2, LN2], dtype=torch.float64))
    torch.testing.assert_close(lff.ema_d, torch.tensor([1.7 * LN2, LN2, math.log(8 / 7), 2 * LN2], dtype=torch.float64))
    torch.testing.assert_close(lff.last_weights, torch.tensor([4 / 9, 1 / 2], dtype=torch.float64))
    assert lff.updated.all()


def test_lff_without_class_normalisation_and_lff_code_gce():
    lff = LfF(num_groups=2, num_samples=3, normalize_per_class=False, gce_form="lff_code", q=0.5)
    y = torch.tensor([0, 0, 1])
    lb, ld = two_class([1, 3, 1]).requires_grad_(True), two_class([3, 1, 7])
    loss = lff(ld, y, y, idx=torch.tensor([0, 1, 2]), logits_b=lb)
    w = torch.tensor([1 / 3, 2 / 3, LN2 / (LN2 + math.log(8 / 7))], dtype=torch.float64)
    torch.testing.assert_close(lff.last_weights, w, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(loss, gce_loss(lb, y, q=0.5, form="lff_code")
                               + (w * F.cross_entropy(ld, y, reduction="none")).mean(), atol=1e-8, rtol=1e-7)
    with pytest.raises(RuntimeError):  # per-class normalisation without labels
        LfF(2, num_samples=3)(ld, y, y, idx=torch.tensor([0, 1, 2]), logits_b=lb)


def test_lff_state_round_trips_through_safetensors(tmp_path):
    labels = np.array([0, 1, 0, 1, 2])
    a = LfF(num_groups=6, labels=labels)
    y = torch.as_tensor(labels[[1, 2, 4]])
    logits, _ = random_batch(n=3, c=3, seed=5)
    a(logits, y, y, idx=torch.tensor([1, 2, 4]), logits_b=logits.flip(1))
    save_file(a.state_dict(), tmp_path / "recipe.safetensors")
    b = LfF(num_groups=6)
    b.load_state_dict(load_file(tmp_path / "recipe.safetensors"))
    for k in ("ema_b", "ema_d", "updated", "labels"):
        torch.testing.assert_close(getattr(b, k), getattr(a, k))
    torch.testing.assert_close(b.weights([1, 2, 4], y), a.weights([1, 2, 4], y))


def test_mine_conflicting_picks_top_k_per_class():
    losses = np.array([0.1, 5.0, 3.0, 0.2, 4.0, 4.0, 1.0, 9.0])
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(mine_conflicting(losses, labels, k=2), [1, 2, 7, 4])  # tie 4 = 5: lower index
    np.testing.assert_array_equal(mine_conflicting(torch.tensor(losses), torch.tensor(labels), k=10),
                                  [1, 2, 6, 0, 7, 4, 5, 3])  # fewer than k per class: all, by loss
    out = mine_conflicting(losses, labels, k=1)
    assert out.dtype == np.int64 and list(out) == [1, 7]
    assert mine_conflicting(np.zeros(0), np.zeros(0, int)).shape == (0,)

    rng = np.random.default_rng(0)
    losses, labels = rng.random(500), rng.integers(0, 10, 500)
    got = mine_conflicting(losses, labels, k=10)
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        block = got[c * 10 : (c + 1) * 10]
        assert set(block) == set(rows[np.argsort(losses[rows])[::-1][:10]])
        assert (np.diff(losses[block]) <= 0).all()


def test_frozen_bias_lff_weights_on_a_hand_computed_example():
    """Diffusing DeBias Recipe II: labels (0, 0, 1, 1), frozen amplifier CE L_BA = (ln2, 2ln2, ln2, 2ln2).

    Step on rows (0, 1, 2) with CE_D = (ln4, ln2, ln(8/7)): class max of L_BA over the whole set (2ln2, 2ln2),
    of the D-EMA (2ln2, ln(8/7)) → normalised BA (1/2, 1, 1/2), D (1, 1/2, 1) → w = (1/3, 2/3, 1/3);
    loss = mean(w · CE_D); the amplifier's losses never change.
    """
    from raydebias.debias.lff import FrozenBiasLfF

    bias_loss = np.array([LN2, 2 * LN2, LN2, 2 * LN2])
    rec = FrozenBiasLfF(num_groups=4, bias_loss=bias_loss, eta=0.01)
    assert rec.needs_index and not rec.needs_biased_logits
    assert rec.sample_weights(np.array([0, 0, 1, 1]), None) is None  # binds the labels
    y = torch.tensor([0, 0, 1])
    logits = two_class([3, 1, 7]).requires_grad_(True)
    loss = rec(logits, y, y, idx=torch.tensor([0, 1, 2]))
    w = torch.tensor([1 / 3, 2 / 3, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(rec.last_weights, w)
    ce = torch.tensor([2 * LN2, LN2, math.log(8 / 7)], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), (w * ce).mean())
    loss.backward()
    p = torch.softmax(logits.detach(), 1)
    torch.testing.assert_close(logits.grad, w[:, None] * (p - F.one_hot(y, 2)) / 3)
    torch.testing.assert_close(rec.ema_b, torch.as_tensor(bias_loss))  # frozen
    with pytest.raises(ValueError, match="bias_loss"):
        FrozenBiasLfF(num_groups=4, bias_loss=[1.0, float("nan")])
