"""Preference, KTO and reward-model losses against direct float64 computations of the papers' formulas.

The references below use only Python's `math` on plain floats, written from the papers, not from the module.
"""

import math

import pytest
import torch

from longtune.losses.preference import (
    SequenceLogps,
    bradley_terry_accuracy,
    bradley_terry_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    sft_term,
)

TOL = 1e-12

# Hand-made per-sequence log-prob sums and token counts for five pairs of varied lengths.
POLICY_CHOSEN = ([-12.5, -40.25, -3.0, -88.125, -7.75], [5, 17, 2, 41, 3])
POLICY_REJECTED = ([-15.0, -38.5, -9.5, -90.0, -2.25], [6, 15, 4, 39, 1])
REF_CHOSEN = ([-13.0, -41.0, -2.5, -87.0, -8.5], [5, 17, 2, 41, 3])
REF_REJECTED = ([-14.0, -39.75, -8.0, -91.5, -2.0], [6, 15, 4, 39, 1])


def _logps(values, requires_grad=False) -> SequenceLogps:
    sums, counts = values
    return SequenceLogps(
        torch.tensor(sums, dtype=torch.float64, requires_grad=requires_grad), torch.tensor(counts)
    )


def _inputs(requires_grad=False):
    return (_logps(POLICY_CHOSEN, requires_grad), _logps(POLICY_REJECTED, requires_grad),
            _logps(REF_CHOSEN), _logps(REF_REJECTED))


def _log_sigmoid(x: float) -> float:
    # log σ(x) = −log(1 + e^{−x}), written in the form that does not overflow for either sign.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _pairs(mean=False):
    """(π_c, π_r, r_c, r_r) per pair as plain floats, sums or token means."""
    rows = []
    for i in range(len(POLICY_CHOSEN[0])):
        vals = []
        for seq in (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED):
            s, n = seq[0][i], seq[1][i]
            vals.append(s / n if mean else s)
        rows.append(vals)
    return rows


def _assert_close(got: torch.Tensor, want: list[float]) -> None:
    assert got.dtype == torch.float64
    assert got.shape == (len(want),)
    for g, w in zip(got.tolist(), want):
        assert abs(g - w) <= TOL, (g, w)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_dpo_with_label_smoothing(beta, eps):
    out = dpo_loss(*_inputs(), loss_type="sigmoid", beta=beta, label_smoothing=eps)
    want, want_c, want_r = [], [], []
    for pc, pr, rc, rr in _pairs():
        h = (pc - rc) - (pr - rr)
        want.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        want_c.append(beta * (pc - rc))
        want_r.append(beta * (pr - rr))
    _assert_close(out.loss, want)
    _assert_close(out.chosen_rewards, want_c)
    _assert_close(out.rejected_rewards, want_r)


def test_ipo_uses_token_means():
    beta = 0.25
    out = dpo_loss(*_inputs(), loss_type="ipo", beta=beta)
    want, want_c, want_r = [], [], []
    for pc, pr, rc, rr in _pairs(mean=True):
        h = (pc - rc) - (pr - rr)
        want.append((h - 1 / (2 * beta)) ** 2)
        want_c.append(beta * (pc - rc))
        want_r.append(beta * (pr - rr))
    _assert_close(out.loss, want)
    _assert_close(out.chosen_rewards, want_c)
    _assert_close(out.rejected_rewards, want_r)


def test_hinge():
    beta = 0.8
    out = dpo_loss(*_inputs(), loss_type="hinge", beta=beta)
    want = [max(0.0, 1 - beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr in _pairs()]
    _assert_close(out.loss, want)
    assert 0.0 in want and any(w > 0 for w in want)  # both sides of the hinge are exercised
    _assert_close(out.chosen_rewards, [beta * (pc - rc) for pc, _, rc, _ in _pairs()])


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_simpo_is_reference_free_on_token_means(gamma):
    beta = 2.0
    pc_lp, pr_lp, _, _ = _inputs()
    out = dpo_loss(pc_lp, pr_lp, None, None, loss_type="simpo", beta=beta, simpo_gamma=gamma)
    want = [-_log_sigmoid(beta * pc - beta * pr - gamma) for pc, pr, _, _ in _pairs(mean=True)]
    _assert_close(out.loss, want)
    _assert_close(out.chosen_rewards, [beta * pc for pc, _, _, _ in _pairs(mean=True)])
    _assert_close(out.rejected_rewards, [beta * pr for _, pr, _, _ in _pairs(mean=True)])


def _orpo_reference(avg_c: float, avg_r: float, lam: float) -> float:
    # ORPO: odds = P/(1−P), log P = token-mean log-prob; L = −avg_c − λ·log σ(log odds_c − log odds_r).
    log_odds_c = avg_c - math.log(-math.expm1(avg_c))
    log_odds_r = avg_r - math.log(-math.expm1(avg_r))
    return -avg_c - lam * _log_sigmoid(log_odds_c - log_odds_r)


def test_orpo_on_token_means():
    beta = 0.1
    pc_lp, pr_lp, _, _ = _inputs()
    out = dpo_loss(pc_lp, pr_lp, None, None, loss_type="orpo", beta=beta)
    _assert_close(out.loss, [_orpo_reference(pc, pr, beta) for pc, pr, _, _ in _pairs(mean=True)])
    _assert_close(out.chosen_rewards, [beta * pc for pc, _, _, _ in _pairs(mean=True)])


def test_orpo_stable_near_zero_and_far_below():
    # Token means of −1e-9 .. −1e-3 (the model is nearly certain) and −40 (where 1 − e^x rounds to 1).
    chosen = SequenceLogps(torch.tensor([-1e-8, -3e-3, -2e-9, -40.0], dtype=torch.float64, requires_grad=True),
                           torch.tensor([10, 3, 2, 1]))
    rejected = SequenceLogps(torch.tensor([-5e-7, -1e-6, -8.0, -1e-4], dtype=torch.float64),
                             torch.tensor([5, 1, 4, 2]))
    out = dpo_loss(chosen, rejected, None, None, loss_type="orpo", beta=0.5)
    want = [_orpo_reference(c / nc, r / nr, 0.5)
            for c, nc, r, nr in zip([-1e-8, -3e-3, -2e-9, -40.0], [10, 3, 2, 1], [-5e-7, -1e-6, -8.0, -1e-4],
                                    [5, 1, 4, 2])]
    assert all(math.isfinite(w) for w in want)
    _assert_close(out.loss, want)
    out.loss.sum().backward()
    assert torch.isfinite(chosen.sum.grad).all()


def test_dpo_with_policy_equal_reference_is_ln2_and_ipo_closed_form():
    pc_lp, pr_lp, _, _ = _inputs()
    out = dpo_loss(pc_lp, pr_lp, pc_lp, pr_lp, loss_type="sigmoid", beta=0.1)
    assert out.loss.tolist() == [math.log(2.0)] * 5
    assert out.chosen_rewards.tolist() == [0.0] * 5
    for beta in (0.1, 0.3, 2.0):
        out = dpo_loss(pc_lp, pr_lp, pc_lp, pr_lp, loss_type="ipo", beta=beta)
        _assert_close(out.loss, [(1 / (2 * beta)) ** 2] * 5)


def test_preference_metrics():
    beta = 0.5
    out = dpo_loss(*_inputs(), loss_type="sigmoid", beta=beta)
    m = out.metrics()
    rows = _pairs()
    rc = [beta * (pc - rc_) for pc, _, rc_, _ in rows]
    rr = [beta * (pr - rr_) for _, pr, _, rr_ in rows]
    n = len(rows)
    assert abs(m["rewards/chosen"] - sum(rc) / n) <= TOL
    assert abs(m["rewards/rejected"] - sum(rr) / n) <= TOL
    assert abs(m["rewards/margins"] - sum(a - b for a, b in zip(rc, rr)) / n) <= TOL
    assert m["rewards/accuracies"] == sum(a > b for a, b in zip(rc, rr)) / n
    assert abs(m["logps/chosen"] - sum(POLICY_CHOSEN[0]) / n) <= TOL
    assert abs(m["logps/rejected"] - sum(POLICY_REJECTED[0]) / n) <= TOL


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_reference_based_types_need_reference(loss_type):
    pc_lp, pr_lp, rc_lp, _ = _inputs()
    with pytest.raises(ValueError, match="reference log-probs"):
        dpo_loss(pc_lp, pr_lp, None, None, loss_type=loss_type, beta=0.1)
    with pytest.raises(ValueError, match="reference log-probs"):
        dpo_loss(pc_lp, pr_lp, rc_lp, None, loss_type=loss_type, beta=0.1)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_types_accept_missing_or_given_reference(loss_type):
    pc_lp, pr_lp, rc_lp, rr_lp = _inputs()
    without = dpo_loss(pc_lp, pr_lp, None, None, loss_type=loss_type, beta=0.1)
    with_ref = dpo_loss(pc_lp, pr_lp, rc_lp, rr_lp, loss_type=loss_type, beta=0.1)
    assert torch.equal(without.loss, with_ref.loss)


def test_invalid_arguments_are_rejected():
    args = _inputs()
    with pytest.raises(ValueError, match="unknown preference loss_type"):
        dpo_loss(*args, loss_type="dpo", beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, loss_type="sigmoid", beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="ipo", beta=0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="sigmoid", beta=0.1, label_smoothing=0.5)
    short = SequenceLogps(torch.zeros(3, dtype=torch.float64), torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(args[0], short, args[2], args[3], loss_type="sigmoid", beta=0.1)


def test_sft_term_is_token_mean_nll():
    _assert_close(sft_term(_logps(POLICY_CHOSEN)), [-s / n for s, n in zip(*POLICY_CHOSEN)])


# KTO: six examples, mixed desirable / undesirable, varied lengths.
KTO_POLICY = [-10.0, -22.5, -4.25, -60.0, -18.0, -1.5]
KTO_REF = [-11.5, -21.0, -4.0, -63.0, -16.5, -2.5]
KTO_DESIRABLE = [True, False, True, False, False, True]
KTO_COUNTS = [4, 9, 2, 20, 7, 1]


def _kto_reference(z0, beta, w_d, w_u):
    losses, rewards = [], []
    for p, r, d in zip(KTO_POLICY, KTO_REF, KTO_DESIRABLE):
        ratio = p - r
        if d:
            losses.append(w_d * (1 - _sigmoid(beta * (ratio - z0))))
        else:
            losses.append(w_u * (1 - _sigmoid(beta * (z0 - ratio))))
        rewards.append(beta * ratio)
    return losses, rewards


def _kto_inputs(requires_grad=False):
    policy = SequenceLogps(torch.tensor(KTO_POLICY, dtype=torch.float64, requires_grad=requires_grad),
                           torch.tensor(KTO_COUNTS))
    ref = SequenceLogps(torch.tensor(KTO_REF, dtype=torch.float64), torch.tensor(KTO_COUNTS))
    return policy, ref, torch.tensor(KTO_DESIRABLE)


def test_kto_kl_estimate_mean_of_mismatched_pairs_and_clamp():
    # KL pairs: prompt i with completion j != i; their log-prob sums under policy and reference.
    pol = [-30.0, -12.0, -25.5, -8.0]
    ref = [-31.5, -12.5, -24.0, -9.5]
    counts = torch.tensor([9, 4, 8, 3])
    pol_kl = SequenceLogps(torch.tensor(pol, dtype=torch.float64, requires_grad=True), counts)
    ref_kl = SequenceLogps(torch.tensor(ref, dtype=torch.float64), counts)
    kl = kto_kl_estimate(pol_kl, ref_kl)
    assert kl.shape == () and not kl.requires_grad
    assert abs(float(kl) - sum(p - r for p, r in zip(pol, ref)) / 4) <= TOL
    # A negative mean is clamped to 0 (the paper's z0 = max(0, KL)).
    assert float(kto_kl_estimate(ref_kl, SequenceLogps(pol_kl.sum.detach(), counts))) == 0.0


@pytest.mark.parametrize("kl_value", [0.0, 0.8, -0.6])
def test_kto_loss_mixed_desirable(kl_value):
    beta, w_d, w_u = 0.3, 1.0, 1.33
    policy, ref, desirable = _kto_inputs()
    out = kto_loss(policy, ref, desirable, torch.tensor(kl_value, dtype=torch.float64), beta=beta,
                   chosen_weight=w_d, undesirable_weight=w_u)
    z0 = max(0.0, kl_value)
    want_loss, want_rewards = _kto_reference(z0, beta, w_d, w_u)
    _assert_close(out.loss, want_loss)
    _assert_close(out.rewards, want_rewards)
    assert float(out.kl) == z0
    m = out.metrics()
    chosen = [w for w, d in zip(want_rewards, KTO_DESIRABLE) if d]
    rejected = [w for w, d in zip(want_rewards, KTO_DESIRABLE) if not d]
    assert abs(m["rewards/chosen"] - sum(chosen) / len(chosen)) <= TOL
    assert abs(m["rewards/rejected"] - sum(rejected) / len(rejected)) <= TOL
    assert m["count/chosen"] == 3.0 and m["count/rejected"] == 3.0


def test_kto_rejects_non_bool_mask():
    policy, ref, desirable = _kto_inputs()
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(policy, ref, desirable.long(), torch.tensor(0.0, dtype=torch.float64), beta=0.1,
                 chosen_weight=1.0, undesirable_weight=1.0)


def test_bradley_terry():
    rc = [1.5, -0.25, 3.0, 0.0, -2.0]
    rr = [0.5, 0.75, -1.0, 0.0, -2.5]
    loss = bradley_terry_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64))
    _assert_close(loss, [-_log_sigmoid(c - r) for c, r in zip(rc, rr)])
    acc = bradley_terry_accuracy(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64))
    assert float(acc) == 3 / 5  # the tie counts as wrong


@pytest.mark.parametrize(
    "loss_type,kwargs",
    [("sigmoid", {"label_smoothing": 0.2}), ("ipo", {}), ("hinge", {}), ("simpo", {"simpo_gamma": 0.7}),
     ("orpo", {})],
)
def test_preference_gradcheck(loss_type, kwargs):
    pc_lp, pr_lp, rc_lp, rr_lp = _inputs()
    beta = 0.1 if loss_type != "hinge" else 0.05  # keep 1 − β·h away from the hinge's kink
    refs = (None, None) if loss_type in ("simpo", "orpo") else (rc_lp, rr_lp)

    def f(chosen_sum, rejected_sum):
        return dpo_loss(SequenceLogps(chosen_sum, pc_lp.count), SequenceLogps(rejected_sum, pr_lp.count), *refs,
                        loss_type=loss_type, beta=beta, **kwargs).loss

    if loss_type == "hinge":
        h = (pc_lp.sum - rc_lp.sum) - (pr_lp.sum - rr_lp.sum)
        assert ((1 - beta * h).abs() > 1e-3).all()
    chosen = pc_lp.sum.clone().requires_grad_()
    rejected = pr_lp.sum.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (chosen, rejected))


def test_kto_sft_and_bradley_terry_gradcheck():
    policy, ref, desirable = _kto_inputs()
    kl = torch.tensor(0.4, dtype=torch.float64)

    def kto(policy_sum):
        return kto_loss(SequenceLogps(policy_sum, policy.count), ref, desirable, kl, beta=0.2,
                        chosen_weight=1.0, undesirable_weight=1.5).loss

    assert torch.autograd.gradcheck(kto, (policy.sum.clone().requires_grad_(),))
    chosen = _logps(POLICY_CHOSEN)
    assert torch.autograd.gradcheck(lambda s: sft_term(SequenceLogps(s, chosen.count)),
                                    (chosen.sum.clone().requires_grad_(),))
    rc = torch.tensor([1.5, -0.25, 3.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([0.5, 0.75, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bradley_terry_loss, (rc, rr))


def test_rewards_and_logps_are_detached():
    out = dpo_loss(*_inputs(requires_grad=True), loss_type="sigmoid", beta=0.1)
    assert out.loss.requires_grad
    assert not any(t.requires_grad for t in (out.chosen_rewards, out.rejected_rewards, out.chosen_logps,
                                             out.rejected_logps))
    policy, ref, desirable = _kto_inputs(requires_grad=True)
    kl = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, desirable, kl, beta=0.1, chosen_weight=1.0, undesirable_weight=1.0)
    assert out.loss.requires_grad and not out.rewards.requires_grad and not out.kl.requires_grad
