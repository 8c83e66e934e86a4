"""DPO, DPO-Positive and the losses built directly on DPO's log-ratio margin.

Notation (DESIGN.md §1), every tensor shape (B,), one entry per preference pair:
    lw = log πθ(y_w|x), ll = log πθ(y_l|x)     policy log-prob SUMS over response tokens
    rw = log πref(y_w|x), rl = log πref(y_l|x)  reference log-prob sums
    Δ = (lw − rw) − (ll − rl)
    |y_w|, |y_l| = response token counts (only the losses that say so use them)

Every function returns (losses, chosen_rewards, rejected_rewards). The rewards are the implicit rewards
r_w = β·(lw − rw), r_l = β·(ll − rl), detached: they are for metrics, never for the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpop.losses._common import LossOutput, Tensor, as_float, implicit_rewards, logratio_margin, per_token
from dpop.losses.options import check_option


def dpop_penalty(policy_chosen_logps: Tensor, ref_chosen_logps: Tensor) -> Tensor:
    """DPOP's penalty max(0, rw − lw), shape (B,): how far the chosen log-prob SUM has fallen below the
    reference's. Zero while πθ(y_w|x) ≥ πref(y_w|x). Pal et al. 2024, eq. 3. Keeps the graph (detach it
    for metrics).

    relu, not clamp(min=0): at lw = rw exactly (step 0, when the policy starts as the reference) relu's
    subgradient is 0 and clamp's is 1, which would make DPOP's first step push lw (1 + λ) times harder
    than DPO's instead of being DPO."""
    return torch.relu(as_float(ref_chosen_logps) - as_float(policy_chosen_logps))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float) -> LossOutput:
    """DPO: −log σ(β·Δ). Rafailov et al. 2023, eq. 7. Uses log-prob SUMS.

    Args:
        policy_chosen_logps, policy_rejected_logps: lw, ll, shape (B,).
        ref_chosen_logps, ref_rejected_logps: rw, rl, shape (B,).
        beta: β, the strength of the implicit KL constraint.
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,).
    """
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * margin)  # eq. 7
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def dpop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              beta: float, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive: −log σ(β·(Δ − λ·max(0, rw − lw))). Pal et al. 2024 (Smaug), eq. 3 as corrected in v2.
    Uses log-prob SUMS.

    The penalty sits INSIDE the sigmoid and is scaled by β with the margin. It is zero while the policy
    keeps y_w at least as likely as the reference does, so then the loss is exactly DPO's (and λ = 0 is DPO
    everywhere). Once lw < rw the argument drops by β·λ·(rw − lw): the gradient on lw grows by (1 + λ) and
    its σ factor grows too, so the loss pulls the chosen log-prob back up. Two wrong forms circulate and are
    pinned against in tests/test_losses.py: the penalty added outside the sigmoid, and the penalty with its
    sign flipped, −log σ(β·(Δ + λ·max(0, rw − lw))), which rewards a falling chosen log-prob.

    Args:
        dpop_lambda: λ ≥ 0, weight of the penalty. The paper uses λ = 50 (with β = 0.3).
    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,). The chosen reward is the plain β·(lw − rw),
        as for every reference-based loss; the penalised one is β·(lw − rw − λ·dpop_penalty(lw, rw)).
    """
    check_option("dpop_lambda", dpop_lambda, loss="dpop")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = dpop_penalty(policy_chosen_logps, ref_chosen_logps)
    losses = -F.logsigmoid(beta * (margin - dpop_lambda * penalty))  # eq. 3 (v2)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor) -> LossOutput:
    """IPO: (h − 1/(2β))², h = (lw − rw)/|y_w| − (ll − rl)/|y_l|. Azar et al. 2023, eq. 17 (β is their τ).

    Uses LENGTH-AVERAGED log-ratios. The paper writes sequence log-probs, but with sums the squared loss grows
    with response length and no single β fits pairs of different lengths; TRL averages per token and reports
    that the IPO authors confirmed their results used this form. We do the same, so β values carry over from
    TRL. Rewards stay the summed β·(lw − rw), β·(ll − rl) like every reference-based loss.
    """
    h = (per_token(as_float(policy_chosen_logps) - as_float(ref_chosen_logps), chosen_lengths)
         - per_token(as_float(policy_rejected_logps) - as_float(ref_rejected_logps), rejected_lengths))
    losses = (h - 1.0 / (2.0 * beta)) ** 2  # eq. 17
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def hinge_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
               beta: float) -> LossOutput:
    """Hinge (SLiC): max(0, 1 − β·Δ). Zhao et al. 2023 (SLiC-HF) calibration loss, with the log-ratios to the
    reference in place of raw log-probs and margin 1/β ('hinge-norm' of Liu et al. 2024, RSO). Uses SUMS."""
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1.0 - beta * margin)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def robust_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (rDPO): [−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε). Chowdhury et al. 2024, the unbiased
    DPO loss under preference flips with known rate ε (§3). Uses SUMS.

    In expectation over random flips this equals the clean DPO loss, which is why it is divided by 1 − 2ε
    and why ε must lie in [0, 0.5). Compare cdpo_loss, which smooths the label instead and is not unbiased.

    Args:
        label_smoothing: ε, the assumed probability that a pair's preference label is flipped.
    """
    check_option("label_smoothing", label_smoothing, loss="robust")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * margin
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Conservative DPO (cDPO): −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ), binary cross-entropy against the smoothed
    label 1 − ε. Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO". Uses SUMS.

    Unlike rDPO its minimiser is finite (Δ stops where σ(βΔ) = 1 − ε), which is its point.

    Args:
        label_smoothing: ε in [0, 0.5), the assumed label noise.
    """
    check_option("label_smoothing", label_smoothing, loss="cdpo")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * margin
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def rpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor, rpo_alpha: float = 1.0) -> LossOutput:
    """RPO ("DPO+NLL"): −log σ(βΔ) + α·(−lw / |y_w|). Pang et al. 2024 (Iterative Reasoning Preference
    Optimization), the DPO+NLL loss. The DPO term uses SUMS; the NLL term is y_w's mean per-token NLL.

    The paper divides the NLL by the whole sequence length, prompt included; our prompt is masked
    (DESIGN.md §1), so we divide by the response length |y_w|. The NLL is averaged per pair, then over pairs
    by the caller; TRL's 'sft' term averages over all chosen tokens of the batch instead, which weights long
    responses more (the two agree when the responses have equal lengths). rejected_lengths is unused.

    Args:
        rpo_alpha: α ≥ 0, weight of the NLL term (the paper's α = 1).
    """
    del rejected_lengths
    check_option("rpo_alpha", rpo_alpha, loss="rpo")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    nll = -per_token(policy_chosen_logps, chosen_lengths)
    losses = -F.logsigmoid(beta * margin) + rpo_alpha * nll
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                      beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor) -> LossOutput:
    """Length-normalised DPO: −log σ(β·[(lw − rw)/|y_w| − (ll − rl)/|y_l|]). DPO's eq. 7 on LENGTH-AVERAGED
    log-ratios, as in Tülu 3 (Lambert et al. 2024, §5, "length-normalized DPO") and TRL's 'sigmoid_norm'.
    Rewards stay the summed β·(lw − rw), β·(ll − rl)."""
    h = (per_token(as_float(policy_chosen_logps) - as_float(ref_chosen_logps), chosen_lengths)
         - per_token(as_float(policy_rejected_logps) - as_float(ref_rejected_logps), rejected_lengths))
    losses = -F.logsigmoid(beta * h)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def tdpo1_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
               chosen_kl: Tensor, rejected_kl: Tensor) -> LossOutput:
    """TDPO1: −log σ(β·(Δ − (D_l − D_w))). Zeng et al. 2024 (Token-level Direct Preference Optimization), eq. 17,
    with D_w = D_SeqKL(x, y_w; πref ‖ πθ) = Σ_t KL(πref(·|x, y_w,<t) ‖ πθ(·|x, y_w,<t)) and D_l alike: the token
    KLs over the full vocabulary, summed over each response. Δ on log-prob SUMS; rewards as DPO's."""
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * (margin - (as_float(rejected_kl) - as_float(chosen_kl))))
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def tdpo2_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
               chosen_kl: Tensor, rejected_kl: Tensor, tdpo_alpha: float = 0.5) -> LossOutput:
    """TDPO2: −log σ(β·(Δ − α·(D_l − sg(D_w)))). Zeng et al. 2024, eq. 18: as TDPO1 with the chosen response's
    sequential KL detached and the KL term scaled by α. Δ on log-prob SUMS; rewards as DPO's.

    Args:
        tdpo_alpha: α ≥ 0, weight of the KL term (the paper's 0.5).
    """
    check_option("tdpo_alpha", tdpo_alpha, loss="tdpo2")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    kl_term = as_float(rejected_kl) - as_float(chosen_kl).detach()
    losses = -F.logsigmoid(beta * (margin - tdpo_alpha * kl_term))
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)
