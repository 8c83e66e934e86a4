"""Data for a run: load and validate every row (or make the builtin task), tokenise, and schedule batches.

Nothing here writes to the run directory: a data error stops the run before anything exists on disk.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from dpop.data.tokenize import TokenizedData, tokenize_pairs

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
    """Validate every row of the train (and eval) data, or make the builtin task, and check that the loss can train
    on it (pairs, or unpaired rows for kto; config.unpair splits pairs). Runs before any model is loaded, so bad
    data is reported at once. `data`, `eval_data`: pairs in memory (see _load), used in place of config.data and
    config.eval_data."""
    pairs = _load_run_pairs(config, data, eval_data)
    if config.unpair:
        from dpop.data.unpaired import unpair

        pairs = RunPairs(unpair(pairs.train, where=pairs.description),
                         unpair(pairs.eval, where="eval data") if pairs.eval else pairs.eval, pairs.description)
    for name, rows in (("train", pairs.train), ("eval", pairs.eval)):
        if rows:
            _check_kind(rows, config, name)
    if any(row.unpaired for row in pairs.train):
        _check_label_balance(pairs.train, config)
    return pairs


def _check_kind(rows, config, name: str) -> None:
    from dpop.errors import ConfigError
    from dpop.losses import make_objective

    unpaired = sum(1 for row in rows if row.unpaired)
    objective = make_objective(config.loss, config.loss_weights)
    if objective.unpaired and unpaired < len(rows):
        raise ConfigError(f"loss {config.loss} trains on unpaired rows ({{prompt, completion, label}}); the {name} "
                          "data holds preference pairs: add --unpair (unpair: true) to split each pair into a "
                          "desirable and an undesirable row")
    if not objective.unpaired and unpaired:
        raise ConfigError(f"loss {config.loss} trains on preference pairs; the {name} data holds unpaired rows "
                          "(prompt, completion, label): train them with --loss kto")


def _check_label_balance(rows, config) -> None:
    """KTO paper §4.2: λ_D·n_D / (λ_U·n_U) should lie in [1, 4/3]; warn with the weights that would bring it there."""
    from dpop.data.unpaired import label_counts
    from dpop.losses import loss_options

    desirable, undesirable = label_counts(rows)
    options = loss_options("kto", config)
    wanted_d, wanted_u = options["desirable_weight"], options["undesirable_weight"]
    logger.info("dpop: %d desirable and %d undesirable rows", desirable, undesirable)
    if not desirable or not undesirable:
        logger.warning("dpop: KTO data with only %s rows: the loss then only pushes %s", "desirable" if desirable
                       else "undesirable", "up" if desirable else "down")
        return
    ratio = wanted_d * desirable / (wanted_u * undesirable) if wanted_u else float("inf")
    if not 1.0 <= ratio <= 4 / 3:
        low, high = undesirable * wanted_u / desirable, undesirable * wanted_u / desirable * 4 / 3
        logger.warning("dpop: desirable_weight·n_desirable / (undesirable_weight·n_undesirable) = %.3g "
                       "(%g·%d / (%g·%d)); the KTO paper recommends [1, 4/3]: e.g. desirable_weight in "
                       "[%.3g, %.3g]", ratio, wanted_d, desirable, wanted_u, undesirable, low, high)


def _load_run_pairs(config, data=None, eval_data=None) -> RunPairs:
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


