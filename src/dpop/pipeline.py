"""Data for a run: load and validate every row (or make the builtin task), tokenise, and schedule batches.

Nothing here writes to the run directory: a data error stops the run before anything exists on disk.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from dpop.batching import PairBatch, collate
from dpop.data.tokenize import TokenizedData, TokenizedPair, tokenize_pairs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunData:
    train: TokenizedData
    eval: TokenizedData | None
    description: str  # where the data came from, for logs


def _load(source, config, name: str = "data") -> list:
    """Validated pairs from a path, or from rows in memory: a list of row dicts, a `datasets.Dataset`, a
    LoadedPairs or a list of PreferencePair."""
    from dpop.config import parse_columns
    from dpop.data import LoadedPairs, PreferencePair, load_pairs, pairs_from_rows

    options = dict(columns=parse_columns(config.columns), ranked_pairs=config.ranked_pairs)
    if isinstance(source, (str, os.PathLike)):
        loaded, where = load_pairs(source, **options), str(source)
    elif isinstance(source, LoadedPairs):
        loaded, where = source, source.path
    elif isinstance(source, (list, tuple)) and source and all(isinstance(p, PreferencePair) for p in source):
        return list(source)
    else:
        loaded, where = pairs_from_rows(source, name=name, **options), name
    if loaded.skipped:
        skipped = ", ".join(f"{n} {reason}" for reason, n in loaded.skipped.items())
        logger.info("dpop: %s: skipped %s", where, skipped)
    return loaded.pairs


def _builtin_task(config, split: str, n: int) -> list:
    from dpop.data import pairs_from_rows
    from dpop.tasks.arithmetic import make_pairs

    rows = make_pairs(n, edit=config.task_edit, seed=config.seed, split=split)
    return pairs_from_rows(rows, name=f"arithmetic-{config.task_edit}-{split}").pairs


@dataclass(frozen=True)
class RunPairs:
    """Validated (not yet tokenised) pairs of a run."""

    train: list
    eval: list | None
    description: str


def load_run_pairs(config, data=None, eval_data=None) -> RunPairs:
    """Validate every row of the train (and eval) data, or make the builtin task. Runs before any model
    is loaded, so bad data is reported at once. `data`, `eval_data`: pairs in memory (see _load), used in
    place of config.data and config.eval_data."""
    evaluation_source = eval_data if eval_data is not None else config.eval_data
    evaluation = _load(evaluation_source, config, "eval_data") if evaluation_source is not None else None
    if data is not None:
        return RunPairs(_load(data, config, "data"), evaluation, f"{type(data).__name__} in memory")
    if config.data is not None:
        return RunPairs(_load(config.data, config), evaluation, str(config.data))
    # `dpop sft` takes its own split of problems (task_split sft), so a demo's SFT never sees the DPO pairs'
    train = _builtin_task(config, config.task_split, config.task_pairs)
    description = f"builtin arithmetic task ({config.task_pairs} {config.task_edit}-edit pairs)"
    if evaluation is None:
        evaluation = _builtin_task(config, "eval", max(16, min(200, config.task_pairs // 5)))
    return RunPairs(train, evaluation, description)


def tokenize_run_pairs(pairs: RunPairs, tokenizer, config) -> RunData:
    """Tokenise train and eval pairs; dropped and truncated pairs are reported."""
    train = _tokenize(pairs.train, tokenizer, config, "train")
    evaluation = _tokenize(pairs.eval, tokenizer, config, "eval") if pairs.eval else None
    return RunData(train, evaluation, pairs.description)


def _tokenize(pairs, tokenizer, config, name: str) -> TokenizedData:
    from dpop.errors import DataError

    data = tokenize_pairs(pairs, tokenizer, max_length=config.max_length,
                          max_prompt_length=config.max_prompt_length, progress=len(pairs) > 2000)
    if data.dropped:
        dropped = ", ".join(f"{n} ({reason})" for reason, n in data.dropped.items())
        logger.warning("dpop: %s data: dropped %d of %d pairs: %s", name, sum(data.dropped.values()), len(pairs), dropped)
    if data.truncated:
        logger.info("dpop: %s data: %d pairs truncated to max_length %d", name, data.truncated, config.max_length)
    if not data.pairs:
        raise DataError([f"{name} data: no pairs left after tokenization (max_length {config.max_length})"],
                        header="no usable data")
    return data


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


def make_batch(pairs: list[TokenizedPair], indices, *, layout: str, pad_id: int, with_rejected: bool = True,
               pack_length: int | None = None) -> PairBatch:
    return collate([pairs[i] for i in indices], layout=layout, pad_id=pad_id, with_rejected=with_rejected,
                   pack_length=pack_length)


def ordered_batches(pairs: list[TokenizedPair], batch_size: int, **layout):
    """Batches in file order (evaluation, and the reference pass of eval data)."""
    for start in range(0, len(pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        yield make_batch(pairs, indices, **layout), indices
