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
                forward=None, processes=None) -> PairStats:
    """Per-pair statistics of tokenised `pairs` in file order; `reference(batch, indices) -> RefLogps` or None.
    `objective`: the dpop.losses.Objective whose loss is logged (None: no loss). `forward(batch) ->
    SequenceLogps`: the scoring module a training engine wraps (dpop.scoring.logprobs.PolicyScorer; default:
    sequence_logps on `model`). `processes` (an accelerator of several processes): each scores its share of the
    batches (dpop.distributed.batch_rounds) and every process returns all of them, in file order, as one
    process would have scored them."""
    from dpop.distributed import SingleProcess, batch_rounds, gather_values

    processes = processes or SingleProcess()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = list(ordered_batches(pairs, batch_size, **layout))
    mine: dict[int, PairStats] = {}
    try:
        for position in batch_rounds(len(batches), processes.process_index, processes.num_processes):
            batch, indices = batches[position if position is not None else 0]
            stats = mine.setdefault(position, PairStats())  # None: a round this process only joins (discarded)
            _score_batch(stats, model, batch.to(device), indices, autocast=autocast, reference=reference,
                         objective=objective, beta=beta, chunk_tokens=chunk_tokens, forward=forward)
    finally:
        model.train(was_training)
    mine.pop(None, None)
    if processes.num_processes == 1:
        return _in_order(mine)
    return _in_order({k: v for share in gather_values(mine, processes) for k, v in share.items()})


def _in_order(by_batch: dict[int, PairStats]) -> PairStats:
    merged = PairStats()
    for position in sorted(by_batch):
        for name, pieces in by_batch[position].parts.items():
            merged.parts.setdefault(name, []).extend(pieces)
    return merged


def _score_batch(stats, model, batch, indices, *, autocast, reference, objective, beta, chunk_tokens, forward):
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
