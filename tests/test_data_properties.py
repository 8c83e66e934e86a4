"""Properties of row validation: any JSON-ish rows give pairs or a DataError; valid pairs keep the data."""

import itertools
import json

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dpop.data import LoadedPairs, load_pairs, pairs_from_rows
from dpop.errors import DataError

KEYS = st.sampled_from(["prompt", "chosen", "rejected", "completions", "role", "content", "text", "score",
                        "id"])
TEXT = st.text(max_size=12) | st.sampled_from(["a", "b", " 5", "\n\nHuman: q", "\n\nAssistant:",
                                               "\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b"])
WORDS = st.text(min_size=1, max_size=8) | st.sampled_from(["a", "b", "c"])
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | TEXT
ROLE = st.sampled_from(["user", "assistant", "assistant", "system", "tool", "bot", ""])
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | SCALARS})
COMPLETION = (st.fixed_dictionaries({"text": TEXT, "score": st.integers(-2, 2)})
              | st.dictionaries(KEYS, SCALARS, max_size=3))
JSONISH = st.recursive(
    SCALARS | MESSAGE | COMPLETION,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | TEXT, inner, max_size=4), max_leaves=12)

MESSAGES = st.lists(MESSAGE, min_size=1, max_size=3)
PROMPT = MESSAGES | st.lists(MESSAGE, max_size=2).map(lambda turns: turns + [{"role": "user", "content": "q"}])
ANSWER = MESSAGES | st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": WORDS}),
                             min_size=1, max_size=2)
EXTRA = {"id": JSONISH}
# Rows close to each shape (so that many are valid), rows of any of our keys, and values that are not rows.
NEAR_SHAPES = [
    st.fixed_dictionaries({"prompt": TEXT | WORDS, "chosen": TEXT | WORDS, "rejected": TEXT | WORDS},
                          optional=EXTRA),
    st.fixed_dictionaries({"prompt": PROMPT, "chosen": ANSWER | MESSAGE, "rejected": ANSWER}, optional=EXTRA),
    st.builds(lambda human, chosen, rejected: {"chosen": f"\n\nHuman: {human}\n\nAssistant:{chosen}",
                                               "rejected": f"\n\nHuman: {human}\n\nAssistant:{rejected}"},
              WORDS, TEXT, TEXT),
    st.builds(lambda prompt, chosen, rejected: {"chosen": prompt + chosen, "rejected": prompt + rejected},
              PROMPT, ANSWER, ANSWER),
    st.fixed_dictionaries({"prompt": TEXT | PROMPT, "completions": st.lists(COMPLETION, max_size=4)},
                          optional=EXTRA),
]
ANY_ROW = st.dictionaries(KEYS, TEXT | MESSAGES | st.lists(COMPLETION, max_size=4) | JSONISH, max_size=5)
ROWS = st.one_of(*[st.lists(shape, min_size=1, max_size=3) for shape in NEAR_SHAPES],
                 *[st.lists(shape | ANY_ROW, min_size=1, max_size=3) for shape in NEAR_SHAPES],
                 st.lists(ANY_ROW | JSONISH, min_size=1, max_size=4))


def check_pairs(loaded: LoadedPairs) -> None:
    assert loaded.pairs
    for pair in loaded.pairs:
        for value in (pair.prompt, pair.chosen, pair.rejected):
            if isinstance(value, str):
                assert value.strip()
            else:
                assert isinstance(value, tuple) and value
                assert all(isinstance(m, dict) and isinstance(m["content"], str) for m in value)
        assert isinstance(pair.prompt, str) == isinstance(pair.chosen, str) == isinstance(pair.rejected, str)
        assert pair.chosen != pair.rejected
        if pair.conversational:
            assert all(m["role"] == "assistant" for m in pair.chosen + pair.rejected)
            assert pair.prompt[-1]["role"] != "assistant"


@settings(max_examples=300, deadline=None)
@given(ROWS, st.sampled_from(["best_worst", "all"]))
def test_any_rows_give_pairs_or_a_data_error(rows, ranked_pairs):
    try:
        loaded = pairs_from_rows(rows, ranked_pairs=ranked_pairs)
    except DataError as error:
        assert error.problems and error.total >= len(error.problems[:20])
    else:
        check_pairs(loaded)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=ROWS)
def test_any_jsonl_file_gives_pairs_or_a_data_error(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")  # a NaN makes invalid JSON
    try:
        check_pairs(load_pairs(path))
    except DataError:
        pass


CELL = st.text(max_size=10) | st.sampled_from([
    '[{"role": "user", "content": "q"}]', '{"role": "assistant"}', "[1]",
    '[{"text": "a", "score": 1}, {"text": "b", "score": 0}]'])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(KEYS, min_size=1, max_size=4), cells=st.lists(st.lists(CELL, max_size=5), max_size=4))
def test_any_csv_file_gives_pairs_or_a_data_error(tmp_path, header, cells):
    import csv

    path = tmp_path / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(cells)
    try:
        check_pairs(load_pairs(path))
    except DataError:
        pass


NONBLANK = st.text(min_size=1, max_size=10).filter(str.strip)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(NONBLANK, NONBLANK, NONBLANK), min_size=1, max_size=8), st.data())
def test_valid_explicit_rows_round_trip_and_one_bad_row_is_located(triples, data):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in triples]
    expected = [(p, c, r) for p, c, r in triples if c != r]
    if expected:
        loaded = pairs_from_rows(rows)
        assert [(pair.prompt, pair.chosen, pair.rejected) for pair in loaded.pairs] == expected
        assert loaded.skipped.get("chosen identical to rejected", 0) == len(triples) - len(expected)
    bad = data.draw(st.integers(0, len(rows) - 1))
    del rows[bad]["rejected"]
    try:
        pairs_from_rows(rows)
    except DataError as error:
        assert error.problems == [f"rows row {bad + 1}: field 'rejected': missing"]
    else:
        raise AssertionError("a row without 'rejected' was accepted")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(NONBLANK, st.integers(-2, 2)), min_size=2, max_size=6),
       st.sampled_from(["best_worst", "all"]))
def test_ranked_pairs_prefer_higher_scores(completions, ranked_pairs):
    row = {"prompt": "p", "completions": [{"text": text, "score": score} for text, score in completions]}
    try:
        loaded = pairs_from_rows([row], ranked_pairs=ranked_pairs)
    except DataError as error:
        assert "no pairs left" in str(error)
        return
    scores = [score for _, score in completions]
    for pair in loaded.pairs:
        assert pair.metadata["chosen_score"] > pair.metadata["rejected_score"]
        if ranked_pairs == "best_worst":
            assert pair.metadata["chosen_score"] == max(scores)
            assert pair.metadata["rejected_score"] == min(scores)
    if ranked_pairs == "all":
        expected = sum(1 for (a, x), (b, y) in itertools.product(completions, repeat=2) if x > y and a != b)
        assert len(loaded.pairs) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(NONBLANK, NONBLANK), min_size=1, max_size=3), NONBLANK, NONBLANK)
def test_implicit_prompts_split_without_losing_text(turns, chosen_answer, rejected_answer):
    conversation = "".join(f"\n\nHuman: {human}\n\nAssistant: {reply}" for human, reply in turns[:-1])
    conversation += f"\n\nHuman: {turns[-1][0]}\n\nAssistant:"
    assume(chosen_answer != rejected_answer)
    chosen, rejected = conversation + " " + chosen_answer, conversation + " " + rejected_answer
    (pair,) = pairs_from_rows([{"chosen": chosen, "rejected": rejected}]).pairs
    assert pair.prompt + pair.chosen == chosen and pair.prompt + pair.rejected == rejected
    assert pair.prompt.endswith("\n\nAssistant:")
