"""Scoring preference pairs without a gradient: per-pair losses, rewards and log-probs of a model, the routine the
training loop's evaluation, `dpop eval` and `evaluate_model` share."""

from __future__ import annotations

import contextlib

import torch

from dpop.config import TrainConfig
from dpop.scoring.batching import ordered_batches
from dpop.scoring.logprobs import sequence_logps
from dpop.scoring.metrics import PairStats, pair_accuracy, record_pairs, summarize_pairs
from dpop.scoring.reference import OwnReference


def record_scored(stats: PairStats, objective, policy, ref, *, beta: float, reduce=None):
    """Score one batch under `objective` (a dpop.losses.Objective, or None: no loss, the implicit rewards
    β·(log πθ − log πref) when there is a reference) and add it to `stats`; returns the ObjectiveOutput or None.
    `reduce`: the sum over processes for KTO's reference point (training; evaluation scores on each process alone)."""
    output = objective(policy, ref, beta=beta, reduce=reduce) if objective is not None else None
    if output is not None:
        losses, units, weights = output.losses, output.units, output.weights
        chosen_rewards, rejected_rewards = output.chosen_rewards, output.rejected_rewards
    else:
        losses = units = weights = None
        chosen_rewards = beta * (policy.chosen.float() - ref.chosen) if ref is not None else None
        rejected_rewards = beta * (policy.rejected.float() - ref.rejected) if ref is not None else None
    record_pairs(stats, losses=losses, units=units, weights=weights, chosen_rewards=chosen_rewards,
                 rejected_rewards=rejected_rewards, policy=policy, ref_chosen=ref.chosen if ref else None,
                 ref_rejected=ref.rejected if ref else None, beta=beta,
                 dpop_lambda=objective.options.get("dpop_lambda", 0.0) if objective is not None else 0.0,
                 reference_point=output.reference_point if output is not None else None)
    return output


@torch.no_grad()
def score_pairs(model, pairs, *, batch_size: int, layout: dict, autocast, reference=None, objective=None,
                beta: float = TrainConfig.beta, chunk_tokens: int = TrainConfig.chunk_tokens,
                forward=None) -> PairStats:
    """Per-pair statistics of tokenised `pairs` in file order; `reference(batch, indices) -> RefLogps` or None.
    `objective`: the dpop.losses.Objective whose loss is logged (None: no loss). `forward(batch) ->
    SequenceLogps`: the scoring module a training engine wraps (dpop.scoring.logprobs.PolicyScorer; default:
    sequence_logps on `model`)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    stats = PairStats()
    try:
        for batch, indices in ordered_batches(pairs, batch_size, **layout):
            batch = batch.to(device)
            target = None
            if objective is not None and objective.needs_kl:  # TDPO: a live reference's states, before the policy
                target = reference(batch, indices, keep_hidden=True)
            with autocast():
                if forward is None:
                    policy = sequence_logps(model, batch, chunk_tokens=chunk_tokens, kl_target=target)
                else:
                    policy = forward(batch, kl_target=target) if target is not None else forward(batch)
            if target is not None:
                ref = target
            elif isinstance(reference, OwnReference):
                ref = reference.record(indices, policy)
            else:
                ref = reference(batch, indices) if reference is not None else None
            record_scored(stats, objective, policy, ref, beta=beta)
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
