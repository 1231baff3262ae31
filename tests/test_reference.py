"""The reference against small cases worked out by hand, in float64 (docs/spec.md §3-4)."""

from __future__ import annotations

import math

import pytest
import torch

from mmgrad import reference as R

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def test_ema_moments_by_hand():
    g1, g2, beta = t([[2.0, -1.0]]), t([[4.0, -1.0]]), 0.5
    z = torch.zeros(1, 2, dtype=F64)
    mean, var = R.ema_moments(g1, z, z, 1, beta)
    # step 1: the moments m = 0.5 g, v = 0.5 g^2, bias correction 1/(1-0.5): m_hat = g, v_hat = g^2, var = 0
    assert torch.equal(mean, t([[2.0, -1.0]])) and torch.equal(var, t([[0.0, 0.0]]))
    mean, var = R.ema_moments(g2, mean, var, 2, beta)
    # step 2: m = 0.5*1 + 0.5*4 = 2.5, v = 0.5*2 + 0.5*16 = 9; /(1-0.25): m_hat = 10/3, v_hat = 12
    assert mean[0, 0].item() == pytest.approx(10.0 / 3.0, rel=1e-15)
    assert var[0, 0].item() == pytest.approx(12.0 - (10.0 / 3.0) ** 2, rel=1e-14)
    assert var[0, 1].item() == 0.0  # constant gradient: no variance, exactly (no cancellation)


@pytest.mark.parametrize("beta", (0.01, 0.5, 0.9, 0.999))
def test_ema_state_is_specs_bias_corrected_moments(gen, beta):
    """The state (mean, var) equals docs/spec.md §3.1's m/(1-beta^t) and v/(1-beta^t) - m_hat^2
    after every step, on float64 (the identity of docs/spec.md, decision 3)."""
    g = torch.randn(30, 3, 50, generator=gen, dtype=F64) * torch.exp(3 * torch.randn(1, 3, 1, generator=gen, dtype=F64))
    g = g + 5 * torch.randn(1, 3, 50, generator=gen, dtype=F64)  # a mean the size of the spread
    m = v = mean = var = torch.zeros(3, 50, dtype=F64)
    for t_, gt in enumerate(g, start=1):
        m, v = beta * m + (1 - beta) * gt, beta * v + (1 - beta) * gt * gt
        mean, var = R.ema_moments(gt, mean, var, t_, beta)
        want_mean, want_var = R.state_from_moments(m, v, t_, beta)
        scale = want_mean.abs().max() ** 2
        assert (mean - want_mean).abs().max() <= 1e-13 * want_mean.abs().max()
        # v_hat - m_hat^2 itself carries eps * m_hat^2 of rounding: compared on that scale
        assert (var - want_var).abs().max() <= 1e-12 * scale


def test_ema_weights_avoid_cancellation():
    alpha, rest = R.ema_weights(2, 0.01)
    assert rest == pytest.approx(0.01 * 0.99 / (1 - 0.01**2), rel=1e-15)  # 1 - alpha formed directly
    assert alpha + rest == pytest.approx(1.0, rel=1e-15)
    a_t, r_t = R.ema_weights(torch.tensor(3), 0.9)  # a device step: tensors, no host read
    assert isinstance(a_t, torch.Tensor) and a_t.item() == pytest.approx(0.1 / (1 - 0.9**3), rel=1e-15)
    assert r_t.item() == pytest.approx(1 - 0.1 / (1 - 0.9**3), rel=1e-14)


def test_sample_moments_by_hand():
    s = t([[[1.0, 0.0]], [[3.0, 0.0]], [[5.0, 0.0]]])  # S=3, M=1, N=2
    mu, var = R.sample_moments(s)
    assert torch.equal(mu, t([[3.0, 0.0]])) and torch.equal(var, t([[4.0, 0.0]]))  # unbiased: 8/2


def test_opinions_by_hand():
    mu, var = t([[2.0, -2.0, 0.0, 0.0]]), t([[3.0, 3.0, 0.0, 1.0]])
    lam, bp, bn, u = R.opinions(mu, var, gamma=1.0, eps=1.0)
    # lam = 1/(3+1) = 1/4, e = 4/4 = 1, S = 3: b = 1/3 on the sign's side, u = 2/3
    assert torch.allclose(lam, t([[0.25, 0.25, 0.0, 0.5]]))
    assert torch.allclose(bp, t([[1 / 3, 0.0, 0.0, 0.0]])) and torch.allclose(bn, t([[0.0, 1 / 3, 0.0, 0.0]]))
    # mu = var = 0: the objective does not reach d -> lam = 0, vacuous; mu = 0 < var: e = 0, u = 1
    assert torch.allclose(u, t([[2 / 3, 2 / 3, 1.0, 1.0]]))
    lam2, *_ = R.opinions(mu, var, gamma=2.0, eps=1.0)
    assert torch.equal(lam2, lam)  # gamma scales evidence, not precision


def test_sigma_zero_gives_precision_one_over_eps():
    lam, bp, _, u = R.opinions(t([[1.0]]), t([[0.0]]), gamma=1.0, eps=1e-4)
    assert lam.item() == pytest.approx(1e4) and bp.item() == pytest.approx(1e4 / (1e4 + 2))


def test_ds_combine_by_hand():
    a = (1 / 3, 0.0, 2 / 3)
    # agreeing: p = 1/9 + 2/9 + 2/9 = 5/9, w = 4/9, sum 1
    bp, bn, u = R.ds_combine(t([[a[0]], [a[0]]]), t([[0.0], [0.0]]), t([[a[2]], [a[2]]]))
    assert (bp.item(), bn.item(), u.item()) == pytest.approx((5 / 9, 0.0, 4 / 9), rel=1e-14)
    # opposite: p = n = 2/9, w = 4/9, 1 - C = 8/9 -> (1/4, 1/4, 1/2)
    bp, bn, u = R.ds_combine(t([[a[0]], [0.0]]), t([[0.0], [a[0]]]), t([[a[2]], [a[2]]]))
    assert (bp.item(), bn.item(), u.item()) == pytest.approx((0.25, 0.25, 0.5), rel=1e-14)


def test_ds_combine_vacuous_is_identity_and_dogmatic_conflict_is_vacuous():
    bp, bn, u = R.ds_combine(t([[0.3], [0.0]]), t([[0.0], [0.0]]), t([[0.7], [1.0]]))
    assert (bp.item(), bn.item(), u.item()) == pytest.approx((0.3, 0.0, 0.7))
    bp, bn, u = R.ds_combine(t([[1.0], [0.0]]), t([[0.0], [1.0]]), t([[0.0], [0.0]]))
    assert (bp.item(), bn.item(), u.item()) == (0.0, 0.0, 1.0)


def test_bogc_equal_weights_give_the_plain_sum():
    mu = t([[1.0, 2.0, 0.5], [3.0, -2.0, 0.0]])
    var = torch.zeros_like(mu)
    # var = 0 and eps tiny: every reaching objective has evidence ~1e8, belief weight ~1
    out, _ = R.bogc_from_moments(mu, var, confidence="none")
    assert torch.allclose(out, mu.sum(0), rtol=1e-7)


def test_bogc_weights_and_confidence_by_hand():
    # objective 0: mu=2, var=3 -> b = 1/3 ; objective 1: mu=1, var=0, eps=1 -> lam=1, e=1, b=1/3
    mu, var = t([[2.0], [1.0]]), t([[3.0], [0.0]])
    out, d = R.bogc_from_moments(mu, var, eps=1.0, confidence="none")
    # equal belief weights: mu_F = 2 * (2 + 1)/2 = 3
    assert out.item() == pytest.approx(3.0)
    out, d = R.bogc_from_moments(mu, var, eps=1.0, confidence="belief")
    # fused: (5/9, 0, 4/9) -> |b+ - b-| = 5/9
    assert out.item() == pytest.approx(3.0 * 5 / 9) and d["uncertainty"].item() == pytest.approx(4 / 9)
    out, _ = R.bogc_from_moments(mu, var, eps=1.0, confidence="certainty")
    assert out.item() == pytest.approx(3.0 * 5 / 9)
    # precision weights: lam = (1/4, 1): mu_F = 2 * (0.25*2 + 1*1)/1.25 = 2.4
    out, d = R.bogc_from_moments(mu, var, eps=1.0, confidence="none", weights="precision")
    assert out.item() == pytest.approx(2.4) and d["weights"].tolist() == pytest.approx([0.2, 0.8])


def test_bogc_unreached_objective_does_not_count():
    mu, var = t([[2.0], [0.0]]), t([[0.0], [0.0]])  # objective 1 does not reach d
    out, d = R.bogc_from_moments(mu, var, eps=1.0, confidence="none")
    assert out.item() == pytest.approx(2.0)  # n = 1: just objective 0
    assert d["weights"].tolist() == pytest.approx([1.0, 0.0])


def test_bogc_single_objective_returns_belief_times_mu():
    mu, var = t([[2.0, -1.0]]), t([[3.0, 1.0]])
    out, _ = R.bogc_from_moments(mu, var, eps=1.0)
    # e = 4/4 = 1 -> b = 1/3 ; e = 1/2 -> b = 0.5/2.5 = 0.2
    assert out.tolist() == pytest.approx([2.0 / 3, -0.2])


def test_confident_opposite_objectives_in_float32_do_not_cancel():
    mu = torch.tensor([[1.0, 5.0], [-1.0, -5.0]], dtype=torch.float32)
    var = torch.zeros_like(mu)
    out, d = R.bogc_from_moments(mu, var)  # e = 1e8, 2.5e9: 1 - C would round to 0
    assert torch.isfinite(out).all() and torch.isfinite(d["uncertainty"]).all()
    assert out.abs().max().item() == 0.0
    assert d["belief_pos"].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    naive_one_minus_c = 1 - (1e8 / (1e8 + 2)) ** 2  # what the textbook formula divides by
    assert torch.tensor(naive_one_minus_c, dtype=torch.float32) == 0 or naive_one_minus_c < 1e-7


def test_huge_gradients_clamp_evidence_instead_of_nan():
    mu = torch.tensor([[1e25], [-3e20]], dtype=torch.float32)  # mu^2 overflows float32
    out, d = R.bogc_from_moments(mu, torch.zeros_like(mu))
    assert torch.isfinite(out).all() and torch.isfinite(d["uncertainty"]).all()


def test_gram_and_combine_by_hand():
    g = t([[1.0, 2.0, 0.0], [3.0, 4.0, 1.0]])
    assert torch.equal(R.gram(g), t([[5.0, 11.0], [11.0, 26.0]]))
    per_group = R.gram(g, group_offsets=torch.tensor([0, 1, 3]))
    assert torch.equal(per_group[0], t([[1.0, 3.0], [3.0, 9.0]]))
    assert torch.equal(R.combine(g, t([2.0, 1.0])), t([5.0, 8.0, 1.0]))
    assert torch.equal(R.combine(g, t([[1.0, 0.0], [0.0, 1.0]]), group_offsets=torch.tensor([0, 1, 3])), t([1.0, 4.0, 1.0]))


def test_mgda_two_objectives_closed_form():
    k = t([[1.0, -1.0], [-1.0, 4.0]])
    # t* = (K22 - K12) / (K11 + K22 - 2 K12) = 5/7, exact (no clamps)
    assert R.mgda_weights(k).tolist() == pytest.approx([5 / 7, 2 / 7], rel=1e-15)
    assert R.mgda_weights(t([[1.0, 2.0], [2.0, 9.0]])).tolist() == [1.0, 0.0]  # min-norm point is g1


def test_mgda_degenerate_cases():
    assert R.mgda_weights(torch.zeros(3, 3, dtype=F64)).tolist() == pytest.approx([1 / 3] * 3)
    k = t([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # objective 1 has no gradient here
    assert R.mgda_weights(k).tolist() == pytest.approx([0.5, 0.0, 0.5], abs=1e-9)


def test_mgda_normalisation():
    k = t([[4.0, 0.0], [0.0, 1.0]])  # orthogonal, norms 2 and 1
    assert R.mgda_weights(k).tolist() == pytest.approx([0.2, 0.8])
    assert R.mgda_weights(k, "l2").tolist() == pytest.approx([0.5, 0.5])  # normalised: symmetric
    assert R.mgda_weights(k, "loss", losses=[2.0, 1.0]).tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="losses"):
        R.mgda_weights(k, "loss")


def test_mmpareto_rule():
    agree = t([[1.0, 0.5], [0.5, 1.0]])  # cosine > 0: (0.5, 0.5), n * alpha = (1, 1); no boost
    assert R.mmpareto_weights(agree, magnitude=1.0).tolist() == pytest.approx([1.0, 1.0])
    assert R.mmpareto_weights(agree).tolist() == pytest.approx([1.5, 1.5])
    conflict = t([[1.0, -0.5], [-0.5, 1.0]])
    w = R.mmpareto_weights(conflict, magnitude=1.0)
    # MGDA gives (0.5, 0.5); 2*alpha = (1, 1) -> ||g1+g2||^2 = 1, so no enlargement: (1, 1)
    assert w.tolist() == pytest.approx([1.0, 1.0])
    lopsided = t([[4.0, -1.0], [-1.0, 1.0]])
    w = R.mmpareto_weights(lopsided, magnitude=1.0)
    alpha = R.mgda_weights(lopsided)
    c = 2 * alpha
    c_norm = math.sqrt(float(c @ lopsided @ c))
    sum_norm = math.sqrt(float(lopsided.sum()))
    assert w.tolist() == pytest.approx((c * max(1.0, sum_norm / c_norm)).tolist())


def test_mimo_weights():
    w = R.mimo_weights(t([0.3, 1.0, 1.0 + math.log(3.0)]), rho=2.0, tau=1.0)
    assert w.tolist() == pytest.approx([1.0, 2 * 0.25, 2 * 0.75])  # softmax of (1, 1+log 3) = (1/4, 3/4)


@pytest.mark.parametrize("weights", ["belief", "precision"])
def test_subnormal_weight_sums_do_not_overflow_in_float32(weights):
    # e = mu^2 / var ~ 1e-40: belief weights are subnormal and 1/sum(w) would be inf
    mu = torch.tensor([[1e-20, -3e-20, 2e-20], [2e-20, 1e-20, 0.0]], dtype=torch.float32)
    out, d = R.bogc_from_moments(mu, torch.ones_like(mu), weights=weights, confidence="none")
    ref, _ = R.bogc_from_moments(mu.double(), torch.ones_like(mu).double(), weights=weights, confidence="none")
    assert torch.isfinite(out).all() and torch.isfinite(d["weights"]).all()
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=0)
