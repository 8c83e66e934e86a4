"""The order pairs are seen in: epochs, micro-batches and optimizer steps, a function of (seed, epoch) only, so a resumed
run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpop.data.tokenize import TokenizedPair


def epoch_order(num_pairs: int, seed: int, epoch: int, *, lengths=None, group_size: int = 1) -> list[int]:
    """The pair order of one epoch: a function of (seed, epoch) and, with `lengths`, of the pairs' lengths.

    With `lengths` (tokens per pair) the order is length-grouped: the shuffled pairs are cut into windows of
    GROUP_WINDOW groups, each window is sorted by length so a group of `group_size` consecutive pairs (an
    optimizer step's: its micro-batches are consecutive slices) holds similar lengths (less padding), and the
    full groups are shuffled again so long and short steps alternate over the epoch. The last, partial group
    (if any) stays last. Grouping by the step, not the micro-batch, keeps batch 4 x 1 step and batch 1 x 4
    accumulation on the same pairs."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_pairs, generator=generator).tolist()
    if lengths is None or group_size <= 1:
        return order
    window = GROUP_WINDOW * group_size
    grouped = [i for start in range(0, num_pairs, window)
               for i in sorted(order[start:start + window], key=lambda i: -lengths[i])]
    full = num_pairs // group_size
    groups = [grouped[g * group_size:(g + 1) * group_size] for g in range(full)]
    shuffled = [groups[g] for g in torch.randperm(full, generator=generator).tolist()]
    return [i for group in shuffled for i in group] + grouped[full * group_size:]


GROUP_WINDOW = 32  # groups per sorting window: wide enough to find similar lengths, narrow enough to stay random


@dataclass(frozen=True)
class MicroBatch:
    epoch: int
    index: int  # micro-batch index inside its epoch
    pair_indices: list[int]
    last: bool = False  # the epoch's last micro-batch


def micro_batches(num_pairs: int, batch_size: int, seed: int, *, start_epoch: int = 0, start_index: int = 0,
                  lengths=None, group_size: int | None = None):
    """Endless stream of micro-batches, epoch after epoch, resumable at (epoch, index); `lengths`: group
    pairs of similar length, `group_size` (default batch_size) at a time (epoch_order)."""
    epoch, index = start_epoch, start_index
    while True:
        order = epoch_order(num_pairs, seed, epoch, lengths=lengths, group_size=group_size or batch_size)
        per_epoch = math.ceil(num_pairs / batch_size)
        while index < per_epoch:
            yield MicroBatch(epoch, index, order[index * batch_size:(index + 1) * batch_size],
                             last=index == per_epoch - 1)
            index += 1
        epoch, index = epoch + 1, 0


def optimizer_steps(stream, grad_accum: int):
    """Endless stream of optimizer steps (lists of micro-batches from `stream`): grad_accum micro-batches
    each, except that a step ends with its epoch's last micro-batch, so one epoch sees each pair exactly
    once and no step mixes two epochs (16 pairs in batches of 4 with grad_accum 3: steps of 3 and 1)."""
    while True:
        step = []
        for micro in stream:
            step.append(micro)
            if micro.last or len(step) == grad_accum:
                break
        yield step


def pair_lengths(pairs: list[TokenizedPair], config) -> list[int] | None:
    """Tokens per pair for length-grouped batches, or None when config.group_by_length is off."""
    if not getattr(config, "group_by_length", False):
        return None
    return [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]


def steps_per_epoch(num_pairs: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(num_pairs / batch_size) / grad_accum)
