"""Reading data files into located records: every format, and the file-level errors."""

import json

import pytest

from dpop.data import load_pairs
from dpop.data.readers import read_records
from dpop.errors import ConfigError, DataError

ROW = {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}
ROW2 = {"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3"}


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- JSON Lines -------------------------------------------------------------------------------------------

def test_jsonl_rows_keep_physical_line_numbers_and_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW), "", "   ", json.dumps(ROW2)])
    loaded = load_pairs(path)
    assert [pair.source for pair in loaded.pairs] == [f"{path}:1", f"{path}:4"]
    assert loaded.rows_read == 2
    assert loaded.pairs[1].prompt == "1 + 1 ="


def test_jsonl_accepts_bom_and_crlf(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROW) + "\r\n" + json.dumps(ROW2) + "\r\n").encode())
    loaded = load_pairs(path)
    assert [pair.chosen for pair in loaded.pairs] == [" 5", " 2"]


def test_jsonl_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes((json.dumps(ROW) + "\n" + json.dumps(ROW2) + "\n").encode() + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:3: invalid UTF-8" in str(excinfo.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW), "[1, 2]"])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:2: expected a JSON object, got list" in str(excinfo.value)


def test_jsonl_nested_too_deeply_is_invalid_json(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW), "[" * 100_000 + "]" * 100_000])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:2: invalid JSON: nested too deeply" in str(excinfo.value)


def test_jsonl_rejects_nan(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW), '{"prompt": "p", "completions": NaN}'])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:2: invalid JSON" in str(excinfo.value)


# ---- JSON ----------------------------------------------------------------------------------------------

def test_json_list_of_rows(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ROW, ROW2]))
    loaded = load_pairs(path)
    assert [pair.source for pair in loaded.pairs] == [f"{path} row 1", f"{path} row 2"]


def test_json_object_with_one_list_key(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"data": [ROW, ROW2]}, indent=2))
    assert len(load_pairs(path).pairs) == 2


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.json", [json.dumps(ROW), json.dumps({"prompt": "p", "chosen": "x"})])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:2: field 'rejected': missing" in str(excinfo.value)


def test_json_object_that_is_not_a_row_container_is_a_one_line_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"a": [ROW], "b": [ROW2]}))
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert "expected a list of row objects" in one_line_error(excinfo)


def test_json_invalid_names_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n {"prompt": "p"},\n {"prompt" "q"}\n]')
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert one_line_error(excinfo).startswith(f"{path}:3: invalid JSON")


def test_json_element_that_is_not_an_object(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ROW, "text"]))
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path} row 2: expected a JSON object, got string" in str(excinfo.value)


# ---- CSV ---------------------------------------------------------------------------------------------------

def test_csv_rows_and_multiline_fields(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('prompt,chosen,rejected,id\n"two\nlines",yes,no,7\nq,"a, b","say ""hi""",8\n')
    loaded = load_pairs(path)
    first, second = loaded.pairs
    assert (first.prompt, first.source, first.metadata) == ("two\nlines", f"{path}:2", {"id": "7"})
    assert (second.chosen, second.rejected, second.source) == ("a, b", 'say "hi"', f"{path}:4")


def test_csv_bom_is_accepted(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\np,a,b\n")
    assert load_pairs(path).pairs[0].prompt == "p"


def test_csv_quoting_error_names_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('prompt,chosen,rejected\np,a,b\np,"a"x,b\n')
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert one_line_error(excinfo).startswith(f"{path}:3: CSV error")


def test_csv_row_with_wrong_field_count(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\np,a\n")
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert f"{path}:3: expected 3 fields as in the header, got 2" in str(excinfo.value)


def test_csv_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"prompt,chosen,rejected\np,a,b\np,\xe9,b\n")
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert one_line_error(excinfo).startswith(f"{path}:3: invalid UTF-8")


def test_csv_repeated_header_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,chosen,chosen\np,a,b\n")
    with pytest.raises(DataError, match="repeats column"):
        load_pairs(path)


# ---- Parquet and datasets directories ----------------------------------------------------------------------

def test_parquet_with_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go away"}], "id": 3}]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    (pair,) = load_pairs(path).pairs
    assert pair.conversational and pair.source == f"{path} row 1"
    assert pair.chosen == ({"role": "assistant", "content": "hello"},)
    assert pair.metadata == {"id": 3}


def test_not_parquet_is_a_one_line_error(tmp_path):
    path = tmp_path / "a.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert "cannot read as Parquet" in one_line_error(excinfo)


def test_datasets_directory_and_splits(tmp_path):
    import datasets

    datasets.Dataset.from_list([ROW, ROW2]).save_to_disk(str(tmp_path / "single"))
    assert len(load_pairs(tmp_path / "single").pairs) == 2
    with pytest.raises(ConfigError, match="without splits"):
        load_pairs(tmp_path / "single", split="test")

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([ROW]),
                                   "test": datasets.Dataset.from_list([ROW2, ROW])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_pairs(tmp_path / "dict").pairs[0].prompt == ROW["prompt"]
    test = load_pairs(tmp_path / "dict", split="test")
    assert test.pairs[0].source == f"{tmp_path / 'dict'}[test] row 1"
    with pytest.raises(DataError) as excinfo:
        load_pairs(tmp_path / "dict", split="validation")
    message = one_line_error(excinfo)
    assert "no split 'validation'" in message and "train, test" in message


def test_plain_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_pairs(tmp_path)
    assert "save_to_disk" in one_line_error(excinfo)


# ---- file-level errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_pairs(tmp_path / "nope.jsonl")
    assert "no such file" in one_line_error(excinfo)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    message = one_line_error(excinfo)
    assert "'.txt'" in message and ".jsonl" in message


@pytest.mark.parametrize("name, content", [("a.jsonl", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]"),
                                           ("d.json", ""), ("e.csv", "prompt,chosen,rejected\n")])
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert "no rows found" in one_line_error(excinfo)


def test_empty_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match="no rows found"):
        load_pairs(path)


def test_split_for_a_file_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW)])
    with pytest.raises(ConfigError, match="split"):
        load_pairs(path, split="train")


def test_read_records_reports_format_and_columns(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\n")
    records = read_records(path)
    assert (records.format, records.rows_read) == ("csv", 1)
    assert records.columns == ("prompt", "chosen", "rejected")
    assert records.records[0].row == {"prompt": "p", "chosen": "a", "rejected": "b"}


def test_parquet_ranked_rows_whose_completions_use_text_or_content(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "completions": [{"text": "a", "score": 1.0}, {"content": "b", "score": 0.5}]}]
    path = tmp_path / "ranked.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # one struct type: the missing key reads back as null
    (pair,) = load_pairs(path).pairs
    assert (pair.chosen, pair.rejected) == ("a", "b")


def test_importing_the_data_package_loads_no_heavy_modules():
    import subprocess
    import sys

    code = ("import sys, dpop.data; "
            "print(sorted(m for m in ('datasets', 'pyarrow', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_loading_leaves_the_garbage_collector_as_it_was(tmp_path):
    import gc

    path = write_jsonl(tmp_path / "a.jsonl", [json.dumps(ROW), "{bad"])
    assert gc.isenabled()
    with pytest.raises(DataError):
        load_pairs(path)
    assert gc.isenabled()
