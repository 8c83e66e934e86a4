"""Bad input through the `dpop train` command, in process: malformed data files, bad configs and bad paths.

Each case must end with exit 1 and one `dpop train: error:` message naming the file (and line or row, and
field, where there is one) with no traceback, and must leave nothing behind: the output dir is not created,
or an existing one is left byte for byte as it was. A few inputs are not errors but documented, counted skips
(chosen == rejected, tied ranked scores, pairs emptied by truncation): the run goes on and says how many.
"""

import builtins
import io
import json
import os
from pathlib import Path

import pytest

from dpop.cli import main

ROW = {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}
ROW2 = {"prompt": "4 + 4 =", "chosen": " 8", "rejected": " 9"}


def lines(*rows) -> bytes:
    """JSON Lines: dicts are dumped, strings written as they are."""
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


def messages(*turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def parquet(rows):
    def write(path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return write


def truncated_parquet(path):
    parquet([ROW, ROW2])(path)
    path.write_bytes(path.read_bytes()[:40])


USER_Q, ASSISTANT_A, ASSISTANT_B = messages(("user", "q")), messages(("assistant", "a")), messages(("assistant", "b"))
# name -> (file name, bytes or a function writing the file, fragments the error must contain; {path} = the file)
DATA_CASES = {
    "empty file": ("a.jsonl", b"", ["{path}: no rows found"]),
    "blank lines only": ("a.jsonl", b"\n  \n\r\n", ["{path}: no rows found"]),
    "empty JSON file": ("a.json", b"", ["{path}: no rows found"]),
    "empty JSON list": ("a.json", b"[]", ["{path}: no rows found"]),
    "CSV with a header only": ("a.csv", b"prompt,chosen,rejected\n", ["{path}: no rows found"]),
    "Latin-1 byte in a JSONL line": ("a.jsonl", lines(ROW) + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
                                     .encode("latin-1"), ["{path}:2: invalid UTF-8", "save the file as UTF-8"]),
    "Latin-1 CSV": ("a.csv", "prompt,chosen,rejected\ncaf\xe9,a,b\n".encode("latin-1"),
                    ["{path}:2: invalid UTF-8", "save the file as UTF-8"]),
    "UTF-16 file (with its BOM)": ("a.jsonl", lines(ROW).decode().encode("utf-16"),
                                   ["{path}: the file is UTF-16-encoded, not UTF-8"]),
    "UTF-16-LE file without a BOM": ("a.csv", "prompt,chosen,rejected\nq,a,b\n".encode("utf-16-le"),
                                     ["{path}: the file is UTF-16-encoded, not UTF-8"]),
    "invalid JSON on line 3": ("a.jsonl", lines(ROW, ROW2, '{"prompt": "q", "chosen": '),
                               ["{path}:3: invalid JSON"]),
    "JSON line that is a list": ("a.jsonl", lines(ROW, [1, 2]), ["{path}:2: expected a JSON object, got list"]),
    "NaN in a JSON line": ("a.jsonl", lines(ROW, '{"prompt": "q", "chosen": "a", "rejected": "b", "w": NaN}'),
                           ["{path}:2: invalid JSON: NaN is not valid JSON"]),
    "JSON nested 100000 deep": ("a.jsonl", lines(ROW, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                                ["{path}:2: invalid JSON: nested too deeply"]),
    "a 3 MB line cut short": ("a.jsonl", lines(ROW) + b'{"prompt": "' + b"x" * 3_000_000 + b"\n",
                              ["{path}:2: invalid JSON: Unterminated string"]),
    "lone surrogate escape (\\ud800)": ("a.jsonl", lines(ROW, '{"prompt": "q\\ud800", "chosen": "a", "rejected": "b"}'),
                                       ["{path}:2: field 'prompt': not valid Unicode: an unpaired surrogate"]),
    "missing field": ("a.jsonl", lines(ROW, {"prompt": "q", "chosen": "a"}), ["{path}:2: field 'rejected': missing"]),
    "null field": ("a.jsonl", lines(ROW, {"prompt": "q", "chosen": None, "rejected": "b"}),
                   ["{path}:2: field 'chosen': null"]),
    "number where text belongs": ("a.jsonl", lines(ROW, {"prompt": "q", "chosen": 7, "rejected": "b"}),
                                  ["{path}:2: field 'chosen': expected a string, got int"]),
    "bool prompt": ("a.jsonl", lines(ROW, {"prompt": True, "chosen": "a", "rejected": "b"}),
                    ["{path}:2: field 'prompt': expected a string, got bool"]),
    "object where text belongs": ("a.jsonl", lines(ROW, {"prompt": "q", "chosen": "a", "rejected": {"text": "b"}}),
                                  ["{path}:2: field 'rejected': expected a string, got object"]),
    "empty string": ("a.jsonl", lines(ROW, {"prompt": "q", "chosen": "", "rejected": "b"}),
                     ["{path}:2: field 'chosen': empty string"]),
    "whitespace-only string": ("a.jsonl", lines(ROW, {"prompt": " \n\t", "chosen": "a", "rejected": "b"}),
                               ["{path}:2: field 'prompt': empty string"]),
    "every row chosen == rejected": ("a.jsonl", lines({"prompt": "q", "chosen": "a", "rejected": "a"}),
                                     ["{path}: no pairs left: every row was skipped",
                                      "(chosen identical to rejected: 1)"]),
    "message with an unknown role": ("a.jsonl", lines({"prompt": USER_Q, "chosen": ASSISTANT_A,
                                                       "rejected": messages(("bot", "b"))}),
                                     ["{path}:1: field 'rejected': message 1: role 'bot' is not one of"]),
    "message without a role": ("a.jsonl", lines({"prompt": [{"content": "q"}], "chosen": ASSISTANT_A,
                                                 "rejected": ASSISTANT_B}),
                               ["{path}:1: field 'prompt': message 1: 'role' missing"]),
    "message content a number": ("a.jsonl", lines({"prompt": USER_Q, "chosen": [{"role": "assistant", "content": 5}],
                                                   "rejected": ASSISTANT_B}),
                                 ["{path}:1: field 'chosen': message 1: 'content': expected a string, got int"]),
    "prompt ending with the answer's turn": ("a.jsonl", lines({"prompt": messages(("user", "q"), ("assistant", "x")),
                                                               "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}),
                                             ["{path}:1: field 'prompt': the last message is an assistant turn"]),
    "user turn in an answer": ("a.jsonl", lines({"prompt": USER_Q, "chosen": messages(("user", "a")),
                                                 "rejected": ASSISTANT_B}),
                               ["{path}:1: field 'chosen': message 1: a 'user' turn"]),
    "empty message list": ("a.jsonl", lines({"prompt": [], "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}),
                           ["{path}:1: field 'prompt': empty list of messages"]),
    "message that is a string": ("a.jsonl", lines({"prompt": ["hi"], "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}),
                                 ["{path}:1: field 'prompt': message 1: expected an object with 'role' and 'content'"]),
    "text prompt with message answers": ("a.jsonl", lines({"prompt": "q", "chosen": ASSISTANT_A, "rejected": "b"}),
                                         ["{path}:1: field 'chosen': expected a string, got list"]),
    "mixed row shapes": ("a.jsonl", lines(ROW, ROW2, {"prompt": "q", "completions": [{"text": "a", "score": 1},
                                                                                      {"text": "b", "score": 0}]}),
                         ["{path}:3: row shape 'ranked' differs from the file's shape 'explicit'"]),
    "implicit prompt without HH markers": ("a.jsonl", lines({"chosen": "abc", "rejected": "abd"}),
                                           ["{path}:1: field 'prompt': missing, and chosen/rejected do not share"]),
    "ranked score that is text": ("a.jsonl", lines({"prompt": "q", "completions": [{"text": "a", "score": "high"},
                                                                                   {"text": "b", "score": 0}]}),
                                  ["{path}:1: field 'completions': item 1: 'score': expected a number, got string"]),
    "every ranked row tied": ("a.jsonl", lines({"prompt": "q", "completions": [{"text": "a", "score": 1},
                                                                               {"text": "b", "score": 1}]}),
                              ["{path}: no pairs left", "fewer than 2 distinct scores: 1"]),
    "JSON object with two lists": ("a.json", json.dumps({"train": [ROW], "test": [ROW2]}).encode(),
                                   ["{path}: expected a list of row objects", "got an object with keys train, test"]),
    "JSON holding a number": ("a.json", b"42", ["{path}: expected a list of row objects", "got int"]),
    "invalid JSON document": ("a.json", b'[{"prompt": "q",\n "chosen": }]', ["{path}:2: invalid JSON"]),
    "CSV with an unclosed quote": ("a.csv", b'prompt,chosen,rejected\n"q,a,b\n', ["{path}:2: CSV error",
                                                                                  "check the quoting"]),
    "CSV with text after a closing quote": ("a.csv", b'prompt,chosen,rejected\nq,"a"x,b\n',
                                            ["{path}:2: CSV error", "check the quoting"]),
    "CSV row with too few fields": ("a.csv", b"prompt,chosen,rejected\nq,a,b\nq,a\n",
                                    ["{path}:3: expected 3 fields as in the header, got 2"]),
    "CSV header repeating a column": ("a.csv", b"prompt,chosen,chosen\nq,a,b\n",
                                      ["{path}:1: the header repeats column(s) chosen"]),
    "CSV without a needed column": ("a.csv", b"prompt,chosen\nq,a\n",
                                    ["{path}: missing column(s) 'rejected'", "the file's columns are: prompt, chosen"]),
    "Parquet with renamed columns (schema drift)": (
        "a.parquet", parquet([{"question": "q", "good": "a", "bad": "b"}]),
        ["{path}: missing column(s) 'chosen', 'rejected'", "columns are: question, good, bad",
         "--columns 'chosen=COLUMN,rejected=COLUMN'"]),
    "Parquet column of numbers (schema drift)": ("a.parquet", parquet([{"prompt": "q", "chosen": 1, "rejected": 2}]),
                                                 ["{path} row 1: field 'chosen': expected a string, got int"]),
    "Parquet null cell": ("a.parquet", parquet([ROW, {"prompt": "q", "chosen": None, "rejected": "b"}]),
                          ["{path} row 2: field 'chosen': null"]),
    "Parquet struct where text belongs": ("a.parquet", parquet([{"prompt": "q", "chosen": {"x": 1}, "rejected": "b"}]),
                                          ["{path} row 1: field 'chosen': expected a string, got object"]),
    "truncated Parquet file": ("a.parquet", truncated_parquet, ["{path}: cannot read as Parquet"]),
    "unknown suffix": ("a.txt", lines(ROW), ["{path}: unknown data format '.txt'"]),
    "no suffix": ("data", lines(ROW), ["{path}: unknown data format '(no suffix)'"]),
}


def train_args(model_dir, data, out_dir, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out_dir), "--max-steps", "1",
            "--batch-size", "2", "--precision", "fp32", "--max-length", "64", *extra]


def tree(directory: Path) -> dict:
    """Every file under `directory` with its bytes, to show that a refused run changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_refused(args, capsys, fragments, *, untouched: Path) -> str:
    """The command exits 1 with one error line holding every fragment, and `untouched` is as it was."""
    before = tree(untouched) if untouched.exists() else None
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dpop train: error: ")]
    message = err[err.index(line):]  # a DataError lists its problems on the lines that follow
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert (tree(untouched) if untouched.exists() else None) == before
    return message


@pytest.mark.parametrize("name", DATA_CASES)
def test_bad_data_is_one_clear_error_and_writes_nothing(name, tiny_model_dir, tmp_path, dpop_cache, capsys):
    file_name, content, fragments = DATA_CASES[name]
    path = tmp_path / file_name
    content(path) if callable(content) else path.write_bytes(content)
    out_dir = tmp_path / "run"
    assert_refused(train_args(tiny_model_dir, path, out_dir), capsys,
                   [fragment.format(path=path) for fragment in fragments], untouched=out_dir)
    assert not out_dir.exists()
    assert not dpop_cache.exists()  # refused before a model was loaded


def test_an_unreadable_file_is_named(tiny_model_dir, tmp_path, dpop_cache, capsys, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_bytes(lines(ROW, ROW2))
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: make opening it fail as it does for everyone else
        real_open = io.open

        def refusing_open(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
        monkeypatch.setattr(io, "open", refusing_open)
    out_dir = tmp_path / "run"
    assert_refused(train_args(tiny_model_dir, path, out_dir), capsys,
                   [f"{path}: cannot read the file (Permission denied)"], untouched=out_dir)


# ---- configs and paths: name -> function(tmp_path, model_dir, data) -> (args, fragments, dir left untouched) ----

def _model_variant(tmp_path, change) -> Path:
    from conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    change(model_dir)
    return model_dir


def _pickle_only(model_dir):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()


def _auto_map(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))


def _write(path: Path, text) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _output_dir(tmp_path, *files) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for name in files:
        _write(out / name, "from another run\n")
    return out


def _case(args_extra=(), *, model=None, data=None, out=None, config=None, fragments=()):
    def build(tmp_path, model_dir, good_data):
        out_dir = out(tmp_path) if out else tmp_path / "run"
        args = train_args(model(tmp_path) if model else model_dir, data(tmp_path) if data else good_data, out_dir,
                          *args_extra)
        if config:
            args.append(str(config(tmp_path)))
        return args, [f.format(tmp=tmp_path) for f in fragments], out_dir
    return build


CONFIG_CASES = {
    "model dir that does not exist": _case(model=lambda t: t / "nope", fragments=["model not found: {tmp}/nope"]),
    "model dir without config.json": _case(model=lambda t: (t / "empty").mkdir() or t / "empty",
                                           fragments=["{tmp}/empty is a directory but has no config.json"]),
    "model weights only pickled (.bin)": _case(model=lambda t: _model_variant(t, _pickle_only), fragments=[
        "{tmp}/model holds weights only as pytorch_model.bin", "only from safetensors or GGUF"]),
    "model that needs remote code": _case(model=lambda t: _model_variant(t, _auto_map), fragments=[
        "{tmp}/model needs custom Python code", "--trust-remote-code only if you trust that code"]),
    "model config.json not JSON": _case(model=lambda t: _model_variant(t, lambda d: _write(d / "config.json", "{no")),
                                        fragments=["cannot read {tmp}/model/config.json"]),
    "model weights truncated": _case(model=lambda t: _model_variant(
        t, lambda d: _write(d / "model.safetensors", (d / "model.safetensors").read_bytes()[:1000])),
        fragments=["cannot load a model from {tmp}/model", "damaged or incomplete weights file"]),
    "model without a tokenizer": _case(model=lambda t: _model_variant(
        t, lambda d: [p.unlink() for p in list(d.iterdir()) if "token" in p.name]),
        fragments=["cannot load a tokenizer from {tmp}/model: no tokenizer files"]),
    "model path that is a data file": _case(model=lambda t: _write(t / "x.jsonl", lines(ROW)),
                                            fragments=["{tmp}/x.jsonl is not a model dir or a .gguf file"]),
    "reference model that does not exist": _case(["--ref-model", "nope-ref"], fragments=["model not found: nope-ref"]),
    "data file that does not exist": _case(data=lambda t: t / "nope.jsonl",
                                           fragments=["{tmp}/nope.jsonl: no such file or directory"]),
    "data dir not saved by datasets": _case(data=lambda t: (t / "dir").mkdir() or t / "dir",
                                            fragments=["{tmp}/dir: a directory, but not one saved with datasets"]),
    "bad eval data": _case(["--eval-data", "EVAL"], fragments=["{tmp}/eval.jsonl:1: field 'rejected': missing"]),
    "column mapped to a column the file lacks": _case(["--columns", "prompt=question"], fragments=[
        "column(s) 'question' (mapped to prompt) not found", "the file's columns are: prompt, chosen, rejected"]),
    "malformed --columns": _case(["--columns", "prompt"], fragments=["columns: expected 'field=column' items"]),
    "every pair empty after truncation": _case(data=lambda t: _write(t / "long.jsonl", lines(
        {"prompt": "q", "chosen": "same " * 100 + "a", "rejected": "same " * 100 + "b"})), fragments=[
        "no usable data", "train data: no pairs left after tokenization (max_length 64)"]),
    "output dir holding another run's files": _case(out=lambda t: _output_dir(t, "config.yaml", "metrics.jsonl"),
                                                    fragments=["output_dir {tmp}/run already holds files",
                                                               "--resume", "--overwrite"]),
    "--overwrite on a dir that is not a run": _case(["--overwrite"], out=lambda t: _output_dir(t, "notes.txt"),
                                                    fragments=["{tmp}/run holds files that are not a dpop run"]),
    "output dir that is a file": _case(out=lambda t: _write(t / "run", "x"),
                                       fragments=["output_dir {tmp}/run exists and is not a directory"]),
    "output dir inside a file": _case(out=lambda t: _write(t / "x", "") / "run", fragments=[
        "output_dir {tmp}/x/run cannot be created: {tmp}/x is a file, not a directory"]),
    "output dir where nothing can be created": _case(out=lambda t: Path("/proc/dpop-test-run"), fragments=[
        "output_dir /proc/dpop-test-run cannot be created"]),
    "--resume of a dir with no run": _case(["--resume"], out=lambda t: _output_dir(t), fragments=[
        "--resume: {tmp}/run holds no run (no config.yaml)"]),
    "--resume with --overwrite": _case(["--resume", "--overwrite"], fragments=["resume and overwrite contradict"]),
    "unknown key in the YAML": _case(config=lambda t: _write(t / "c.yaml", "lerning_rate: 1e-5\n"), fragments=[
        "unknown config key 'lerning_rate' (did you mean 'learning_rate'?)"]),
    "YAML that does not parse": _case(config=lambda t: _write(t / "c.yaml", "beta: [1\n"),
                                      fragments=["{tmp}/c.yaml:2: not valid YAML"]),
    "YAML that is a list": _case(config=lambda t: _write(t / "c.yaml", "- beta\n"),
                                 fragments=["{tmp}/c.yaml: expected a mapping of config keys, got list"]),
    "YAML in Latin-1": _case(config=lambda t: _write(t / "c.yaml", "beta: 0.1 # caf\xe9\n".encode("latin-1")),
                             fragments=["{tmp}/c.yaml: not UTF-8"]),
    "config file that does not exist": _case(config=lambda t: t / "nope.yaml",
                                             fragments=["config file not found: {tmp}/nope.yaml"]),
    "value out of range": _case(["--beta", "-1"], fragments=["beta: must be > 0.0, got -1.0"]),
    "value of the wrong type": _case(["--max-steps", "ten"], fragments=["max_steps: expected int, got 'ten'"]),
    "max_prompt_length not below max_length": _case(["--max-prompt-length", "64"], fragments=[
        "max_prompt_length (64) must be below max_length (64)"]),
    "unknown tracker": _case(["--report-to", "wandbb"], fragments=["unknown tracker 'wandbb' (did you mean 'wandb'?)"]),
}


@pytest.mark.parametrize("name", CONFIG_CASES)
def test_bad_config_or_path_is_one_clear_error_and_writes_nothing(name, tiny_model_dir, tmp_path, dpop_cache,
                                                                  capsys):
    good = _write(tmp_path / "good.jsonl", lines(ROW, ROW2))
    _write(tmp_path / "eval.jsonl", lines({"prompt": "q", "chosen": "a"}))
    args, fragments, out_dir = CONFIG_CASES[name](tmp_path, tiny_model_dir, good)
    args = [str(tmp_path / "eval.jsonl") if arg == "EVAL" else arg for arg in args]
    assert_refused(args, capsys, fragments, untouched=out_dir)


def test_resume_with_a_config_that_changes_the_math_leaves_the_run_as_it_was(tiny_model_dir, tmp_path, dpop_cache,
                                                                               capsys):
    good = _write(tmp_path / "good.jsonl", lines(ROW, ROW2))
    out_dir = tmp_path / "run"
    assert main(train_args(tiny_model_dir, good, out_dir, "--save-every", "1")) == 0
    assert_refused(train_args(tiny_model_dir, good, out_dir, "--resume", "--beta", "0.1"), capsys,
                   ["the config differs from the run's", "beta: 0.3 -> 0.1"], untouched=out_dir)


def test_an_unknown_flag_is_a_usage_error_with_a_suggestion(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(train_args(tiny_model_dir, tmp_path / "x.jsonl", tmp_path / "run", "--lerning-rate", "1"))
    assert exit_info.value.code == 2
    assert "unknown option --lerning-rate (did you mean '--learning-rate'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---- not errors: documented skips, counted and reported, and quirks that are accepted ------------------------

SKIP_CASES = {
    "a row with chosen == rejected": (lines(ROW, ROW2, {"prompt": "q", "chosen": "a", "rejected": "a"}),
                                      "skipped 1 chosen identical to rejected"),
    "a ranked row with tied scores": (lines(*[{"prompt": p, "completions": [{"text": "a", "score": s},
                                                                            {"text": "b", "score": 0}]}
                                              for p, s in (("q", 1), ("r", 2), ("s", 0))]),
                                      "skipped 1 fewer than 2 distinct scores"),
    "a pair whose answers differ only past max_length": (
        lines(ROW, ROW2, {"prompt": "q", "chosen": "same " * 100 + "a", "rejected": "same " * 100 + "b"}),
        "dropped 1 of 3 pairs: 1 (chosen and rejected identical after truncation)"),
    "a 1 MB prompt, far beyond max_length": (
        lines(ROW, {"prompt": "the answer " * 100_000, "chosen": "a", "rejected": "b"}),
        "1 pairs truncated to max_length 64"),
}


@pytest.mark.parametrize("name", SKIP_CASES)
def test_documented_skips_are_counted_and_the_run_goes_on(name, tiny_model_dir, tmp_path, dpop_cache, capsys):
    content, notice = SKIP_CASES[name]
    data = _write(tmp_path / "a.jsonl", content)
    assert main(train_args(tiny_model_dir, data, tmp_path / "run")) == 0
    assert notice in capsys.readouterr().out
    assert (tmp_path / "run" / "final").is_dir()


@pytest.mark.parametrize("content", [
    b"\xef\xbb\xbf" + lines(ROW, ROW2),  # a byte-order mark at the start
    lines(ROW) + b"\xef\xbb\xbf" + lines(ROW2),  # and one mid-file, as `cat a.jsonl b.jsonl` leaves
    lines(ROW).replace(b"\n", b"\r\n") + b"\n\n" + lines(ROW2),  # CRLF line ends and blank lines
    lines({**ROW, "id": 1, "source": None}, {**ROW2, "id": [2]}),  # other columns: kept as metadata
], ids=["BOM", "BOM mid-file", "CRLF and blank lines", "extra fields"])
def test_accepted_quirks(content, tmp_path):
    from dpop.data import load_pairs

    path = _write(tmp_path / "a.jsonl", content)
    loaded = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded.pairs] == [tuple(r.values()) for r in (ROW, ROW2)]


def test_reliability_note_lists_every_case():
    """docs/reliability.md is the note of every case tried and what the user sees: it must not fall behind."""
    note = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text()
    assert [name for name in [*DATA_CASES, *CONFIG_CASES, *SKIP_CASES] if f"| {name} |" not in note] == []
