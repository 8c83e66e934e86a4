"""The `dpop` command: help, data make / doctor, bad data reported without a traceback, generate."""

import json
import statistics
import subprocess
import sys

import pytest

from dpop.cli import main
from dpop.data import load_pairs
from dpop.data.textdiff import normalized_edit_distance

COMMANDS = [["train"], ["sft"], ["eval"], ["generate"], ["data", "make"], ["data", "doctor"], ["report"],
            ["landscape"], ["bt", "fit"], ["models", "fetch"], ["losses"], ["iterate"], ["rm", "train"],
            ["rm", "score"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(command + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: dpop " + " ".join(command) in capsys.readouterr().out


def test_train_help_lists_every_config_key_with_its_default(capsys):
    from dataclasses import fields

    from dpop.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "(default: dpop)" in text


def _response(value) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


@pytest.mark.parametrize("edit, low, high", [("low", 0.0, 0.1), ("high", 0.3, 1.0)])
def test_data_make_arithmetic_edit_distance(tmp_path, edit, low, high):
    out = tmp_path / f"{edit}.jsonl"
    assert main(["data", "make", "arithmetic", "--n", "200", "--edit", edit, "--seed", "1", "--out", str(out)]) == 0
    pairs = load_pairs(out).pairs  # every row valid
    assert len(pairs) == 200
    median = statistics.median(normalized_edit_distance(_response(p.chosen), _response(p.rejected)) for p in pairs)
    assert low <= median < high


BAD_THIRD_LINES = {
    "missing rejected": ('{"prompt": "q", "chosen": "a"}', "rejected"),
    "chosen an integer": ('{"prompt": "q", "chosen": 7, "rejected": "b"}', "chosen"),
    "invalid JSON": ('{"prompt": "q", "chosen": "a", "rejected": ', "invalid JSON"),
}


def _bad_file(tmp_path, third_line: str):
    good = json.dumps({"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, good, third_line, good]) + "\n")
    return path


@pytest.mark.parametrize("case", list(BAD_THIRD_LINES))
@pytest.mark.parametrize("command", ["doctor", "train"])
def test_bad_third_line_names_line_and_field_without_traceback(tmp_path, case, command):
    line, field = BAD_THIRD_LINES[case]
    path = _bad_file(tmp_path, line)
    run_dir = tmp_path / "run"
    argv = (["data", "doctor", str(path)] if command == "doctor"
            else ["train", "--data", str(path), "--output-dir", str(run_dir)])
    result = subprocess.run([sys.executable, "-m", "dpop", *argv], capture_output=True, text=True)
    assert result.returncode != 0
    assert "bad.jsonl:3:" in result.stderr and field in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists()  # nothing written for a run that never started


def test_parser_builds_without_importing_torch():
    code = "import sys; from dpop.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_bt_fit_prints_seed_probability(tmp_path, capsys):
    table = tmp_path / "wins.csv"
    table.write_text("winner,loser,count\nA,B,8\nB,A,4\nA,C,3\nC,A,5\n")
    assert main(["bt", "fit", str(table)]) == 0
    out = capsys.readouterr().out
    assert "0.2308" in out  # P(B beats C) = 3/13


@pytest.mark.slow
def test_generate_answers_with_builtin_model():
    result = subprocess.run([sys.executable, "-m", "dpop", "generate", "--prompt", "What is 2 + 3?",
                             "--max-new-tokens", "24"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "5" in result.stdout
