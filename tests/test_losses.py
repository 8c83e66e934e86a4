"""Every loss against values worked out by hand; DPOP's invariants and its pinned form; the registry's errors.

The shared example, β = 0.5, float64 so that comparing at 1e-6 tests the math and not the rounding:

    pair   lw    ll    rw    rl  |y_w| |y_l|  lw−rw  ll−rl   Δ   β·Δ   (lw−rw)/|y_w|  (ll−rl)/|y_l|  Δ_avg
     0    −10   −14   −11   −12    2     4      1     −2     3   1.5       0.5           −0.5         1
     1    −13   −15   −11   −12    4     3     −2     −3     1   0.5      −0.5           −1           0.5

Pair 0's chosen log-prob rose above the reference's; pair 1's fell 2 nats below it (DPOP penalty 2).
Implicit rewards: c_w = β(lw − rw) = (0.5, −1.0), c_l = β(ll − rl) = (−1.0, −1.5).

Constants used below, sp(x) = log(1 + eˣ) = −log σ(−x), with sp(x) = sp(−x) + x:
    sp(−2) = 0.126928011043    sp(−1.5) = 0.201413277983   sp(−1) = 0.313261687518
    sp(−0.5) = 0.474076984180  sp(−0.375) = 0.523123264140 sp(−0.25) = 0.575939419879
    sp(0) = ln 2 = 0.693147180560                          sp(1.25) = sp(−1.25) + 1.25 = 1.501929081345
    σ(0.5) = 0.622459331202    σ(1) = 0.731058578630      σ(1.5) = 0.817574476194   σ(3) = 0.952574126822
    e^−1.5 = 0.223130160148    e^−0.5 = 0.606530659713
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dpop.errors import ConfigError
from dpop.losses import LOSSES, OPTION_HELP, dpop_penalty, get_loss, loss_option_defaults, loss_options, preference_loss

BETA = 0.5


def example(**overrides):
    """The table above as float64 tensors (a fresh copy each call, so tests may set requires_grad)."""
    values = dict(policy_chosen_logps=[-10.0, -13.0], policy_rejected_logps=[-14.0, -15.0],
                  ref_chosen_logps=[-11.0, -11.0], ref_rejected_logps=[-12.0, -12.0],
                  chosen_lengths=[2, 4], rejected_lengths=[4, 3], chosen_kl=[0.25, 0.5], rejected_kl=[1.0, 0.125],
                  desirable=[True, False])  # desirable: labels for an unpaired loss (kto), which reads the rows so
    values.update(overrides)
    kinds = {"chosen_lengths": torch.int64, "rejected_lengths": torch.int64, "desirable": torch.bool}
    return {key: torch.tensor(value, dtype=kinds.get(key, torch.float64)) for key, value in values.items()}


def run(name, beta=BETA, inputs=None, **options):
    inputs = example() if inputs is None else inputs
    return preference_loss(name, inputs["policy_chosen_logps"], inputs["policy_rejected_logps"],
                           inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=beta,
                           chosen_lengths=inputs["chosen_lengths"], rejected_lengths=inputs["rejected_lengths"],
                           chosen_kl=inputs.get("chosen_kl"), rejected_kl=inputs.get("rejected_kl"),
                           desirable=inputs.get("desirable"), **options)


def assert_values(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


IMPLICIT_CHOSEN, IMPLICIT_REJECTED = [0.5, -1.0], [-1.0, -1.5]


# ---- reference-based losses on the shared example ---------------------------------------------------------

def test_dpo():
    """−log σ(βΔ) = sp(−βΔ): pair 0 sp(−1.5) = 0.201413277983, pair 1 sp(−0.5) = 0.474076984180."""
    losses, chosen, rejected = run("dpo")
    assert_values(losses, [0.201413277983, 0.474076984180])
    assert_values(chosen, IMPLICIT_CHOSEN)
    assert_values(rejected, IMPLICIT_REJECTED)


def test_dpop_default_lambda():
    """λ = 50. Pair 0: penalty max(0, −11 − (−10)) = 0, so DPO's 0.201413277983.
    Pair 1: penalty max(0, −11 − (−13)) = 2; β(Δ − λ·2) = 0.5·(1 − 100) = −49.5; sp(49.5) = 49.5 + sp(−49.5)
    = 49.5 + 3e−22. Rewards stay the plain implicit ones."""
    losses, chosen, rejected = run("dpop")
    assert_values(losses, [0.201413277983, 49.5])
    assert_values(chosen, IMPLICIT_CHOSEN)
    assert_values(rejected, IMPLICIT_REJECTED)


def test_dpop_penalty_helper():
    """max(0, rw − lw): pair 0 max(0, −1) = 0, pair 1 max(0, 2) = 2."""
    inputs = example()
    assert_values(dpop_penalty(inputs["policy_chosen_logps"], inputs["ref_chosen_logps"]), [0.0, 2.0])


def test_ipo_uses_length_averaged_log_ratios():
    """(Δ_avg − 1/(2β))² with 1/(2β) = 1: pair 0 (1 − 1)² = 0, pair 1 (0.5 − 1)² = 0.25.
    On sums it would be (3 − 1)² = 4 and (1 − 1)² = 0: the first pair tells the two forms apart."""
    losses, chosen, rejected = run("ipo")
    assert_values(losses, [0.0, 0.25])
    assert_values(chosen, IMPLICIT_CHOSEN)  # rewards stay summed
    assert not torch.allclose(losses, torch.tensor([4.0, 0.0], dtype=losses.dtype))


def test_hinge():
    """max(0, 1 − βΔ): pair 0 max(0, 1 − 1.5) = 0, pair 1 max(0, 1 − 0.5) = 0.5."""
    assert_values(run("hinge")[0], [0.0, 0.5])


def test_robust_unbiased_estimator():
    """ε = 0.1: [(1−ε)·sp(−z) − ε·sp(z)] / (1 − 2ε), z = βΔ.
    z = 1.5: (0.9·0.201413277983 − 0.1·1.701413277983)/0.8 = (0.181271950185 − 0.170141327798)/0.8
             = 0.011130622387/0.8 = 0.013913277983
    z = 0.5: (0.9·0.474076984180 − 0.1·0.974076984180)/0.8 = (0.426669285762 − 0.097407698418)/0.8
             = 0.329261587344/0.8 = 0.411576984180"""
    assert_values(run("robust", label_smoothing=0.1)[0], [0.013913277983, 0.411576984180])
    torch.testing.assert_close(run("robust", label_smoothing=0.0)[0], run("dpo")[0], atol=1e-12, rtol=0)


def test_cdpo_label_smoothed_bce():
    """ε = 0.1: (1−ε)·sp(−z) + ε·sp(z).
    z = 1.5: 0.181271950185 + 0.170141327798 = 0.351413277983
    z = 0.5: 0.426669285762 + 0.097407698418 = 0.524076984180
    (Differs from robust: no division by 1 − 2ε, and the flipped term is added, not subtracted.)"""
    assert_values(run("cdpo", label_smoothing=0.1)[0], [0.351413277983, 0.524076984180])


@pytest.mark.parametrize("name", ["robust", "cdpo", "aot"])
@pytest.mark.parametrize("epsilon", [-0.1, 0.5, 0.7])
def test_label_smoothing_range(name, epsilon):
    with pytest.raises(ConfigError, match="label_smoothing"):
        run(name, label_smoothing=epsilon)


def test_rpo():
    """α = 1: DPO + α·(−lw/|y_w|). Pair 0: 0.201413277983 + 10/2 = 5.201413277983.
    Pair 1: 0.474076984180 + 13/4 = 3.724076984180. α = 0.5 adds 2.5 and 1.625 instead."""
    assert_values(run("rpo")[0], [5.201413277983, 3.724076984180])
    assert_values(run("rpo", rpo_alpha=0.5)[0], [2.701413277983, 2.099076984180])
    torch.testing.assert_close(run("rpo", rpo_alpha=0.0)[0], run("dpo")[0], atol=1e-12, rtol=0)


def test_sigmoid_norm():
    """sp(−β·Δ_avg): pair 0 β·1 = 0.5 → sp(−0.5) = 0.474076984180; pair 1 β·0.5 = 0.25 → sp(−0.25)
    = 0.575939419879. Rewards stay summed."""
    losses, chosen, _ = run("sigmoid_norm")
    assert_values(losses, [0.474076984180, 0.575939419879])
    assert_values(chosen, IMPLICIT_CHOSEN)


def test_bco_pair():
    """sp(−c_w) + sp(c_l). Pair 0: sp(−0.5) + sp(−1) = 0.474076984180 + 0.313261687518 = 0.787338671698.
    Pair 1: sp(1) + sp(−1.5) = 1.313261687518 + 0.201413277983 = 1.514674965501."""
    assert_values(run("bco_pair")[0], [0.787338671698, 1.514674965501])


def test_sppo_hard():
    """(lw − rw − 1/(2β))² + (ll − rl + 1/(2β))², 1/(2β) = 1. Pair 0: (1 − 1)² + (−2 + 1)² = 0 + 1 = 1.
    Pair 1: (−2 − 1)² + (−3 + 1)² = 9 + 4 = 13."""
    assert_values(run("sppo_hard")[0], [1.0, 13.0])


def test_nca_pair():
    """sp(−c_w) + ½·sp(c_w) + ½·sp(c_l).
    Pair 0: sp(−0.5) + ½·sp(0.5) + ½·sp(−1) = 0.474076984180 + 0.487038492090 + 0.156630843759 = 1.117746320029
    Pair 1: sp(1) + ½·sp(−1) + ½·sp(−1.5) = 1.313261687518 + 0.156630843759 + 0.100706638992 = 1.570599170269"""
    assert_values(run("nca_pair")[0], [1.117746320029, 1.570599170269])


def test_exo_pair():
    """ε = 1e−3 (default); log(1−ε) = −0.001000500334, log ε = −6.907755278982; q_w = σ(z), q_l = σ(−z).
    z = 1.5: q_w = 0.817574476194, log q_w = −0.201413277983; q_l = 0.182425523806, log q_l = −1.701413277983
        0.817574476194·(−0.201413277983 + 0.001000500334) = −0.163852371709
        0.182425523806·(−1.701413277983 + 6.907755278982) = 0.949769666647      sum 0.785917294938
    z = 0.5: q_w = 0.622459331202, log q_w = −0.474076984180; q_l = 0.377540668798, log q_l = −0.974076984180
        0.622459331202·(−0.473076483846) = −0.294470871742
        0.377540668798·5.933678294802 = 2.240204871853                          sum 1.945734000110"""
    assert_values(run("exo_pair")[0], [0.785917294938, 1.945734000110])
    with pytest.raises(ConfigError, match="exo_epsilon"):
        run("exo_pair", exo_epsilon=0.0)


def test_apo_zero():
    """σ(−c_w) + σ(c_l). Pair 0: σ(−0.5) + σ(−1) = 0.377540668798 + 0.268941421370 = 0.646482090168.
    Pair 1: σ(1) + σ(−1.5) = 0.731058578630 + 0.182425523806 = 0.913484102436."""
    assert_values(run("apo_zero")[0], [0.646482090168, 0.913484102436])


def test_apo_down():
    """σ(c_w) + σ(−βΔ). Pair 0: σ(0.5) + σ(−1.5) = 0.622459331202 + 0.182425523806 = 0.804884855008.
    Pair 1: σ(−1) + σ(−0.5) = 0.268941421370 + 0.377540668798 = 0.646482090168."""
    assert_values(run("apo_down")[0], [0.804884855008, 0.646482090168])


def test_discopop():
    """(1 − m)·sp(−ρ) + m·e^−ρ, ρ = βΔ, m = σ(ρ/τ).
    τ = 0.5: ρ = 1.5, m = σ(3) = 0.952574126822: 0.047425873178·0.201413277983 + 0.952574126822·0.223130160148
             = 0.009552200578 + 0.212548017471 = 0.222100218049
             ρ = 0.5, m = σ(1) = 0.731058578630: 0.268941421370·0.474076984180 + 0.731058578630·0.606530659713
             = 0.127498937964 + 0.443409441985 = 0.570908379949
    τ = 0.05 (default): ρ = 1.5, m = σ(30) = 1 − 9.4e−14, so e^−1.5 = 0.223130160148;
             ρ = 0.5, m = σ(10) = 0.999954602131: 0.000045397869·0.474076984180 + 0.999954602131·0.606530659713
             = 0.000021522084 + 0.606503124514 = 0.606524646598"""
    assert_values(run("discopop", discopop_tau=0.5)[0], [0.222100218049, 0.570908379949])
    assert_values(run("discopop")[0], [0.223130160148, 0.606524646598])


AOT_EXAMPLE = dict(policy_chosen_logps=[-10.0, -13.0], policy_rejected_logps=[-14.0, -15.0],
                   ref_chosen_logps=[-12.0, -10.0], ref_rejected_logps=[-12.0, -12.0])


def test_aot_pairs_sorted_margins():
    """Policy margins lw − ll = (4, 2), reference margins rw − rl = (0, 2). Sorted: (2, 4) and (0, 2), so
    d = (2, 2), βd = (1, 1), losses sp(−1) = 0.313261687518 twice. Unsorted (DPO) would pair 4 with 0 and 2
    with 2: sp(−2) = 0.126928011043, sp(0) = 0.693147180560. With ε = 0.1: (1−ε)sp(−1) + ε·sp(1) = sp(−1)
    + 0.1·1 = 0.413261687518. Rewards are per pair: c_w = β(lw − rw) = (1, −1.5), c_l = (−1, −1.5)."""
    inputs = example(**AOT_EXAMPLE)
    losses, chosen, rejected = run("aot", inputs=inputs)
    assert_values(losses, [0.313261687518, 0.313261687518])
    assert_values(chosen, [1.0, -1.5])
    assert_values(rejected, [-1.0, -1.5])
    assert_values(run("dpo", inputs=inputs)[0], [0.126928011043, 0.693147180560])
    assert_values(run("aot", inputs=inputs, label_smoothing=0.1)[0], [0.413261687518, 0.413261687518])


def test_aot_is_batch_level():
    """Entry k of AOT's losses belongs to rank k, not to pair k: reordering the pairs of a batch leaves the
    loss vector unchanged (DPO's would be permuted), and a pair's loss depends on its batch-mates."""
    generator = torch.Generator().manual_seed(0)
    logps = [torch.randn(5, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    permutation = torch.tensor([3, 0, 4, 1, 2])
    base = preference_loss("aot", *logps, beta=0.3)[0]
    permuted = preference_loss("aot", *[t[permutation] for t in logps], beta=0.3)[0]
    torch.testing.assert_close(base, permuted, atol=0, rtol=0)
    dpo = preference_loss("dpo", *logps, beta=0.3)[0]
    assert not torch.allclose(preference_loss("dpo", *[t[permutation] for t in logps], beta=0.3)[0], dpo)
    alone = preference_loss("aot", *[t[:1] for t in logps], beta=0.3)[0]
    torch.testing.assert_close(alone, dpo[:1])  # a batch of one is plain DPO (with ε = 0)


# ---- reference-free losses --------------------------------------------------------------------------------

def test_simpo():
    """γ = 0.5, β = 0.5, a = sum/length. Pair 0: a_w = −10/2 = −5, a_l = −14/4 = −3.5;
    β(a_w − a_l) − γ = −0.75 − 0.5 = −1.25 → sp(1.25) = 1.501929081345.
    Pair 1: a_w = −13/4 = −3.25, a_l = −15/3 = −5; 0.875 − 0.5 = 0.375 → sp(−0.375) = 0.523123264140.
    Rewards β·a: chosen (−2.5, −1.625), rejected (−1.75, −2.5)."""
    losses, chosen, rejected = run("simpo")
    assert_values(losses, [1.501929081345, 0.523123264140])
    assert_values(chosen, [-2.5, -1.625])
    assert_values(rejected, [-1.75, -2.5])


def test_cpo():
    """α = 1: sp(−β(lw − ll)) + α·(−lw/|y_w|). Pair 0: β·4 = 2 → sp(−2) + 10/2 = 0.126928011043 + 5
    = 5.126928011043. Pair 1: β·2 = 1 → sp(−1) + 13/4 = 0.313261687518 + 3.25 = 3.563261687518.
    Rewards β·sums: chosen (−5, −6.5), rejected (−7, −7.5)."""
    losses, chosen, rejected = run("cpo")
    assert_values(losses, [5.126928011043, 3.563261687518])
    assert_values(chosen, [-5.0, -6.5])
    assert_values(rejected, [-7.0, -7.5])


def test_orpo():
    """Its own example, chosen so the odds are exact. log odds(a) = a − log(1 − eᵃ).
    Pair 0: lw = −2 ln 2, |y_w| = 2 → a_w = −ln 2, P = 1/2, odds 1, log odds 0;
            ll = −3 ln 4, |y_l| = 3 → a_l = −ln 4, P = 1/4, odds (1/4)/(3/4) = 1/3, log odds −ln 3.
            L_OR = −log σ(ln 3) = log(1 + 1/3) = ln(4/3); NLL = −a_w = ln 2.
            ln 2 + 0.5·ln(4/3) = 0.693147180560 + 0.143841036226 = 0.836988216786
    Pair 1: a_w = −ln 4 (lw = −4 ln 4, |y_w| = 4), a_l = −ln 2 (ll = −ln 2, |y_l| = 1): log odds ratio −ln 3,
            L_OR = log(1 + 3) = ln 4; NLL = ln 4; ln 4 + 0.5·ln 4 = 1.5·ln 4 = 2.079441541680
    Rewards β·a: chosen (−0.5 ln 2, −0.5 ln 4), rejected (−0.5 ln 4, −0.5 ln 2). No reference needed."""
    ln2, ln4 = math.log(2), math.log(4)
    inputs = example(policy_chosen_logps=[-2 * ln2, -4 * ln4], policy_rejected_logps=[-3 * ln4, -ln2],
                     chosen_lengths=[2, 4], rejected_lengths=[3, 1])
    losses, chosen, rejected = preference_loss(
        "orpo", inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], None, None, beta=BETA,
        chosen_lengths=inputs["chosen_lengths"], rejected_lengths=inputs["rejected_lengths"])
    assert_values(losses, [0.836988216786, 2.079441541680])
    assert_values(chosen, [-0.346573590280, -0.693147180560])
    assert_values(rejected, [-0.693147180560, -0.346573590280])


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_reference_free_ignores_reference(name):
    inputs = example()
    with_ref = run(name, inputs=inputs)
    without = preference_loss(name, inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], None, None,
                              beta=BETA, chosen_lengths=inputs["chosen_lengths"],
                              rejected_lengths=inputs["rejected_lengths"])
    for a, b in zip(with_ref, without):
        torch.testing.assert_close(a, b, equal_nan=True)  # sft's rewards are NaN


# ---- DPOP: invariants and the pinned form -----------------------------------------------------------------

def random_pairs(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=generator, dtype=torch.float64) * 40 + 1) for _ in range(4)]


def test_dpop_is_dpo_at_lambda_zero():
    logps = random_pairs()
    assert (logps[0] < logps[2]).any()  # some pairs have a falling chosen log-prob
    assert torch.equal(preference_loss("dpop", *logps, beta=0.3, dpop_lambda=0.0)[0],
                       preference_loss("dpo", *logps, beta=0.3)[0])


def test_dpop_is_dpo_while_chosen_not_below_reference():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = random_pairs(seed=1)
    policy_chosen = torch.maximum(policy_chosen, ref_chosen)
    policy_chosen[:4] = ref_chosen[:4]  # the boundary lw = rw counts as "not below"
    logps = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    for dpop_out, dpo_out in zip(preference_loss("dpop", *logps, beta=0.3, dpop_lambda=50.0),
                                 preference_loss("dpo", *logps, beta=0.3)):
        assert torch.equal(dpop_out, dpo_out)


def test_dpop_gradient_is_dpo_gradient_at_step_zero():
    """At step 0 the policy is the reference, lw = rw exactly: DPOP's gradients must be DPO's there too
    (max(0, ·) takes subgradient 0 at 0; with clamp's 1, DPOP would push lw 51 times harder)."""
    policy_chosen, policy_rejected, _, _ = random_pairs(n=8, seed=2)
    gradients = {}
    for name in ("dpo", "dpop"):
        chosen = policy_chosen.clone().requires_grad_(True)
        rejected = policy_rejected.clone().requires_grad_(True)
        losses = preference_loss(name, chosen, rejected, policy_chosen.clone(), policy_rejected.clone(), beta=0.3)[0]
        gradients[name] = torch.autograd.grad(losses.sum(), (chosen, rejected))
    for dpop_gradient, dpo_gradient in zip(gradients["dpop"], gradients["dpo"]):
        assert torch.equal(dpop_gradient, dpo_gradient)


def chosen_gradient(loss_fn, inputs, **kwargs):
    """∂(loss)/∂lw per pair."""
    policy_chosen = inputs["policy_chosen_logps"].clone().requires_grad_(True)
    losses = loss_fn(policy_chosen, inputs["policy_rejected_logps"], inputs["ref_chosen_logps"],
                     inputs["ref_rejected_logps"], beta=BETA, **kwargs)[0]
    (gradient,) = torch.autograd.grad(losses.sum(), policy_chosen)
    return gradient


def test_dpop_pushes_harder_on_a_fallen_chosen_log_prob():
    """∂(−L)/∂lw, the push that raises the chosen log-prob. Pair 1 has lw < rw.
    DPO:  β·σ(−βΔ) = 0.5·σ(−0.5) = 0.5·0.377540668798 = 0.188770334399
    DPOP (λ = 1): the argument is β(Δ − λ(rw − lw)), whose lw-derivative is β(1 + λ); at
    β(1 − 2) = −0.5 the σ factor is σ(0.5): 0.5·2·0.622459331202 = 0.622459331202.
    Pair 0 (lw > rw): both are β·σ(−1.5) = 0.5·0.182425523806 = 0.091212761903."""
    inputs = example()
    dpo_push = -chosen_gradient(LOSSES["dpo"].fn, inputs)
    dpop_push = -chosen_gradient(LOSSES["dpop"].fn, inputs, dpop_lambda=1.0)
    assert_values(dpo_push, [0.091212761903, 0.188770334399])
    assert_values(dpop_push, [0.091212761903, 0.622459331202])
    assert dpop_push[1] > dpo_push[1] > 0


# The circulating wrong forms, written as loss functions with dpop's signature.
def dpop_penalty_outside_sigmoid(pc, pr, rc, rr, *, beta, dpop_lambda=50.0):
    margin = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * margin) + dpop_lambda * (rc - pc).clamp(min=0), None, None


def dpop_penalty_sign_flipped(pc, pr, rc, rr, *, beta, dpop_lambda=50.0):
    margin = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * (margin + dpop_lambda * (rc - pc).clamp(min=0))), None, None


def dpop_penalty_not_scaled_by_beta(pc, pr, rc, rr, *, beta, dpop_lambda=50.0):
    margin = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * margin - dpop_lambda * (rc - pc).clamp(min=0)), None, None


def assert_corrected_dpop(loss_fn):
    """The corrected DPOP, −log σ(β(Δ − λ·max(0, rw − lw))), on the shared example with λ = 1 and λ = 50:
    λ = 1:  pair 1's argument 0.5·(1 − 2) = −0.5 → sp(0.5) = 0.974076984180
            (outside the sigmoid: sp(−0.5) + 1·2 = 2.474076984180; sign flipped: 0.5·(1 + 2) = 1.5 →
            sp(−1.5) = 0.201413277983; unscaled penalty: 0.5 − 2 = −1.5 → sp(1.5) = 1.701413277983)
    λ = 50: 0.5·(1 − 100) = −49.5 → 49.5 (outside: 0.474 + 100; flipped: 0.5·101 → ~0; unscaled: 0.5 − 100
            → 99.5)
    and the push on a fallen chosen log-prob is stronger than DPO's, which the sign-flipped form reverses."""
    inputs = example()
    args = [inputs[key] for key in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
                                    "ref_rejected_logps")]
    assert_values(loss_fn(*args, beta=BETA, dpop_lambda=1.0)[0], [0.201413277983, 0.974076984180])
    assert_values(loss_fn(*args, beta=BETA, dpop_lambda=50.0)[0], [0.201413277983, 49.5])
    dpo_push = -chosen_gradient(LOSSES["dpo"].fn, inputs)
    assert (-chosen_gradient(loss_fn, inputs, dpop_lambda=1.0))[1] > dpo_push[1]


def test_dpop_has_the_corrected_form():
    assert_corrected_dpop(LOSSES["dpop"].fn)


@pytest.mark.parametrize("wrong_form", [dpop_penalty_outside_sigmoid, dpop_penalty_sign_flipped,
                                        dpop_penalty_not_scaled_by_beta])
def test_the_pin_rejects_the_wrong_forms(wrong_form):
    """The pin above would fail for each circulating wrong form (so it can fail for ours)."""
    with pytest.raises(AssertionError):
        assert_corrected_dpop(wrong_form)


# ---- every loss through the training loop's path ----------------------------------------------------------

@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_runs_through_the_loop_path(name):
    """What the loop does: options from a config mapping holding every option key, then one call."""
    config = {"loss": name, "beta": 0.1, **loss_option_defaults(), "learning_rate": 1e-6}
    inputs = example()
    policy_chosen = inputs["policy_chosen_logps"].float().requires_grad_(True)
    policy_rejected = inputs["policy_rejected_logps"].float().requires_grad_(True)
    losses, chosen, rejected = preference_loss(
        config["loss"], policy_chosen, policy_rejected, inputs["ref_chosen_logps"].float(),
        inputs["ref_rejected_logps"].float(), beta=config["beta"], chosen_lengths=inputs["chosen_lengths"],
        rejected_lengths=inputs["rejected_lengths"], chosen_kl=inputs["chosen_kl"], rejected_kl=inputs["rejected_kl"],
        desirable=inputs["desirable"], **loss_options(config["loss"], config))
    assert losses.shape == chosen.shape == rejected.shape == (2,)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.mean().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(policy_chosen.grad).all() and policy_chosen.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_compute_in_fp32(name):
    inputs = example()
    fp32 = run(name, beta=0.1, inputs={k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    bf16_inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    bf16 = run(name, beta=0.1, inputs=bf16_inputs)  # these integer-valued log-probs are exact in bf16
    for a, b in zip(bf16, fp32):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, equal_nan=True)  # sft's rewards are NaN


@pytest.mark.parametrize("name", list(LOSSES))
def test_extreme_margins_stay_finite(name):
    """Margins of ±4000 nats in fp32: logsigmoid, not log(sigmoid); no exp overflow (discopop, orpo)."""
    policy_chosen = torch.tensor([-1.0, -4000.0, -5.0], requires_grad=True)
    policy_rejected = torch.tensor([-4000.0, -1.0, -5.0], requires_grad=True)
    reference = torch.tensor([-20.0, -20.0, -5.0])
    lengths = torch.tensor([1, 1, 5])
    kl = torch.tensor([0.0, 3000.0, 0.5])
    losses, _, _ = preference_loss(name, policy_chosen, policy_rejected, reference, reference, beta=1.0,
                                   chosen_lengths=lengths, rejected_lengths=lengths, chosen_kl=kl, rejected_kl=kl,
                                   desirable=torch.tensor([True, False, True]))
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(policy_chosen.grad).all()
    # kto's y' (its "rejected") only enters the detached z0; sft does not score a rejected answer
    graded = LOSSES[name].uses_rejected and not LOSSES[name].unpaired
    assert torch.isfinite(policy_rejected.grad).all() if graded else policy_rejected.grad is None


# ---- the registry ------------------------------------------------------------------------------------------

EXPECTED_NAMES = {"dpo", "dpop", "ipo", "hinge", "robust", "cdpo", "rpo", "simpo", "cpo", "orpo", "bco_pair",
                  "sppo_hard", "nca_pair", "exo_pair", "apo_zero", "apo_down", "discopop", "aot", "sigmoid_norm", "sft",
                  "tdpo1", "tdpo2", "kto"}


def test_registry_contents():
    assert set(LOSSES) == EXPECTED_NAMES
    assert {n for n, s in LOSSES.items() if s.reference_free} == {"simpo", "cpo", "orpo", "sft"}
    assert {n for n, s in LOSSES.items() if not s.uses_rejected} == {n for n, s in LOSSES.items() if s.per_token} == {"sft"}
    assert {n for n, s in LOSSES.items() if s.needs_lengths} == {"ipo", "rpo", "sigmoid_norm", "simpo", "cpo",
                                                                 "orpo"}
    assert loss_option_defaults() == {"dpop_lambda": 50.0, "label_smoothing": 0.0, "rpo_alpha": 1.0,
                                      "simpo_gamma": 0.5, "cpo_alpha": 1.0, "exo_epsilon": 1e-3,
                                      "discopop_tau": 0.05, "tdpo_alpha": 0.5, "desirable_weight": 1.0,
                                      "undesirable_weight": 1.0}
    assert {n for n, s in LOSSES.items() if s.unpaired} == {"kto"}
    for name, spec in LOSSES.items():
        assert spec.name == name and spec.citation
        doc = spec.fn.__doc__
        assert "SUMS" in doc or "LENGTH-AVERAGED" in doc, name  # says which log-probs it uses
        assert set(spec.options) <= set(OPTION_HELP)


def test_shared_option_has_one_default():
    """label_smoothing is declared by three losses; the config has one key, so one default."""
    defaults = {}
    for spec in LOSSES.values():
        for option, default in spec.options.items():
            assert defaults.setdefault(option, default) == default, option


def test_unknown_loss_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown loss 'dpoo'.*Did you mean 'dpo' or 'dpop'"):
        get_loss("dpoo")
    with pytest.raises(ConfigError, match="'simpo'"):
        run("simpoo")
    with pytest.raises(ConfigError, match="Valid losses: dpo, dpop"):
        run("zzzzzz")


def test_unknown_option_names_option_and_valid_ones():
    with pytest.raises(ConfigError, match=r"'dpop' has no option 'dpop_lamda'.*its options are: dpop_lambda"):
        run("dpop", dpop_lamda=1.0)
    with pytest.raises(ConfigError, match=r"'dpo' has no option 'dpop_lambda' \(dpop_lambda belongs to: dpop\)"
                                          r"; it takes no options"):
        run("dpo", dpop_lambda=1.0)


def test_bad_values_and_missing_inputs():
    inputs = example()
    with pytest.raises(ConfigError, match="beta must be > 0"):
        run("dpo", beta=0.0)
    with pytest.raises(ConfigError, match="must be a number"):
        run("dpop", dpop_lambda="fifty")
    with pytest.raises(ConfigError, match="dpop_lambda"):
        run("dpop", dpop_lambda=-1.0)
    with pytest.raises(ValueError, match="reference-based"):
        preference_loss("dpop", inputs["policy_chosen_logps"], inputs["policy_rejected_logps"], None, None,
                        beta=0.1)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        preference_loss("ipo", *[inputs[k] for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                     "ref_chosen_logps", "ref_rejected_logps")], beta=0.1)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        preference_loss("dpo", inputs["policy_chosen_logps"], inputs["policy_rejected_logps"][:1],
                        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=0.1)


def test_loss_options_picks_declared_options_and_defaults():
    config = {"loss": "dpop", "beta": 0.3, "label_smoothing": 0.2, "learning_rate": 1e-6}
    assert loss_options("dpop", config) == {"dpop_lambda": 50.0}  # missing -> default; others ignored
    assert loss_options("dpop", {"dpop_lambda": 5}) == {"dpop_lambda": 5.0}
    assert loss_options("dpop", {"dpop_lambda": None}) == {"dpop_lambda": 50.0}
    assert loss_options("robust", config) == {"label_smoothing": 0.2}
    assert loss_options("dpo", config) == {}
    assert loss_options("exo_pair", {}) == {"exo_epsilon": 1e-3}

    class Config:  # a dataclass-like config object works too
        dpop_lambda = 7.0

    assert loss_options("dpop", Config()) == {"dpop_lambda": 7.0}
    with pytest.raises(ConfigError, match="unknown loss"):
        loss_options("dpoop", config)
    with pytest.raises(ConfigError, match="must be a number"):
        loss_options("dpop", {"dpop_lambda": "x"})


# ---- TDPO ------------------------------------------------------------------------------------------------

def test_tdpo_by_hand():
    """example(): lw − rw = [1, −2], ll − rl = [−2, −3], so Δ = [3, 1]; D_w = [0.25, 0.5], D_l = [1, 0.125]; β = 0.5.
    TDPO1: −log σ(0.5·(Δ − (D_l − D_w))) = −log σ([1.125, 0.6875]); TDPO2 (α 0.5): −log σ(0.5·(Δ − 0.5·(D_l − D_w)))
    = −log σ([1.3125, 0.59375])."""
    softplus = torch.nn.functional.softplus
    assert_values(run("tdpo1")[0], softplus(-torch.tensor([1.125, 0.6875], dtype=torch.float64)).tolist())
    assert_values(run("tdpo2")[0], softplus(-torch.tensor([1.3125, 0.59375], dtype=torch.float64)).tolist())
    assert_values(run("tdpo2", tdpo_alpha=0.0)[0], run("dpo")[0].tolist())  # α = 0 is DPO


def test_tdpo2_holds_the_chosen_kl_fixed_and_tdpo1_does_not():
    grads = {}
    for name in ("tdpo1", "tdpo2"):
        inputs = example()
        inputs["chosen_kl"].requires_grad_(True)
        inputs["rejected_kl"].requires_grad_(True)
        run(name, inputs=inputs)[0].sum().backward()
        grads[name] = inputs["chosen_kl"].grad, inputs["rejected_kl"].grad
    assert grads["tdpo2"][0] is None and (grads["tdpo2"][1] > 0).all()
    assert (grads["tdpo1"][0] < 0).all() and (grads["tdpo1"][1] > 0).all()


def test_tdpo_starts_at_ln2():
    zeros = torch.zeros(2, dtype=torch.float64)
    inputs = example(policy_chosen_logps=[-11.0, -11.0], policy_rejected_logps=[-12.0, -12.0])
    inputs.update(chosen_kl=zeros, rejected_kl=zeros)
    for name in ("tdpo1", "tdpo2"):
        assert_values(run(name, inputs=inputs)[0], [math.log(2)] * 2)
