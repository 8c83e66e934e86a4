"""Unpaired rows for KTO (Ethayarajh et al. 2024): a prompt, one completion and a label, desirable or not.

KTO's reference point z0 estimates KL(πθ ‖ πref) from mismatched pairs (x, y'): a prompt with the completion of
another prompt. Each row gets its y' once, here, and carries it as its `rejected` (dpop.data.pairs), so the
reference log-probs of (x, y') are computed and cached with the rest, and prefix sharing encodes x once for both.

How y' is chosen: the rows are put in a fixed pseudo-random order (seeded by nothing but the data, so the same
file always gets the same y'), and each row takes the completion of the next row in that cyclic order whose
prompt differs from its own. So no row is ever matched with itself or with a row of its own prompt, whatever the
batch size (TRL pairs neighbours inside each batch, which a batch of one matches with itself); the y' mix
desirable and undesirable completions; and each completion serves as a y' about once.

`unpair` splits preference pairs into unpaired rows (TRL's unpair_preference_dataset): the chosen answer is a
desirable row, the rejected one an undesirable row, both with the pair's prompt.
"""

from __future__ import annotations

import dataclasses
import json
import random

from dpop.data.pairs import PreferencePair
from dpop.data.readers import file_error

SEED = 0x6B746F  # the order's seed: fixed, so y' depends on the data alone


def _prompt_key(prompt) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def with_kl_completions(rows: list[PreferencePair], *, where: str) -> list[PreferencePair]:
    """`rows` (unpaired, in file order) with each row's `rejected` set to its mismatched completion y'."""
    keys = [_prompt_key(row.prompt) for row in rows]
    if len(set(keys)) < 2:
        raise file_error(f"{where}: KTO needs rows with at least 2 different prompts: each row's reference point "
                         f"is estimated from its prompt with another prompt's completion (got {len(rows)} row(s), "
                         "all with one prompt)")
    order = list(range(len(rows)))
    random.Random(SEED + len(rows)).shuffle(order)
    donors = {}
    for position, index in enumerate(order):
        step = 1
        while keys[order[(position + step) % len(order)]] == keys[index]:
            step += 1  # ends: another prompt exists
        donors[index] = order[(position + step) % len(order)]
    return [dataclasses.replace(row, rejected=rows[donors[i]].chosen) for i, row in enumerate(rows)]


def unpair(pairs: list[PreferencePair], *, where: str) -> list[PreferencePair]:
    """Each preference pair as two unpaired rows (chosen: desirable, rejected: undesirable), with their y'.
    Unpaired rows among them are kept (their y' chosen again with the others'); all unpaired: returned as given."""
    if all(pair.unpaired for pair in pairs):
        return list(pairs)
    rows = []
    for pair in pairs:
        if pair.unpaired:
            rows.append(pair)
            continue
        rows.append(PreferencePair(pair.prompt, pair.chosen, pair.chosen, f"{pair.source} (chosen)",
                                   dict(pair.metadata), desirable=True))
        rows.append(PreferencePair(pair.prompt, pair.rejected, pair.rejected, f"{pair.source} (rejected)",
                                   dict(pair.metadata), desirable=False))
    return with_kl_completions(rows, where=where)


def label_counts(rows) -> tuple[int, int]:
    """(desirable, undesirable) rows."""
    desirable = sum(1 for row in rows if row.desirable)
    return desirable, sum(1 for row in rows if row.desirable is False)
