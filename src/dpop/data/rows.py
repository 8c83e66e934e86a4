"""Preference rows -> pairs: the accepted row shapes, column mapping and validation.

Files are read by `dpop.data.readers` (formats, blank lines, UTF-8, how locations are written). A file
holds rows of ONE of these shapes (one example each, as a JSON Lines row):

1. explicit: three strings::

       {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}

2. conversational: lists of ``{"role", "content"}`` messages (roles: system, user, assistant, tool). The
   prompt ends before the answer (its last turn is not an assistant turn); chosen and rejected hold only
   assistant turns, and each may also be a single message object::

       {"prompt": [{"role": "user", "content": "2 + 3 ="}],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": {"role": "assistant", "content": "6"}}

3. implicit prompt: only chosen and rejected, as whole conversations or as HH-style text. For
   conversations the prompt is their common opening up to its last non-assistant turn, and what follows
   it must be assistant turns. For text the prompt is their common beginning up to and including the
   last ``"\\n\\nAssistant:"`` in it, and what follows must not start a new ``"\\n\\nHuman:"`` turn::

       {"chosen": "\\n\\nHuman: 2 + 3 =\\n\\nAssistant: 5",
        "rejected": "\\n\\nHuman: 2 + 3 =\\n\\nAssistant: 6"}

4. ranked: a prompt (string or messages) and scored completions, each with ``text`` (or ``content``) and a
   numeric ``score``; with a conversational prompt the pair's answers become single assistant messages::

       {"prompt": "2 + 3 =", "completions": [{"text": "5", "score": 1.0}, {"text": "6", "score": 0.0},
                                              {"text": "7", "score": 0.0}]}

   ``ranked_pairs="best_worst"`` (default) gives one pair per row: the highest score against the lowest;
   when several completions tie for best (or worst), the first of them in the row is taken.
   ``ranked_pairs="all"`` gives every pair with different scores (chosen in row order, then rejected in row
   order); tied completions are never paired. A row with fewer than 2 distinct scores is skipped and
   counted. The pair's metadata records ``chosen_score`` and ``rejected_score``.

Rules:

- ``columns`` maps our field names (prompt, chosen, rejected, completions) to the file's:
  ``{"prompt": "question", "chosen": "good"}``. A mapped column that the file does not have is an error.
  Problems name the file's column: ``field 'good' (as chosen)``. A file with a header or schema (CSV,
  Parquet, datasets) that lacks a column every row needs is one error listing the file's columns.
- Every row is checked before anything is returned; all problems are collected into one DataError naming
  file, line or row, field and reason (up to 20 are listed, with the total).
- Strings must not be empty or whitespace only; message contents neither (except a system message's).
- Columns other than the row shape's fields are kept in the pair's ``metadata`` (for example ``id``, or the
  ``answer`` a task checker needs); they are never errors.
- A row whose chosen equals its rejected is skipped and counted in ``skipped`` (it carries no preference;
  this is not an error). If no pair is left at all, that is an error.
- All rows of a file share one shape. Rows missing a field of the file's shape get a "missing" error; a row
  of a different shape (for example a ranked row in a file of explicit rows) is reported once, naming the
  first such row, and the file's shape is the one most of its rows have.
- CSV cells are text, so a CSV cell for prompt/chosen/rejected/completions that holds a JSON list of
  objects (or one JSON object) is decoded: messages and completions can be stored in CSV that way. Any
  other cell stays the string it is.
"""

from __future__ import annotations

import gc
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpop.data.readers import Record, Records, file_error, read_records, type_name
from dpop.errors import ConfigError, DataError

Message = dict  # {"role": str, "content": str}, plus any other keys the file gave the message
FIELDS = ("prompt", "chosen", "rejected", "completions")
ROLES = ("system", "user", "assistant", "tool")
RANKED_PAIRS = ("best_worst", "all")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
SKIP_IDENTICAL = "chosen identical to rejected"
SKIP_FEW_SCORES = "fewer than 2 distinct scores"


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


def load_pairs(path: str | Path, *, columns: Mapping[str, str] | None = None, split: str | None = None,
               ranked_pairs: str = "best_worst") -> LoadedPairs:
    """Read and validate every row of a data file (or `datasets` directory) into preference pairs.

    Args:
        path: a .jsonl, .json, .csv or .parquet file, or a directory saved with datasets' save_to_disk.
        columns: our field name -> the file's column name, for the fields whose names differ.
        split: the split of a DatasetDict directory (default "train").
        ranked_pairs: "best_worst" or "all", for ranked rows (see the module docstring).
    Returns:
        LoadedPairs with the pairs in file order, and the skipped rows counted by reason.
    Raises:
        DataError listing every bad row (up to 20, with the total); ConfigError for bad arguments.
    """
    _check_options(columns, ranked_pairs)
    # Reading allocates millions of small dicts and lists, none of them garbage; the cyclic collector would
    # rescan them again and again (about half the time on a large file), so it pauses until we are done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return build_pairs(read_records(path, split=split), columns=columns, ranked_pairs=ranked_pairs)
    finally:
        if collecting:
            gc.enable()


def pairs_from_rows(rows: Iterable[Any], *, name: str = "rows", columns: Mapping[str, str] | None = None,
                    ranked_pairs: str = "best_worst") -> LoadedPairs:
    """Like load_pairs, for rows already in memory (dicts); locations read "{name} row N"."""
    _check_options(columns, ranked_pairs)
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{name} row {number}"
        if isinstance(row, Mapping):
            records.append(Record(where, dict(row)))
        else:
            records.append(Record(where, None, f"{where}: expected an object, got {type_name(row)}"))
    if not records:
        raise file_error(f"{name}: no rows given")
    return build_pairs(Records(name, "memory", records, None), columns=columns, ranked_pairs=ranked_pairs)


def build_pairs(records: Records, *, columns: Mapping[str, str] | None = None,
                ranked_pairs: str = "best_worst") -> LoadedPairs:
    """Validate records read by `read_records` and turn them into pairs (see the module docstring)."""
    _check_options(columns, ranked_pairs)
    _check_mapped_columns(records, columns or {})
    mapping, decode_json = _Columns.make(columns), records.format == "csv"
    _check_needed_columns(records, mapping)
    rows = [_Row.make(record, mapping, decode_json=decode_json) if record.row is not None else None
            for record in records.records]
    shapes = [_shape(row.values) if row is not None else None for row in rows]
    counts = Counter(shape for shape in shapes if shape is not None)
    file_shape = _file_shape(counts)
    family, kind = _SHAPES[file_shape]
    out, reported = _Outcome(), set()
    for record, row, shape in zip(records.records, rows, shapes):
        if row is None:
            out.problems.append(record.problem or f"{record.where}: unreadable row")
        elif _compatible(shape, file_shape):
            _HANDLERS[family](row, out, kind, ranked_pairs)
        elif shape not in reported:  # one problem per other shape, at its first row
            reported.add(shape)
            out.problems.append(f"{row.where}: row shape '{shape}' differs from the file's shape "
                                f"'{file_shape}' (first of {counts[shape]} such row(s)); "
                                "use one shape per file")
    if out.problems:
        raise DataError(out.problems, header=f"invalid rows in {records.path}")
    if not out.pairs:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in out.skipped.items())
        raise file_error(f"{records.path}: no pairs left: every row was skipped ({reasons}); each row must "
                         "give a chosen answer and a different rejected one")
    return LoadedPairs(out.pairs, dict(out.skipped), records.rows_read, records.path)


def _check_options(columns: Mapping[str, str] | None, ranked_pairs: str) -> None:
    if ranked_pairs not in RANKED_PAIRS:
        raise ConfigError(f"ranked_pairs must be one of {', '.join(RANKED_PAIRS)}, got {ranked_pairs!r}")
    if columns is None:
        return
    if not isinstance(columns, Mapping):
        raise ConfigError(f"columns must map field names to column names, got {type_name(columns)}")
    for ours, theirs in columns.items():
        if ours not in FIELDS:
            raise ConfigError(f"columns: unknown field {ours!r}; the fields are {', '.join(FIELDS)}")
        if not isinstance(theirs, str) or not theirs:
            raise ConfigError(f"columns: field {ours!r} must map to a column name, got {theirs!r}")
    targets = list(columns.values())
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise ConfigError(f"columns: column(s) {', '.join(repeated)} mapped to more than one field")


def _check_mapped_columns(records: Records, columns: Mapping[str, str]) -> None:
    if not columns:
        return
    present = records.columns
    if present is None:
        present = tuple(dict.fromkeys(key for record in records.records if record.row for key in record.row))
    missing = [f"{theirs!r} (mapped to {ours})" for ours, theirs in columns.items() if theirs not in present]
    if missing:
        shown = ", ".join(map(str, present[:30])) + (", ..." if len(present) > 30 else "")
        raise file_error(f"{records.path}: column(s) {', '.join(missing)} not found; "
                         f"the file's columns are: {shown or '(none)'}")


def _check_needed_columns(records: Records, mapping: _Columns) -> None:
    """A file with a header or schema (CSV, Parquet, datasets) that lacks a column every row needs is one
    error naming the file's columns, not the same "missing" for every row (a renamed column, a schema that
    drifted from what the run expects)."""
    present = records.columns
    if present is None:  # JSON rows each have their own keys: checked row by row
        return
    needed = ("prompt",) if mapping.names["completions"] in present else ("chosen", "rejected")
    missing = [mapping.names[name] for name in needed if mapping.names[name] not in present]
    if missing:
        shown = ", ".join(map(str, present[:30])) + (", ..." if len(present) > 30 else "")
        example = ",".join(f"{name}=COLUMN" for name in needed if mapping.names[name] in missing)
        raise file_error(f"{records.path}: missing column(s) {', '.join(map(repr, missing))}; the file's columns are: "
                         f"{shown or '(none)'}; map yours with columns (--columns '{example}')")


@dataclass
class _Outcome:
    pairs: list[PreferencePair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Columns:
    """The column mapping of one file: our field name -> the file's column, and how problems name it."""

    names: Mapping[str, str]
    labels: Mapping[str, str]
    used: frozenset[str]

    @staticmethod
    def make(columns: Mapping[str, str] | None) -> _Columns:
        names = {ours: (columns or {}).get(ours, ours) for ours in FIELDS}
        labels = {ours: f"'{theirs}'" + (f" (as {ours})" if theirs != ours else "")
                  for ours, theirs in names.items()}
        return _Columns(names, labels, frozenset(names.values()))


@dataclass
class _Row:
    where: str
    values: dict[str, Any]  # our field name -> value (only the fields present)
    labels: Mapping[str, str]  # our field name -> how problems name it
    metadata: dict[str, Any]  # the other columns

    @staticmethod
    def make(record: Record, columns: _Columns, *, decode_json: bool) -> _Row:
        raw = record.row
        values = {ours: raw[theirs] for ours, theirs in columns.names.items() if theirs in raw}
        if decode_json:
            values = {key: _decode_cell(value) for key, value in values.items()}
        metadata = {key: value for key, value in raw.items() if key not in columns.used}
        return _Row(record.where, values, columns.labels, metadata)

    def problem(self, out: _Outcome, name: str, reason: str) -> None:
        out.problems.append(f"{self.where}: field {self.labels[name]}: {reason}")


def _decode_cell(value: Any) -> Any:
    """A CSV cell holding a JSON list of objects (or one object) becomes that value; anything else stays."""
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


# ---- shapes --------------------------------------------------------------------------------------------

# shape -> (family, kind of its fields: "text", "messages", or None when unclear)
_SHAPES = {
    "explicit": ("prompted", "text"),
    "conversational": ("prompted", "messages"),
    "prompt/chosen/rejected": ("prompted", None),  # a prompt that is neither text nor messages
    "prompt only": ("partial", None),  # neither chosen, rejected nor completions
    "implicit text": ("implicit", "text"),
    "implicit conversation": ("implicit", "messages"),
    "chosen/rejected": ("implicit", None),  # a chosen that is neither text nor messages
    "ranked": ("ranked", None),
}
_DEFINITE = ("explicit", "conversational", "implicit text", "implicit conversation", "ranked")


def _shape(values: Mapping[str, Any]) -> str:
    """The row's shape (a key of _SHAPES) from its fields.

    A null field counts as absent here (columnar files hold nulls for absent fields); validation still
    reports it.
    """
    if values.get("completions") is not None:
        return "ranked"
    prompt, chosen = values.get("prompt"), values.get("chosen")
    if prompt is not None:
        if chosen is None and values.get("rejected") is None:
            return "prompt only"
        return ("explicit" if isinstance(prompt, str)
                else "conversational" if isinstance(prompt, list) else "prompt/chosen/rejected")
    return ("implicit text" if isinstance(chosen, str)
            else "implicit conversation" if isinstance(chosen, (list, dict)) else "chosen/rejected")


def _file_shape(counts: Counter) -> str:
    """The most common definite shape among the rows (the first to appear wins a tie)."""
    definite = [shape for shape in counts if shape in _DEFINITE]
    if definite:
        return max(definite, key=lambda shape: counts[shape])  # max keeps the first of equal counts
    return next(iter(counts), "explicit")


def _compatible(row_shape: str, file_shape: str) -> bool:
    """Whether a row is checked as the file's shape: a row merely missing fields is, another shape is not."""
    (row_family, row_kind), (file_family, _) = _SHAPES[row_shape], _SHAPES[file_shape]
    if row_shape == file_shape or (row_family == file_family and row_kind is None):
        return True
    if row_family == "implicit":  # no prompt: a row of a prompted or ranked file that lacks it
        return file_family != "implicit"
    return row_family == "partial" and file_family in ("prompted", "ranked")


# ---- field checks --------------------------------------------------------------------------------------

def _field(row: _Row, name: str, out: _Outcome, kind: str | None, *, response: bool):
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


def _messages(row: _Row, name: str, value: list | dict, out: _Outcome, *, response: bool):
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


# ---- shape handlers: each checks one row and adds its pairs, skips or problems to `out` ----------------

def _prompted(row: _Row, out: _Outcome, kind: str | None, ranked_pairs: str) -> None:
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


def _implicit(row: _Row, out: _Outcome, kind: str | None, ranked_pairs: str) -> None:
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


def _split_text(row: _Row, out: _Outcome, chosen: str, rejected: str):
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


def _split_messages(row: _Row, out: _Outcome, chosen: tuple, rejected: tuple):
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


def _ranked(row: _Row, out: _Outcome, kind: str | None, ranked_pairs: str) -> None:
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


def _completions(row: _Row, out: _Outcome) -> list[tuple[str, float]] | None:
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


def _add_pair(out: _Outcome, row: _Row, prompt, chosen, rejected, metadata: Mapping[str, Any]) -> None:
    if chosen == rejected:
        out.skipped[SKIP_IDENTICAL] += 1
    else:
        out.pairs.append(PreferencePair(prompt, chosen, rejected, row.where, dict(metadata)))


_HANDLERS = {"prompted": _prompted, "partial": _prompted, "implicit": _implicit, "ranked": _ranked}
