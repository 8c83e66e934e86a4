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

5. unpaired (KTO): a prompt, one completion and a boolean ``label`` (true: desirable), text or messages (the
   completion then holds assistant turns)::

       {"prompt": "2 + 3 =", "completion": " 5", "label": true}

   Each row is held as a PreferencePair whose ``chosen`` is the completion, ``rejected`` the completion of a row
   with another prompt (KTO's mismatched pair for its reference point: dpop.data.unpaired) and ``desirable`` the
   label. A file needs rows with at least 2 different prompts. In CSV the label cell reads true or false.

Rules:

- ``columns`` maps our field names (prompt, chosen, rejected, completions, completion, label) to the file's:
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
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpop.data.pairs import LoadedPairs
from dpop.data.readers import Record, Records, file_error, read_records, type_name
from dpop.data.shapes import HANDLERS, Outcome, Row
from dpop.data.unpaired import with_kl_completions
from dpop.errors import ConfigError, DataError

FIELDS = ("prompt", "chosen", "rejected", "completions", "completion", "label")
RANKED_PAIRS = ("best_worst", "all")


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
    rows = [Row.make(record, mapping, decode_json=decode_json) if record.row is not None else None
            for record in records.records]
    shapes = [_shape(row.values) if row is not None else None for row in rows]
    counts = Counter(shape for shape in shapes if shape is not None)
    file_shape = _file_shape(counts)
    family, kind = _SHAPES[file_shape]
    out, reported = Outcome(), set()
    for record, row, shape in zip(records.records, rows, shapes):
        if row is None:
            out.problems.append(record.problem or f"{record.where}: unreadable row")
        elif _compatible(shape, file_shape):
            HANDLERS[family](row, out, kind, ranked_pairs)
        elif shape not in reported:  # one problem per other shape, at its first row
            reported.add(shape)
            out.problems.append(f"{row.where}: row shape '{shape}' differs from the file's shape "
                                f"'{file_shape}' (first of {counts[shape]} such row(s)); "
                                "use one shape per file")
    if out.problems:
        raise DataError(out.problems, header=f"invalid rows in {records.path}")
    if family == "unpaired" and out.pairs:
        out.pairs = with_kl_completions(out.pairs, where=records.path)
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
    if mapping.names["completions"] in present:
        needed = ("prompt",)
    elif mapping.names["completion"] in present or mapping.names["label"] in present:
        needed = ("prompt", "completion", "label")
    else:
        needed = ("chosen", "rejected")
    missing = [mapping.names[name] for name in needed if mapping.names[name] not in present]
    if missing:
        shown = ", ".join(map(str, present[:30])) + (", ..." if len(present) > 30 else "")
        example = ",".join(f"{name}=COLUMN" for name in needed if mapping.names[name] in missing)
        raise file_error(f"{records.path}: missing column(s) {', '.join(map(repr, missing))}; the file's columns are: "
                         f"{shown or '(none)'}; map yours with columns (--columns '{example}')")


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
    "unpaired": ("unpaired", None),  # prompt, completion, label (KTO)
}
_DEFINITE = ("explicit", "conversational", "implicit text", "implicit conversation", "ranked", "unpaired")


def _shape(values: Mapping[str, Any]) -> str:
    """The row's shape (a key of _SHAPES) from its fields.

    A null field counts as absent here (columnar files hold nulls for absent fields); validation still
    reports it.
    """
    if values.get("completions") is not None:
        return "ranked"
    if values.get("completion") is not None or values.get("label") is not None:
        return "unpaired"
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
        return file_family not in ("implicit", "unpaired")
    return row_family == "partial" and file_family in ("prompted", "ranked", "unpaired")

