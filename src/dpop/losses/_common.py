"""Small numeric helpers shared by the loss modules (not public API)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]  # (losses, chosen_rewards, rejected_rewards), each (B,)


def as_float(tensor: Tensor) -> Tensor:
    """Upcast to at least fp32: bf16/fp16 log-probs become fp32, fp32 and fp64 stay as they are.

    Sums of hundreds of token log-probs lose whole units in bf16 (8 bits of mantissa), and the
    sigmoids below are flat enough that this would change the loss, so the math always runs in fp32+."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def per_token(sum_logps: Tensor, lengths: Tensor) -> Tensor:
    """Length-averaged log-prob: a per-pair sum divided by its token count (a count below 1 is read as 1,
    so a degenerate empty response gives its sum instead of a division by zero)."""
    sum_logps = as_float(sum_logps)
    return sum_logps / lengths.to(sum_logps.dtype).clamp(min=1.0)


def log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - exp(log_p)) for log_p < 0, stable at both ends (Mächler 2012: expm1 near 0, log1p far away)."""
    return torch.where(log_p > -0.6931471805599453, torch.log(-torch.expm1(log_p)), torch.log1p(-torch.exp(log_p)))


def implicit_rewards(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                     ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """(β·(lw − rw), β·(ll − rl)), detached, fp32 or wider. Rafailov et al. 2023, eq. 5."""
    chosen = beta * (as_float(policy_chosen_logps) - as_float(ref_chosen_logps))
    rejected = beta * (as_float(policy_rejected_logps) - as_float(ref_rejected_logps))
    return chosen.detach(), rejected.detach()


def logratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """Δ = (lw − rw) − (ll − rl), in fp32 or wider."""
    return ((as_float(policy_chosen_logps) - as_float(ref_chosen_logps))
            - (as_float(policy_rejected_logps) - as_float(ref_rejected_logps)))


def log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    """(lw − rw, ll − rl) in fp32 or wider."""
    return (as_float(policy_chosen_logps) - as_float(ref_chosen_logps),
            as_float(policy_rejected_logps) - as_float(ref_rejected_logps))
