"""Data files -> records: one mapping per row, each tagged with the place it came from.

The format is chosen by the suffix, or by the path being a directory:

- ``.jsonl`` / ``.ndjson``: one JSON object a line. Blank lines are allowed and ignored (they are not
  rows). Locations are physical 1-based lines: ``data/a.jsonl:3``.
- ``.json``: a list of objects, or an object with exactly one key that holds that list
  (``{"data": [...]}``). A ``.json`` file that is really JSON Lines is read as JSON Lines.
  Locations are 1-based rows: ``data/a.json row 3``.
- ``.csv``: a header row, then one record per row (quoted fields may span lines). Locations are the line
  where the record starts, the header being line 1: ``data/a.csv:2`` is the first record.
- ``.parquet``: locations ``data/a.parquet row 3``.
- a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s, where ``split`` picks
  one, default ``train``): locations ``data/ds row 3`` (``data/ds[test] row 3`` for a split).

Text files must be UTF-8; a UTF-16 or UTF-32 file is refused at once, naming its encoding. A UTF-8
byte-order mark is accepted at the start of the file, and in JSON Lines also at the start of any line (what
`cat a.jsonl b.jsonl > c.jsonl` leaves when the parts had one). JSON's non-standard NaN and Infinity are
rejected as invalid JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpop.errors import ConfigError, DataError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_BOM = b"\xef\xbb\xbf"
# Other Unicode encodings, by the marks they start with (UTF-32 first: its LE mark begins with UTF-16's).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


@dataclass(frozen=True)
class Record:
    """One row as read: `row` is a dict, or None when the row could not be read (`problem` says why)."""

    where: str  # "data/a.jsonl:3" or "data/a.parquet row 3"
    row: dict[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True)
class Records:
    path: str
    format: str  # "jsonl" | "json" | "csv" | "parquet" | "datasets"
    records: list[Record]
    columns: tuple[str, ...] | None  # the file's column names, when the format has a header or schema

    @property
    def rows_read(self) -> int:
        return len(self.records)


def file_error(message: str) -> DataError:
    """A DataError about the whole file, whose message is the single line `message`."""
    error = DataError([message])
    error.args = (message,)
    return error


def read_records(path: str | Path, *, split: str | None = None) -> Records:
    """Read every row of a data file or `datasets` directory; rows that cannot be read become problems.

    Raises DataError (one line) for a missing path, an unknown suffix, a file that cannot be parsed at all,
    or a file with no rows.
    """
    path = Path(path)
    name = str(path)
    if not path.exists():
        raise file_error(f"{name}: no such file or directory; check the data path")
    if path.is_dir():
        records, columns, fmt = _read_datasets_dir(path, split)
    else:
        if split is not None:
            raise ConfigError(f"split={split!r} applies only to a datasets directory, and {name} is a file; "
                              "remove the split")
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            known = ", ".join(sorted(FORMATS))
            suffix = path.suffix or "(no suffix)"
            raise file_error(f"{name}: unknown data format {suffix!r}; use one of {known}, "
                             "or a directory saved with datasets' save_to_disk")
        reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[fmt]
        try:
            if fmt != "parquet":
                _refuse_other_unicode(path)
            records, columns, fmt = reader(path)
        except OSError as error:
            raise file_error(f"{name}: cannot read the file ({error.strerror or error}); check its "
                             "permissions") from None
    if not records:
        raise file_error(f"{name}: no rows found; add rows to it, or point to another data file")
    return Records(name, fmt, records, columns)


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages: null, bool, int, float, string, list, object."""
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "string",
             list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _reject_constant(token: str):
    raise ValueError(f"{token} is not valid JSON")


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _refuse_other_unicode(path: Path) -> None:
    """A UTF-16/32 text file fails on its first byte as UTF-8; say what it is instead of listing every line."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    name = next((name for mark, name in _OTHER_BOMS if head.startswith(mark)), None)
    if name is None and len(head) == 4 and (head[1] == head[3] == 0) != (head[0] == head[2] == 0):
        name = "UTF-16"  # no mark, but ASCII text with a zero byte every other byte
    if name:
        raise file_error(f"{path}: the file is {name}-encoded, not UTF-8; save it as UTF-8")


def _decode_utf8(path: Path, data: bytes) -> str:
    """The whole file as text; a bad byte is a one-line error naming its line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise file_error(f"{path}:{line}: invalid UTF-8 ({error.reason} at byte {error.start}); "
                         "save the file as UTF-8") from None


def _jsonl_records(name: str, data: bytes) -> list[Record]:
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{number}"
        try:
            text = raw.removeprefix(_BOM).decode("utf-8")
        except UnicodeDecodeError as error:
            records.append(Record(where, None, f"{where}: invalid UTF-8 ({error.reason} at column "
                                               f"{error.start + 1}); save the file as UTF-8"))
            continue
        if not text.strip():
            continue
        try:
            value = _parse_json(text)
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            column = f" (column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
            records.append(Record(where, None, f"{where}: invalid JSON: {reason}{column}"))
            continue
        if not isinstance(value, dict):
            records.append(Record(where, None, f"{where}: expected a JSON object, got {type_name(value)}"))
            continue
        records.append(Record(where, value))
    return records


def _read_jsonl(path: Path) -> tuple[list[Record], None, str]:
    return _jsonl_records(str(path), path.read_bytes().removeprefix(_BOM)), None, "jsonl"


def _read_json(path: Path) -> tuple[list[Record], None, str]:
    data = path.read_bytes()
    text = _decode_utf8(path, data)
    if not text.strip():
        return [], None, "json"
    try:
        value = _parse_json(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several values: JSON Lines under a .json name
            return _jsonl_records(str(path), data.removeprefix(_BOM)), None, "jsonl"
        raise file_error(f"{path}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno})") from None
    except ValueError as error:
        raise file_error(f"{path}: invalid JSON: {error}") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))
    if not isinstance(value, list):
        got = type_name(value)
        if isinstance(value, dict):
            got = f"an object with keys {', '.join(list(value)[:5])}"
        raise file_error(f"{path}: expected a list of row objects, or an object with one key holding that "
                         f'list (like {{"data": [...]}}), got {got}')
    records = []
    for number, row in enumerate(value, start=1):
        where = f"{path} row {number}"
        if isinstance(row, dict):
            records.append(Record(where, row))
        else:
            records.append(Record(where, None, f"{where}: expected a JSON object, got {type_name(row)}"))
    return records, None, "json"


def _read_csv(path: Path) -> tuple[list[Record], tuple[str, ...], str]:
    import csv
    import io

    text = _decode_utf8(path, path.read_bytes())
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long answers are normal
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[Record] = []
    header: list[str] | None = None
    start = 1
    try:
        for fields in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1
            if header is None:
                header = fields
                duplicates = sorted({c for c in header if header.count(c) > 1})
                if duplicates:
                    raise file_error(f"{where}: the header repeats column(s) {', '.join(duplicates)}; "
                                     "give every column its own name")
                continue
            if not fields or fields == [""]:
                continue  # a blank line
            if len(fields) != len(header):
                reason = f"expected {len(header)} fields as in the header, got {len(fields)}"
                records.append(Record(where, None, f"{where}: {reason}"))
                continue
            records.append(Record(where, dict(zip(header, fields))))
    except csv.Error as error:
        raise file_error(f"{path}:{reader.line_num}: CSV error: {error}; check the quoting (a field holding "
                         'a comma, quote or newline must be quoted, with its quotes doubled: "")') from None
    return records, tuple(header or ()), "csv"


def _read_parquet(path: Path) -> tuple[list[Record], tuple[str, ...], str]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises several types for a file that is not Parquet
        raise file_error(f"{path}: cannot read as Parquet ({type(error).__name__}: {error}); "
                         "check that the file is Parquet") from None
    rows = table.to_pylist()
    records = [Record(f"{path} row {number}", row) for number, row in enumerate(rows, start=1)]
    return records, tuple(table.column_names), "parquet"


def _read_datasets_dir(path: Path, split: str | None) -> tuple[list[Record], tuple[str, ...], str]:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise file_error(f"{path}: a directory, but not one saved with datasets' save_to_disk "
                         "(no dataset_dict.json or state.json); point to a data file or such a directory")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # a damaged directory can fail in many ways inside datasets
        raise file_error(f"{path}: cannot load the saved dataset ({type(error).__name__}: {error})") from None
    prefix = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        wanted = split or "train"
        if wanted not in loaded:
            raise file_error(f"{path}: no split {wanted!r}; the splits are: {', '.join(loaded)}; choose one "
                             "with split")
        loaded, prefix = loaded[wanted], f"{path}[{wanted}]"
    elif split is not None:
        raise ConfigError(f"split={split!r} was given, but {path} holds a single dataset without splits; "
                          "remove the split")
    rows = loaded.to_list()
    records = [Record(f"{prefix} row {number}", row) for number, row in enumerate(rows, start=1)]
    return records, tuple(loaded.column_names), "datasets"
