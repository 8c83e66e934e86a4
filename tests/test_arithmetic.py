"""The builtin arithmetic task: determinism, split disjointness, pair construction and the answer checker."""

import hashlib
import json
import os
import random
import re
import statistics
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpop.data.textdiff import normalized_edit_distance
from dpop.errors import ConfigError
from dpop.tasks import arithmetic
from dpop.tasks.arithmetic import (
    _TEMPLATES,
    ANSWER_LINE,
    SPLITS,
    extract_answer,
    is_correct,
    make_pairs,
    make_problems,
    split_of,
    write_jsonl,
)

_EQUATION = re.compile(r"(-?\d+) ([-+×÷]) (-?\d+) = (-?\d+)")
_INTEGER = re.compile(r"\d+")


def _content(row, field):
    return row[field][0]["content"]


def _rows_digest(rows):
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


# --- determinism ---------------------------------------------------------------------------------------

def test_same_seed_same_rows_and_different_seed_different_rows():
    assert make_pairs(40, edit="low", seed=3) == make_pairs(40, edit="low", seed=3)
    assert make_pairs(40, edit="high", seed=3, split="eval") == make_pairs(40, edit="high", seed=3, split="eval")
    assert make_pairs(40, seed=3) != make_pairs(40, seed=4)


def test_rows_are_identical_across_processes_with_different_hash_seeds():
    code = ("import hashlib, json; from dpop.tasks.arithmetic import make_pairs; "
            "rows = make_pairs(30, edit='low', seed=7, split='sft') + make_pairs(30, edit='high', seed=7); "
            "print(hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest())")
    expected = _rows_digest(make_pairs(30, edit="low", seed=7, split="sft") + make_pairs(30, edit="high", seed=7))
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_longer_list_starts_with_the_shorter_one():
    assert make_problems(50, seed=2, split="eval")[:20] == make_problems(20, seed=2, split="eval")


def test_split_of_is_pinned():
    # Changing the split rule would silently move problems between train and eval of existing data sets.
    assert [split_of(f"apples:2,3,{k}") for k in range(2, 10)] == [
        "sft", "eval", "train", "eval", "train", "train", "train", "sft"]
    assert split_of("trip:20,2,5") == "eval"
    assert all(split_of(f"pages:{k},3,4") == _expected_split(f"pages:{k},3,4") for k in range(10, 60))


def _expected_split(key):
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) % 10
    return "train" if bucket < 6 else "sft" if bucket < 8 else "eval"


# --- splits --------------------------------------------------------------------------------------------

def test_splits_never_share_a_problem_whatever_the_seeds():
    keys = {split: set() for split in SPLITS}
    for split in SPLITS:
        for seed in range(4):
            problems = make_problems(150, seed=seed, split=split)
            assert all(p.split == split == _expected_split(p.key) for p in problems)
            keys[split].update(p.key for p in problems)
    assert not keys["train"] & keys["eval"]
    assert not keys["train"] & keys["sft"]
    assert not keys["sft"] & keys["eval"]
    # and the question texts (with names) cannot coincide either
    questions = {split: {_content(r, "prompt") for r in make_pairs(150, seed=9, split=split)} for split in SPLITS}
    assert not questions["train"] & questions["eval"]


def test_key_ignores_the_name_in_the_question():
    template = _TEMPLATES["trip"]
    sam = arithmetic.Problem("trip", *template(random.Random(0), "Sam", "he"))
    mia = arithmetic.Problem("trip", *template(random.Random(0), "Mia", "she"))
    assert sam.question != mia.question
    assert sam.key == mia.key and sam.split == mia.split and sam.id == mia.id


def test_problems_in_one_list_are_distinct_and_cover_every_template():
    problems = make_problems(200, seed=1)
    assert len({p.key for p in problems}) == 200
    assert len({p.id for p in problems}) == 200
    assert {p.template for p in problems} == set(_TEMPLATES)
    assert {len(p.steps) for p in problems} == {2, 3}


# --- chosen --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", SPLITS)
def test_every_chosen_solution_is_right_step_by_step_and_checks_as_correct(split):
    for row in make_pairs(200, seed=1, split=split):
        chosen = _content(row, "chosen")
        lines = chosen.split("\n")
        assert lines[-1] == ANSWER_LINE.format(answer=row["answer"])
        assert is_correct(chosen, row["answer"])
        for line in lines[:-1]:
            left, op, right, result = _EQUATION.search(line).groups()
            left, right, result = int(left), int(right), int(result)
            assert result == {"+": left + right, "-": left - right, "×": left * right,
                              "÷": left // right}[op]
            assert op != "÷" or left % right == 0
        assert int(_EQUATION.search(lines[-2]).group(4)) == row["answer"]
        assert row["answer"] > 0


def test_row_shape_is_the_conversational_one():
    row = make_pairs(1, seed=0)[0]
    assert set(row) == {"prompt", "chosen", "rejected", "answer", "id"}
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["chosen"]] == ["assistant"]
    assert [m["role"] for m in row["rejected"]] == ["assistant"]
    assert isinstance(row["answer"], int) and row["id"].startswith("arithmetic-train-")


# --- rejected ------------------------------------------------------------------------------------------

def test_low_edit_median_distance_is_well_under_a_tenth():
    rows = make_pairs(200, edit="low", seed=1)
    distances = [normalized_edit_distance(_content(r, "chosen"), _content(r, "rejected")) for r in rows]
    assert statistics.median(distances) < 0.1
    assert min(distances) > 0


def test_high_edit_median_distance_is_over_three_tenths():
    rows = make_pairs(200, edit="high", seed=1)
    distances = [normalized_edit_distance(_content(r, "chosen"), _content(r, "rejected")) for r in rows]
    assert statistics.median(distances) > 0.3


@pytest.mark.parametrize("split", SPLITS)
def test_low_edit_rejected_changes_exactly_one_intermediate_result(split):
    for row in make_pairs(200, edit="low", seed=1, split=split):
        chosen, rejected = _content(row, "chosen"), _content(row, "rejected")
        assert rejected != chosen
        chosen_numbers, rejected_numbers = _INTEGER.findall(chosen), _INTEGER.findall(rejected)
        assert len(chosen_numbers) == len(rejected_numbers)
        assert sum(c != r for c, r in zip(chosen_numbers, rejected_numbers)) == 1
        chosen_lines, rejected_lines = chosen.split("\n"), rejected.split("\n")
        changed = [i for i, (c, r) in enumerate(zip(chosen_lines, rejected_lines)) if c != r]
        assert len(changed) == 1 and changed[0] < len(chosen_lines) - 2  # not the last step, not the answer
        chosen_result = _EQUATION.search(chosen_lines[changed[0]]).group(4)
        rejected_result = _EQUATION.search(rejected_lines[changed[0]]).group(4)
        assert chosen_result != rejected_result  # it is the result that changed, not an operand
        assert extract_answer(rejected) == row["answer"]  # the answer is left untouched, as in the paper


def test_high_edit_rejected_states_a_wrong_answer():
    for split in SPLITS:
        for row in make_pairs(200, edit="high", seed=1, split=split):
            rejected = _content(row, "rejected")
            assert rejected != _content(row, "chosen")
            assert extract_answer(rejected) is not None
            assert not is_correct(rejected, row["answer"])


def test_the_same_problem_has_the_same_chosen_under_both_edits():
    low, high = make_pairs(30, edit="low", seed=5), make_pairs(30, edit="high", seed=5)
    assert [(r["id"], r["chosen"]) for r in low] == [(r["id"], r["chosen"]) for r in high]


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="edit"):
        make_pairs(3, edit="medium")
    with pytest.raises(ConfigError, match="split"):
        make_problems(3, seed=0, split="test")
    with pytest.raises(ConfigError, match="--n"):
        make_problems(-1, seed=0)


def test_asking_for_more_problems_than_a_split_holds_is_a_config_error(monkeypatch):
    def two_problems(rng, name, he):  # a template with only two distinct problems
        hours = rng.randint(2, 3)
        return (hours,), f"{name} walks 5 km an hour for {hours} hours. How far?", (
            arithmetic.Step("", 5, "×", hours, " km."),)

    monkeypatch.setattr(arithmetic, "_TEMPLATES", {"walk": two_problems})
    with pytest.raises(ConfigError, match="fewer"):
        make_problems(3, seed=0, split="train")


def test_write_jsonl_round_trips(tmp_path):
    rows = make_pairs(5, edit="low", seed=0)
    path = write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert "×" in path.read_text(encoding="utf-8")  # kept as is, not \u00d7-escaped


# --- answer checker ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 24.", 24),
        ("Step one.\n3 × 7 = 21.\nThe answer is 24.", 24),
        ("answer: 24", 24),
        ("Answer = 24", 24),
        ("The final answer is $24.", 24),
        ("The answer is: 24 apples", 24),
        ("#### 752\nThe answer is: 752", 752),
        ("so the result is \\boxed{12}", 12),
        ("She has 3 + 4 = 7 apples, so 24", 24),  # no statement: the last number in the text
        ("The answer is -5.", -5),
        ("The answer is −5.", -5),  # a Unicode minus sign
        ("10 - 15 = -5", -5),
        ("The answer is 1,234.", 1234),
        ("In total 1,234,567 people", 1234567),
        ("The answer is 3 × 7 = 21.", 21),  # an equation in the answer sentence: its result
        ("The answer is 24.\nCheck: 24 - 3 = 21.", 24),  # a later check does not override the statement
        ("The answer is 24. Then again, the answer is 25.", 25),  # the last statement wins
        ("The answer is unclear. I think 8 apples.", 8),  # a statement without a number is skipped
        ("The answer is 24.0", 24),
        ("The answer is 2.5", None),  # not an integer
        ("10-5", 5),  # the "-" of an operator is not a sign
        ("I do not know.", None),
        ("", None),
        ("The answer is", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("6 × 4 = 24.\nThe answer is 24.", 24)
    assert not is_correct("6 × 4 = 24.\nThe answer is 25.", 24)
    assert not is_correct("no idea", 24)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9), st.booleans())
def test_extract_answer_reads_back_the_answer_line(value, with_commas):
    number = f"{value:,}" if with_commas else str(value)
    assert extract_answer(f"4 + 5 = 9.\n{ANSWER_LINE.format(answer=number)}") == value


@pytest.mark.parametrize("text, done", [
    ("Sam reads 8 × 3 = 24 pages.\nThe answer is 13.\n", True),
    ("The answer is 13. Then", True),
    ("The answer is 13.", False),  # "13." may still become "13.5"
    ("The answer is 2", False),
    ("Sam reads 8 × 3 = 24 pages.\n", False),
    ("The answer is\n", False),  # no number in the closed sentence
    ("#### 42\n", True),
])
def test_states_answer_waits_for_a_closed_sentence(text, done):
    assert arithmetic.states_answer(text) is done
