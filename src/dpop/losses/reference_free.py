"""Losses that need no reference model: SimPO, CPO, ORPO, and SFT (the chosen responses' NLL).

lw, ll are policy log-prob SUMS over response tokens (B,); |y_w|, |y_l| token counts; a_w = lw/|y_w| and
a_l = ll/|y_l| the length-averaged log-probs. Every function returns (losses, chosen_rewards,
rejected_rewards), the rewards being β times the policy log-probs the loss itself compares (averaged for
SimPO and ORPO, summed for CPO), detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpop.losses._common import LossOutput, Tensor, as_float, log1mexp, per_token
from dpop.losses.options import check_option

# Largest average log-prob ORPO's odds accept: at exactly 0 (a response of probability 1 in fp32, possible
# for a memorised one) the odds and their gradient are infinite.
_MAX_AVERAGE_LOGP = -1e-6


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float, chosen_lengths: Tensor,
               rejected_lengths: Tensor, simpo_gamma: float = 0.5) -> LossOutput:
    """SimPO: −log σ(β·a_w − β·a_l − γ). Meng et al. 2024 (SimPO: Simple Preference Optimization with a
    Reference-Free Reward), eq. 6. Uses LENGTH-AVERAGED log-probs; rewards β·a_w, β·a_l.

    Pure SimPO, no NLL term: TRL's CPOTrainer adds its CPO NLL term to SimPO unless cpo_alpha = 0. The
    paper's β is large (2 to 2.5), much larger than DPO's.

    Args:
        simpo_gamma: γ ≥ 0, the target reward margin (TRL's default 0.5; the paper tunes γ/β ≈ 0.5).
    """
    check_option("simpo_gamma", simpo_gamma, loss="simpo")
    chosen_average = per_token(policy_chosen_logps, chosen_lengths)
    rejected_average = per_token(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen_average - rejected_average) - simpo_gamma)  # eq. 6
    return losses, (beta * chosen_average).detach(), (beta * rejected_average).detach()


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float, chosen_lengths: Tensor,
             rejected_lengths: Tensor, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO: −log σ(β·(lw − ll)) + α·(−lw/|y_w|). Xu et al. 2024 (Contrastive Preference Optimization),
    L_prefer of eq. 3 on log-prob SUMS plus the behaviour-cloning NLL term on y_w, as the mean per-token NLL.
    Rewards β·lw, β·ll.

    The NLL is averaged per pair (TRL averages over all chosen tokens of the batch; equal when the chosen
    responses have equal lengths). rejected_lengths is unused.

    Args:
        cpo_alpha: α ≥ 0, weight of the NLL term (the paper's and TRL's 1).
    """
    del rejected_lengths
    check_option("cpo_alpha", cpo_alpha, loss="cpo")
    chosen, rejected = as_float(policy_chosen_logps), as_float(policy_rejected_logps)
    nll = -per_token(chosen, chosen_lengths)
    losses = -F.logsigmoid(beta * (chosen - rejected)) + cpo_alpha * nll  # eq. 3 + NLL
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float, chosen_lengths: Tensor,
              rejected_lengths: Tensor) -> LossOutput:
    """ORPO: −a_w + β·(−log σ(log odds(y_w) − log odds(y_l))), odds(y) = P(y)/(1 − P(y)), P(y) = exp(a_y).
    Hong et al. 2024 (ORPO: Monolithic Preference Optimization without Reference Model), eq. 6 (L_SFT + λ·L_OR)
    with L_OR of eq. 7 and the length-normalised P of eq. 4. Uses LENGTH-AVERAGED log-probs for both terms;
    rewards β·a_w, β·a_l.

    β plays the paper's λ (the weight of the odds-ratio term; the paper uses 0.1 to 0.25), as in TRL. The
    SFT term is y_w's mean per-token NLL per pair (TRL: over all chosen tokens of the batch). Average
    log-probs are capped just below 0 so that a response of probability 1 does not make the odds infinite.
    """
    chosen_average = per_token(policy_chosen_logps, chosen_lengths).clamp(max=_MAX_AVERAGE_LOGP)
    rejected_average = per_token(policy_rejected_logps, rejected_lengths).clamp(max=_MAX_AVERAGE_LOGP)
    # log odds(y) = log P − log(1 − P) = a − log1mexp(a)
    log_odds_ratio = (chosen_average - log1mexp(chosen_average)) - (rejected_average - log1mexp(rejected_average))
    losses = -chosen_average - beta * F.logsigmoid(log_odds_ratio)  # eq. 6, eq. 7
    return losses, (beta * chosen_average).detach(), (beta * rejected_average).detach()


def sft_loss(policy_chosen_logps, policy_rejected_logps, *, beta: float) -> LossOutput:
    """SFT: the NLL −lw of the chosen response (lw its log-prob SUMS), per pair; y_l and β are unused. Its spec normalises by tokens:
    a step's loss is Σ −lw over Σ |y_w| of the step's pairs, the cross-entropy per chosen token, so long
    responses weigh by their length as in plain causal-LM fine-tuning. There are no rewards (NaN)."""
    del policy_rejected_logps, beta
    losses = -as_float(policy_chosen_logps)
    no_rewards = torch.full_like(losses, math.nan).detach()
    return losses, no_rewards, no_rewards.clone()
