"""Preference pairs as dpop holds them after validation: the prompt and two responses (text or messages), where
they came from, and the row's other columns.

An unpaired row (KTO's {prompt, completion, label}) is held in the same form, so that tokenisation, batching,
prefix sharing and the reference cache serve it unchanged: `desirable` is its label, `chosen` its completion and
`rejected` the completion of another row with a different prompt, the mismatched pair (x, y') whose log-ratio
estimates KTO's reference point z0 (dpop.data.unpaired). For a preference pair `desirable` is None."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict  # {"role": str, "content": str}, plus any other keys the file gave the message


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | tuple[Message, ...]  # text, or the messages before the answer
    chosen: str | tuple[Message, ...]  # text, or the assistant message(s) of the preferred answer
    rejected: str | tuple[Message, ...]
    source: str  # "data/a.jsonl:3" (line) or "data/a.parquet row 3" (1-based)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the row's other columns
    desirable: bool | None = None  # an unpaired row's label (KTO); None: a preference pair

    @property
    def unpaired(self) -> bool:
        return self.desirable is not None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, tuple)


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[PreferencePair]
    skipped: Mapping[str, int]  # reason -> rows (or, for ranked_pairs="all", pairs) skipped
    rows_read: int
    path: str
