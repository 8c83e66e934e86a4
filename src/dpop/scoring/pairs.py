"""Scoring preference pairs without a gradient: per-pair losses, rewards and log-probs of a model, the routine the
training loop's evaluation, `dpop eval` and `evaluate_model` share."""

from __future__ import annotations

import contextlib

import torch

from dpop.config import TrainConfig
from dpop.scoring.batching import ordered_batches
from dpop.scoring.logprobs import SequenceLogps, sequence_logps
from dpop.scoring.metrics import PairStats, pair_accuracy, record_pairs, summarize_pairs
from dpop.scoring.reference import OwnReference


def pair_losses(loss: str | None, policy: SequenceLogps, ref, *, beta: float, options: dict):
    """(losses, chosen_rewards, rejected_rewards, units), each (P,) or None, for one batch.

    loss: a name registered in dpop.losses (units: what each pair counts for in the loss, LossSpec.units);
    or None (no loss, the implicit rewards β·(log πθ − log πref) when a reference is given)."""
    from dpop.losses import get_loss, sequence_loss

    if loss is None:
        if ref is None:
            return None, None, None, None
        return (None, beta * (policy.chosen.float() - ref.chosen), beta * (policy.rejected.float() - ref.rejected),
                None)
    losses, chosen_rewards, rejected_rewards = sequence_loss(loss, policy, ref, beta=beta, options=options)
    return losses, chosen_rewards, rejected_rewards, get_loss(loss).units(policy.chosen_lengths)


@torch.no_grad()
def score_pairs(model, pairs, *, batch_size: int, layout: dict, autocast, reference=None, loss: str | None = None,
                beta: float = TrainConfig.beta, options: dict | None = None,
                chunk_tokens: int = TrainConfig.chunk_tokens,
                forward=None) -> PairStats:
    """Per-pair statistics of tokenised `pairs` in file order; `reference(batch, indices) -> RefLogps` or None.
    `forward(batch) -> SequenceLogps`: the scoring module a training engine wraps (dpop.scoring.logprobs.PolicyScorer;
    default: sequence_logps on `model`)."""
    options = options or {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stats = PairStats()
    try:
        for batch, indices in ordered_batches(pairs, batch_size, **layout):
            batch = batch.to(device)
            with autocast():
                policy = (forward(batch) if forward is not None else
                          sequence_logps(model, batch, chunk_tokens=chunk_tokens))
            if isinstance(reference, OwnReference):
                ref = reference.record(indices, policy)
            else:
                ref = reference(batch, indices) if reference is not None else None
            losses, chosen_rewards, rejected_rewards, units = pair_losses(loss, policy, ref, beta=beta,
                                                                          options=options)
            record_pairs(stats, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                         policy=policy, ref_chosen=ref.chosen if ref else None,
                         ref_rejected=ref.rejected if ref else None, beta=beta,
                         dpop_lambda=options.get("dpop_lambda", 0.0), units=units)
    finally:
        model.train(was_training)
    return stats


def pair_metrics(stats: PairStats) -> dict[str, float]:
    """summarize_pairs plus pair_accuracy (NaN where a value does not exist)."""
    return {**summarize_pairs(stats), "pair_accuracy": pair_accuracy(stats)}


def autocast_for(precision: str, device: torch.device):
    """A no-argument factory of the autocast context for `precision` (fp32, bf16 or bf16-sr: scoring has no
    optimizer, so bf16-sr computes as bf16 does)."""
    from dpop.precision import uses_bf16

    if uses_bf16(precision):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
