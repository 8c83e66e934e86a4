"""Losses on unpaired rows: each row is one completion with a label, desirable or not (dpop.data.unpaired).

The positional inputs keep the pair losses' order, read for a row: `chosen` is its completion y, `rejected` the
mismatched completion y' of another prompt, whose log-ratio estimates the reference point.
"""

from __future__ import annotations

import torch

from dpop.losses._common import LossOutput, Tensor, as_float
from dpop.losses.options import check_option


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor, *, reduce=None, weight: float = 1.0) -> Tensor:
    """z0 of one micro-batch: max(0, Σ (log πθ(y'|x) − log πref(y'|x)) / rows), detached. The sum and the row
    count are added over processes by `reduce(tensor) -> tensor` (a collective every process calls; None: this
    process alone); `weight` 0: a process whose share of the micro-batch is empty joins with nothing."""
    ratios = policy_kl_logps.detach().double() - ref_kl_logps.detach().double().to(policy_kl_logps.device)
    totals = torch.stack([ratios.sum(), ratios.new_tensor(float(ratios.numel()))]) * weight
    if reduce is not None:
        totals = reduce(totals)
    point = (totals[0] / totals[1].clamp(min=1)).clamp(min=0)
    return point.to(torch.promote_types(policy_kl_logps.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs


def kto_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, desirable: Tensor, reference_point: Tensor | None = None,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eqs. 7–8), per row: w(y)·(1 − v(x, y)) with r = log πθ(y|x) − log πref(y|x)
    (SUMS over the completion's tokens) and

        v = σ(β(r − z0))  for a desirable y (weight λ_D = desirable_weight),
        v = σ(β(z0 − r))  for an undesirable y (weight λ_U = undesirable_weight),

    z0 = max(0, mean of log πθ(y'|x) − log πref(y'|x) over the micro-batch's mismatched pairs), detached
    (`reference_point`; None: from these rows alone, kto_reference_point). With unit weights a policy equal to its
    reference has loss 0.5. Rewards β·r: the chosen reward of desirable rows and the rejected reward of undesirable
    ones (NaN in the other slot), so their means are TRL's rewards/chosen and rewards/rejected."""
    check_option("desirable_weight", desirable_weight, loss="kto")
    check_option("undesirable_weight", undesirable_weight, loss="kto")
    if reference_point is None:
        reference_point = kto_reference_point(policy_rejected_logps, ref_rejected_logps)
    ratio = as_float(policy_chosen_logps) - as_float(ref_chosen_logps)
    good = desirable.to(device=ratio.device, dtype=torch.bool)
    z0 = as_float(reference_point).to(ratio.device)
    value = torch.sigmoid(beta * torch.where(good, ratio - z0, z0 - ratio))
    weight = torch.where(good, ratio.new_tensor(desirable_weight), ratio.new_tensor(undesirable_weight))
    rewards = beta * ratio.detach()
    nan = torch.full_like(rewards, torch.nan)
    return weight * (1 - value), torch.where(good, rewards, nan), torch.where(good, nan, rewards)
