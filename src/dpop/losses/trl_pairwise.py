"""The rest of TRL 1.16's pairwise set: reference-based losses from other papers, same definitions as TRL.

Notation as in reference_based.py: lw, ll, rw, rl are log-prob SUMS (B,), Δ = (lw − rw) − (ll − rl),
and c_w = β·(lw − rw), c_l = β·(ll − rl) are the implicit rewards. Every function returns
(losses, chosen_rewards, rejected_rewards) with the rewards = (c_w, c_l), detached. All use SUMS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpop.losses._common import LossOutput, as_float, implicit_rewards, log_ratios, logratio_margin
from dpop.losses.options import check_option


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float) -> LossOutput:
    """BCO, pairwise: −log σ(c_w) − log σ(−c_l). Jung et al. 2024 (Binary Classifier Optimization), the
    binary cross-entropy of a classifier whose logit is the implicit reward, y_w labelled 1 and y_l 0.
    Uses SUMS.

    As in TRL's 'bco_pair', the paper's reward shift δ (a running mean of rewards) is left out (δ = 0)."""
    chosen_logratios, rejected_logratios = log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                       ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                   beta: float) -> LossOutput:
    """SPPO with hard probabilities: (lw − rw − 1/(2β))² + (ll − rl + 1/(2β))². Wu et al. 2024 (Self-Play
    Preference Optimization), eq. 4.7 of Algorithm 1 with the win probability set to 1 for y_w and 0 for y_l
    (the paper estimates it with PairRM) and η = 1/β. The reference plays the paper's previous-iteration
    policy π_t: each log-ratio is regressed onto ±1/(2β) separately, not their difference. Uses SUMS."""
    chosen_logratios, rejected_logratios = log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                       ref_chosen_logps, ref_rejected_logps)
    target = 1.0 / (2.0 * beta)
    losses = (chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2  # eq. 4.7, P ∈ {0, 1}
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float) -> LossOutput:
    """NCA, pairwise: −log σ(c_w) − ½·log σ(−c_w) − ½·log σ(−c_l). Chen et al. 2024 (Noise Contrastive
    Alignment of Language Models with Explicit Rewards), the NCA loss for K = 2 responses of which y_w is
    the preferred one. Unlike DPO it optimises each implicit reward on its own scale, so it is less prone
    to pushing both log-probs down together. Uses SUMS."""
    chosen_logratios, rejected_logratios = log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                       ref_chosen_logps, ref_rejected_logps)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    losses = (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
              - 0.5 * F.logsigmoid(-rejected_rewards))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float, exo_epsilon: float = 1e-3) -> LossOutput:
    """EXO, pairwise: KL(q ‖ p) with q = (σ(βΔ), σ(−βΔ)) and the smoothed label p = (1 − ε, ε), i.e.
    σ(βΔ)·(log σ(βΔ) − log(1−ε)) + σ(−βΔ)·(log σ(−βΔ) − log ε). Ji et al. 2024 (Towards Efficient Exact
    Optimization of Language Model Alignment), eq. 16 with K = 2. Uses SUMS.

    The reverse KL is the point of EXO (mode-seeking, where DPO's forward cross-entropy is mean-seeking), and
    it needs ε > 0: at ε = 0, log ε is −∞. TRL reads this ε from its shared `label_smoothing` and refuses 0;
    we give it its own option so that the default config runs (the paper's ε = 1e-3).

    Args:
        exo_epsilon: ε in (0, 1), the label smoothing of EXO's target distribution.
    """
    check_option("exo_epsilon", exo_epsilon, loss="exo_pair")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * margin
    log_q_chosen, log_q_rejected = F.logsigmoid(z), F.logsigmoid(-z)
    losses = (log_q_chosen.exp() * (log_q_chosen - math.log1p(-exo_epsilon))
              + log_q_rejected.exp() * (log_q_rejected - math.log(exo_epsilon)))  # eq. 16
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float) -> LossOutput:
    """APO-zero: (1 − σ(c_w)) + σ(c_l). D'Oosterlinck et al. 2024 (Anchored Preference Optimization and
    Contrastive Revisions), eq. 7: raise y_w's likelihood and lower y_l's, each anchored at the reference.
    For data whose chosen responses are better than the model's own outputs. Uses SUMS."""
    chosen_logratios, rejected_logratios = log_ratios(policy_chosen_logps, policy_rejected_logps,
                                                       ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(-beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)  # eq. 7
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float) -> LossOutput:
    """APO-down: σ(c_w) + (1 − σ(β·Δ)). D'Oosterlinck et al. 2024, eq. 8: lower y_w's likelihood and y_l's by
    more. For data whose chosen responses are worse than the model's own outputs. Uses SUMS."""
    chosen_logratios, _ = log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps)
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(-beta * margin)  # eq. 8
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def discopop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                  beta: float, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): (1 − m)·(−log σ(ρ)) + m·exp(−ρ), ρ = β·Δ, m = σ(ρ/τ).
    Lu et al. 2024 (Discovering Preference Optimization Algorithms with and for Large Language Models), eq. 5.
    Uses SUMS.

    m·exp(−ρ) is computed as exp(log σ(ρ/τ) − ρ) so that a very negative ρ gives 0·∞ = 0, not NaN.

    Args:
        discopop_tau: τ > 0, the temperature of the mixing weight (the paper's 0.05).
    """
    check_option("discopop_tau", discopop_tau, loss="discopop")
    margin = logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    rho = beta * margin
    logistic = -F.logsigmoid(rho)
    exponential_weighted = torch.exp(F.logsigmoid(rho / discopop_tau) - rho)  # σ(ρ/τ)·exp(−ρ)
    losses = torch.sigmoid(-rho / discopop_tau) * logistic + exponential_weighted  # eq. 5
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)


def aot_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired, with hard sorting and the logistic loss: Melnyk et al. 2024 (Distributional Preference
    Alignment of LLMs via Optimal Transport). Sort the policy margins lw − ll and the reference margins
    rw − rl over the batch, pair them by rank, d_k = sorted_policy_k − sorted_ref_k, and apply the
    (label-smoothed) DPO loss to β·d_k. Uses SUMS.

    BATCH-LEVEL: entry k of `losses` belongs to RANK k, not to pair k, so only the mean is meaningful, and the
    loss depends on which pairs share a micro-batch (accumulating gradients over micro-batches is then not
    the same as one large batch). The rewards are per pair, as usual. This is TRL's 'aot' exactly.

    Args:
        label_smoothing: ε in [0, 0.5), conservative label smoothing as in cdpo_loss (0 = none).
    """
    check_option("label_smoothing", label_smoothing, loss="aot")
    policy_margins = as_float(policy_chosen_logps) - as_float(policy_rejected_logps)
    ref_margins = as_float(ref_chosen_logps) - as_float(ref_rejected_logps)
    rank_delta = torch.sort(policy_margins, dim=0).values - torch.sort(ref_margins, dim=0).values
    z = beta * rank_delta
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                     ref_rejected_logps, beta)
