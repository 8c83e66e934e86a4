"""One handler per row family (prompted, implicit, ranked, unpaired) turns a validated row into pairs, or records
its problems; `dpop.data.rows` documents the shapes and runs the handlers. Every check of a field's content
lives here."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dpop.data.pairs import PreferencePair
from dpop.data.readers import Record, type_name

ROLES = ("system", "user", "assistant", "tool")


HH_HUMAN = "\n\nHuman:"


HH_ASSISTANT = "\n\nAssistant:"


SKIP_IDENTICAL = "chosen identical to rejected"


SKIP_FEW_SCORES = "fewer than 2 distinct scores"


@dataclass
class Outcome:
    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass
class Row:
    where: str
    values: dict[str, Any]  # our field name -> value (only the fields present)
    labels: Mapping[str, str]  # our field name -> how problems name it
    metadata: dict[str, Any]  # the other columns

    @staticmethod
    def make(record: Record, columns, *, decode_json: bool) -> Row:  # columns: a dpop.data.rows._Columns
        raw = record.row
        values = {ours: raw[theirs] for ours, theirs in columns.names.items() if theirs in raw}
        if decode_json:
            values = {key: _decode_cell(value, key) for key, value in values.items()}
        metadata = {key: value for key, value in raw.items() if key not in columns.used}
        return Row(record.where, values, columns.labels, metadata)

    def problem(self, out: Outcome, name: str, reason: str) -> None:
        out.problems.append(f"{self.where}: field {self.labels[name]}: {reason}")


def _decode_cell(value: Any, name: str = "") -> Any:
    """A CSV cell holding a JSON list of objects (or one object) becomes that value, a label cell "true" or
    "false" (any case) a bool; anything else stays."""
    if name == "label" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, str) or value.lstrip()[:1] not in ("[", "{"):
        return value
    try:
        decoded = json.loads(value)
    except (ValueError, RecursionError):
        return value
    if isinstance(decoded, dict) or (isinstance(decoded, list) and decoded
                                     and all(isinstance(item, dict) for item in decoded)):
        return decoded
    return value


def _field(row: Row, name: str, out: Outcome, kind: str | None, *, response: bool):
    """The checked value of one field: a non-blank string or a tuple of messages; None after a problem."""
    if name not in row.values:
        return row.problem(out, name, "missing")
    value = row.values[name]
    if value is None:
        return row.problem(out, name, "null")
    if isinstance(value, str) and kind in (None, "text"):
        if not value.strip():
            return row.problem(out, name, "empty string")
        return row.problem(out, name, reason) if (reason := _unicode_problem(value)) else value
    if kind in (None, "messages") and (isinstance(value, list) or response and isinstance(value, dict)):
        return _messages(row, name, value, out, response=response)
    expected = {None: "a string or a list of messages", "text": "a string",
                "messages": "a list of messages"}[kind]
    return row.problem(out, name, f"expected {expected}, got {type_name(value)}")


def _messages(row: Row, name: str, value: list | dict, out: Outcome, *, response: bool):
    value = [value] if isinstance(value, dict) else value
    if not value:
        return row.problem(out, name, "empty list of messages")
    messages, ok = [], True
    for number, message in enumerate(value, start=1):
        reason = _message_problem(message, response)
        if reason:
            row.problem(out, name, f"message {number}: {reason}")
            ok = False
        else:
            messages.append({key: item for key, item in message.items() if item is not None})
    return tuple(messages) if ok else None


def _message_problem(message: Any, response: bool) -> str | None:
    if not isinstance(message, dict):
        return f"expected an object with 'role' and 'content', got {type_name(message)}"
    role, content = message.get("role"), message.get("content")
    if role is None:
        return "'role' missing" if "role" not in message else "'role' is null"
    if role not in ROLES:
        return f"role {role!r} is not one of {', '.join(ROLES)}"
    if content is None:
        return "'content' missing" if "content" not in message else "'content' is null"
    if not isinstance(content, str):
        return f"'content': expected a string, got {type_name(content)}"
    if not content.strip() and role != "system":
        return "'content' is empty"
    if reason := _unicode_problem(content):
        return f"'content': {reason}"
    if response and role != "assistant":
        return f"a {role!r} turn where the answer's assistant turns are expected"
    return None


def _unicode_problem(text: str) -> str | None:
    """A JSON escape such as "\\ud800" decodes to a string that is not Unicode text, which no tokenizer can
    encode: name it here rather than fail in the middle of tokenization."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return (f"not valid Unicode: an unpaired surrogate {text[error.start]!r} at character {error.start + 1} "
                "(a lone \\uD800-\\uDFFF escape)")
    return None


def _prompt_problem(prompt) -> str | None:
    if isinstance(prompt, tuple) and prompt[-1]["role"] == "assistant":
        return "the last message is an assistant turn; the prompt must end before the answer"
    return None


def _prompted(row: Row, out: Outcome, kind: str | None, ranked_pairs: str) -> None:
    prompt = _field(row, "prompt", out, kind, response=False)
    chosen = _field(row, "chosen", out, kind, response=True)
    rejected = _field(row, "rejected", out, kind, response=True)
    if prompt is not None and (reason := _prompt_problem(prompt)):
        return row.problem(out, "prompt", reason)
    if prompt is None or chosen is None or rejected is None:
        return None
    if kind is None and isinstance(prompt, str) != isinstance(chosen, str):
        return row.problem(out, "chosen", "is not of the same kind (text or messages) as the prompt")
    if kind is None and isinstance(prompt, str) != isinstance(rejected, str):
        return row.problem(out, "rejected", "is not of the same kind (text or messages) as the prompt")
    _add_pair(out, row, prompt, chosen, rejected, row.metadata)


def _implicit(row: Row, out: Outcome, kind: str | None, ranked_pairs: str) -> None:
    chosen = _field(row, "chosen", out, kind, response=False)
    rejected = _field(row, "rejected", out, kind or _kind_of(chosen), response=False)
    if chosen is None or rejected is None:
        return None
    if chosen == rejected:
        out.skipped[SKIP_IDENTICAL] += 1
        return None
    split = _split_text if isinstance(chosen, str) else _split_messages
    parts = split(row, out, chosen, rejected)
    if parts is not None:
        _add_pair(out, row, *parts, row.metadata)


def _kind_of(value) -> str | None:
    return None if value is None else "text" if isinstance(value, str) else "messages"


def _split_text(row: Row, out: Outcome, chosen: str, rejected: str):
    common = os.path.commonprefix([chosen, rejected])
    marker = common.rfind(HH_ASSISTANT)
    if marker < 0:
        return row.problem(out, "prompt", "missing, and chosen/rejected do not share an HH-style beginning "
                           "('\\n\\nHuman: ... \\n\\nAssistant:') to take the prompt from")
    cut = marker + len(HH_ASSISTANT)
    answers = {"chosen": chosen[cut:], "rejected": rejected[cut:]}
    ok = True
    for name, answer in answers.items():
        if not answer.strip():
            row.problem(out, name, "nothing after the prompt (the common text up to the last "
                        "'\\n\\nAssistant:')")
            ok = False
        elif HH_HUMAN in answer:
            row.problem(out, name, "a '\\n\\nHuman:' turn after the prompt; chosen and rejected may differ "
                        "only in their last assistant turn")
            ok = False
    if not ok:
        return None
    return chosen[:cut], answers["chosen"], answers["rejected"]


def _split_messages(row: Row, out: Outcome, chosen: tuple, rejected: tuple):
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = common
    while cut > 0 and chosen[cut - 1]["role"] == "assistant":
        cut -= 1  # trailing assistant turns of the common part belong to the answers
    if cut == 0:
        return row.problem(out, "prompt", "missing, and chosen/rejected do not begin with the same "
                           "non-assistant turn(s) to take the prompt from")
    ok = True
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        answer = messages[cut:]
        stray = next((number for number, message in enumerate(answer, start=cut + 1)
                      if message["role"] != "assistant"), None)
        if not answer:
            row.problem(out, name, "no assistant turn after the common prompt")
            ok = False
        elif stray is not None:
            role = messages[stray - 1]["role"]
            row.problem(out, name, f"message {stray}: a {role!r} turn after the common prompt; chosen and "
                        "rejected may differ only in their final assistant turn(s)")
            ok = False
    return (chosen[:cut], chosen[cut:], rejected[cut:]) if ok else None


def _ranked(row: Row, out: Outcome, kind: str | None, ranked_pairs: str) -> None:
    prompt = _field(row, "prompt", out, None, response=False)
    if prompt is not None and (reason := _prompt_problem(prompt)):
        row.problem(out, "prompt", reason)
        prompt = None
    completions = _completions(row, out)
    if prompt is None or completions is None:
        return None
    if len({score for _, score in completions}) < 2:
        out.skipped[SKIP_FEW_SCORES] += 1
        return None
    if ranked_pairs == "best_worst":
        # max/min return the first of equal items, so ties go to the earliest completion in the row
        pairs = [(max(completions, key=lambda c: c[1]), min(completions, key=lambda c: c[1]))]
    else:
        pairs = [(better, worse) for better in completions for worse in completions if better[1] > worse[1]]
    for (chosen, chosen_score), (rejected, rejected_score) in pairs:
        if isinstance(prompt, tuple):
            chosen = ({"role": "assistant", "content": chosen},)
            rejected = ({"role": "assistant", "content": rejected},)
        metadata = {**row.metadata, "chosen_score": chosen_score, "rejected_score": rejected_score}
        _add_pair(out, row, prompt, chosen, rejected, metadata)


def _completions(row: Row, out: Outcome) -> list[tuple[str, float]] | None:
    """[(text, score)] of a ranked row, or None after a problem."""
    value = row.values.get("completions")
    if value is None:
        return row.problem(out, "completions", "missing" if "completions" not in row.values else "null")
    if not isinstance(value, list):
        return row.problem(out, "completions",
                           f"expected a list of {{text, score}} objects, got {type_name(value)}")
    completions, ok = [], True
    for number, item in enumerate(value, start=1):
        reason, completion = _completion(item)
        if reason:
            row.problem(out, "completions", f"item {number}: {reason}")
            ok = False
        else:
            completions.append(completion)
    return completions if ok else None


def _completion(item: Any) -> tuple[str | None, tuple[str, float] | None]:
    if not isinstance(item, dict):
        return f"expected an object with 'text' and 'score', got {type_name(item)}", None
    texts = [key for key in ("text", "content") if item.get(key) is not None]
    if len(texts) != 1:
        return ("has both 'text' and 'content'; keep one" if texts else "'text' missing"), None
    text, score = item[texts[0]], item.get("score")
    if not isinstance(text, str):
        return f"'{texts[0]}': expected a string, got {type_name(text)}", None
    if not text.strip():
        return f"'{texts[0]}' is empty", None
    if reason := _unicode_problem(text):
        return f"'{texts[0]}': {reason}", None
    if score is None:
        return "'score' missing" if "score" not in item else "'score' is null", None
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return f"'score': expected a number, got {type_name(score)}", None
    if not math.isfinite(score):
        return f"'score': expected a finite number, got {score}", None
    return None, (text, score)


def _unpaired(row: Row, out: Outcome, kind: str | None, ranked_pairs: str) -> None:
    """A KTO row: its completion goes in `chosen` (and, until dpop.data.unpaired gives it its y', `rejected`)."""
    prompt = _field(row, "prompt", out, None, response=False)
    completion = _field(row, "completion", out, None, response=True)
    label = _label(row, out)
    if prompt is not None and (reason := _prompt_problem(prompt)):
        return row.problem(out, "prompt", reason)
    if prompt is None or completion is None or label is None:
        return None
    if isinstance(prompt, str) != isinstance(completion, str):
        return row.problem(out, "completion", "is not of the same kind (text or messages) as the prompt")
    out.pairs.append(PreferencePair(prompt, completion, completion, row.where, dict(row.metadata), desirable=label))


def _label(row: Row, out: Outcome) -> bool | None:
    if "label" not in row.values:
        return row.problem(out, "label", "missing")
    value = row.values["label"]
    if not isinstance(value, bool):
        return row.problem(out, "label", f"expected true (desirable) or false (undesirable), got "
                           f"{type_name(value)} {value!r}")
    return value


def _add_pair(out: Outcome, row: Row, prompt, chosen, rejected, metadata: Mapping[str, Any]) -> None:
    if chosen == rejected:
        out.skipped[SKIP_IDENTICAL] += 1
    else:
        out.pairs.append(PreferencePair(prompt, chosen, rejected, row.where, dict(metadata)))


HANDLERS = {"prompted": _prompted, "partial": _prompted, "implicit": _implicit, "ranked": _ranked,
            "unpaired": _unpaired}
