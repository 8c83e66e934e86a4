"""Preference pairs as dpop holds them after validation: the prompt and two responses (text or messages), where
they came from, and the row's other columns."""

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

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, tuple)


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[PreferencePair]
    skipped: Mapping[str, int]  # reason -> rows (or, for ranked_pairs="all", pairs) skipped
    rows_read: int
    path: str
