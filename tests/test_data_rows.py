"""Row shapes, column mapping and validation: rows -> pairs, or one DataError listing every problem."""

import json

import pytest

from dpop.data import PreferencePair, load_pairs, pairs_from_rows
from dpop.errors import ConfigError, DataError

ROW = {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def problems(rows, **options) -> list[str]:
    with pytest.raises(DataError) as excinfo:
        pairs_from_rows(rows, **options)
    return excinfo.value.problems


# ---- shapes ------------------------------------------------------------------------------------------------

def test_explicit_rows_keep_extra_columns_as_metadata():
    loaded = pairs_from_rows([{**ROW, "id": 4, "answer": "5"}])
    assert loaded.pairs == [PreferencePair("2 + 3 =", " 5", " 6", "rows row 1", {"id": 4, "answer": "5"})]
    assert not loaded.pairs[0].conversational
    assert (loaded.rows_read, loaded.skipped) == (1, {})


def test_conversational_rows_and_single_message_answers():
    row = {"prompt": [{"role": "system", "content": ""}, user("hi")], "chosen": [assistant("hello")],
           "rejected": assistant("bye")}
    (pair,) = pairs_from_rows([row]).pairs
    assert pair.conversational
    assert pair.prompt == ({"role": "system", "content": ""}, user("hi"))
    assert pair.chosen == (assistant("hello"),) and pair.rejected == (assistant("bye"),)


def test_conversational_answer_may_span_several_assistant_turns():
    row = {"prompt": [user("hi")], "chosen": [assistant("a"), assistant("b")], "rejected": [assistant("c")]}
    assert pairs_from_rows([row]).pairs[0].chosen == (assistant("a"), assistant("b"))


def test_implicit_hh_strings():
    chosen = "\n\nHuman: 2 + 3?\n\nAssistant: 4?\n\nHuman: sure?\n\nAssistant: It is 5."
    rejected = "\n\nHuman: 2 + 3?\n\nAssistant: 4?\n\nHuman: sure?\n\nAssistant: It is 6."
    (pair,) = pairs_from_rows([{"chosen": chosen, "rejected": rejected}]).pairs
    assert pair.prompt == "\n\nHuman: 2 + 3?\n\nAssistant: 4?\n\nHuman: sure?\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" It is 5.", " It is 6.")


def test_implicit_hh_strings_whose_answers_share_a_beginning():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: The answer is 5",
           "rejected": "\n\nHuman: q\n\nAssistant: The end"}
    (pair,) = pairs_from_rows([row]).pairs
    assert pair.prompt == "\n\nHuman: q\n\nAssistant:"
    assert (pair.chosen, pair.rejected) == (" The answer is 5", " The end")


def test_implicit_conversations():
    common = [{"role": "system", "content": "be brief"}, user("2 + 3?"), assistant("5"), user("and 2 + 4?")]
    row = {"chosen": common + [assistant("6")], "rejected": common + [assistant("7")], "id": "x"}
    (pair,) = pairs_from_rows([row]).pairs
    assert pair.prompt == tuple(common)
    assert (pair.chosen, pair.rejected) == ((assistant("6"),), (assistant("7"),))
    assert pair.metadata == {"id": "x"}


def test_implicit_conversations_common_assistant_turns_belong_to_the_answer():
    row = {"chosen": [user("q"), assistant("a"), assistant("b")],
           "rejected": [user("q"), assistant("a"), assistant("c")]}
    (pair,) = pairs_from_rows([row]).pairs
    assert pair.prompt == (user("q"),)
    assert pair.chosen == (assistant("a"), assistant("b"))
    assert pair.rejected == (assistant("a"), assistant("c"))


def test_implicit_conversations_that_differ_before_the_last_assistant_turn():
    row = {"chosen": [user("q"), assistant("a"), user("x"), assistant("b")],
           "rejected": [user("q"), assistant("a"), user("y"), assistant("b")]}
    chosen_problem, rejected_problem = problems([row])
    assert chosen_problem.startswith("rows row 1: field 'chosen': message 3: a 'user' turn after the common")
    assert rejected_problem.startswith("rows row 1: field 'rejected': message 3: a 'user' turn")


def test_implicit_text_without_hh_markers_needs_a_prompt():
    (problem,) = problems([{"chosen": "yes", "rejected": "no"}])
    assert problem.startswith("rows row 1: field 'prompt': missing")


def test_ranked_best_worst_takes_the_first_of_tied_completions():
    row = {"prompt": "p", "id": 1, "completions": [
        {"text": "low-a", "score": 0}, {"text": "top-a", "score": 2.5}, {"content": "top-b", "score": 2.5},
        {"text": "low-b", "score": 0}, {"text": "mid", "score": 1}]}
    (pair,) = pairs_from_rows([row]).pairs
    assert (pair.chosen, pair.rejected) == ("top-a", "low-a")
    assert pair.metadata == {"id": 1, "chosen_score": 2.5, "rejected_score": 0}


def test_ranked_all_pairs_every_different_score_in_row_order():
    row = {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 3},
                                          {"text": "c", "score": 1}, {"text": "d", "score": 2}]}
    pairs = pairs_from_rows([row], ranked_pairs="all").pairs
    expected = [("b", "a"), ("b", "c"), ("b", "d"), ("d", "a"), ("d", "c")]
    assert [(pair.chosen, pair.rejected) for pair in pairs] == expected


def test_ranked_rows_with_fewer_than_two_scores_are_skipped_and_counted():
    rows = [{"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]},
            {"prompt": "p", "completions": [{"text": "a", "score": 1}]},
            {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 0}]}]
    loaded = pairs_from_rows(rows)
    assert loaded.skipped == {"fewer than 2 distinct scores": 2}
    assert [pair.source for pair in loaded.pairs] == ["rows row 3"]


def test_ranked_with_a_conversational_prompt_gives_assistant_messages():
    row = {"prompt": [user("q")], "completions": [{"text": "good", "score": 1}, {"text": "bad", "score": -1}]}
    (pair,) = pairs_from_rows([row]).pairs
    assert pair.conversational
    assert (pair.chosen, pair.rejected) == ((assistant("good"),), (assistant("bad"),))


def test_ranked_bad_completions():
    row = {"prompt": "p", "completions": [
        {"text": "a", "score": True}, {"text": "b"}, {"text": "c", "content": "c", "score": 1},
        {"text": "", "score": 1}, "x", {"text": "d", "score": 2}]}
    assert [problem.split(": ", 2)[2] for problem in problems([row])] == [
        "item 1: 'score': expected a number, got bool", "item 2: 'score' missing",
        "item 3: has both 'text' and 'content'; keep one", "item 4: 'text' is empty",
        "item 5: expected an object with 'text' and 'score', got string"]


def test_identical_chosen_and_rejected_are_skipped_and_counted():
    loaded = pairs_from_rows([ROW, {**ROW, "rejected": ROW["chosen"]}])
    assert loaded.skipped == {"chosen identical to rejected": 1} and len(loaded.pairs) == 1
    same = "\n\nHuman: q\n\nAssistant: a"
    implicit = pairs_from_rows([{"chosen": same, "rejected": same}, {"chosen": same, "rejected": same + "b"}])
    assert implicit.skipped == {"chosen identical to rejected": 1}
    assert (implicit.pairs[0].chosen, implicit.pairs[0].rejected) == (" a", " ab")


def test_every_row_skipped_is_an_error():
    with pytest.raises(DataError, match="no pairs left"):
        pairs_from_rows([{**ROW, "rejected": ROW["chosen"]}])


# ---- column mapping ----------------------------------------------------------------------------------------

def test_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "good": "y", "bad": "n", "prompt": "other"}])
    (pair,) = load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}).pairs
    assert (pair.prompt, pair.chosen, pair.rejected, pair.metadata) == ("q", "y", "n", {"prompt": "other"})


def test_mapped_column_missing_from_the_file_is_named(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "good": "y", "rejected": "n"}])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path, columns={"prompt": "question", "chosen": "best"})
    assert "'best' (mapped to chosen) not found" in str(excinfo.value)
    assert "question, good, rejected" in str(excinfo.value)


def test_mapped_column_missing_from_a_csv_header(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("q,chosen,rejected\np,a,b\n")
    with pytest.raises(DataError, match="'question' \\(mapped to prompt\\) not found"):
        load_pairs(path, columns={"prompt": "question"})


def test_problems_name_the_files_column():
    (problem,) = problems([{"q": "p", "good": 3, "rejected": "n"}], columns={"prompt": "q", "chosen": "good"})
    assert problem == "rows row 1: field 'good' (as chosen): expected a string, got int"


@pytest.mark.parametrize("options, match", [
    ({"columns": {"answer": "x"}}, "unknown field 'answer'"),
    ({"columns": {"chosen": "x", "rejected": "x"}}, "more than one field"),
    ({"ranked_pairs": "best"}, "ranked_pairs"),
])
def test_bad_options_are_config_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        pairs_from_rows([ROW], **options)


# ---- CSV cells holding JSON --------------------------------------------------------------------------------

def test_csv_cells_may_hold_json_messages_and_completions(tmp_path):
    def cell(value):
        return '"' + json.dumps(value).replace('"', '""') + '"'

    path = tmp_path / "a.csv"
    path.write_text("prompt,chosen,rejected\n"
                    f"{cell([user('hi')])},{cell([assistant('hello')])},{cell(assistant('bye'))}\n")
    (pair,) = load_pairs(path).pairs
    assert pair.prompt == (user("hi"),) and pair.rejected == (assistant("bye"),)

    ranked = tmp_path / "b.csv"
    completions = [{"text": "a", "score": 1}, {"text": "b", "score": 0}]
    ranked.write_text(f"prompt,completions\n[1] + [2],{cell(completions)}\n")
    (pair,) = load_pairs(ranked).pairs
    assert (pair.prompt, pair.chosen, pair.rejected) == ("[1] + [2]", "a", "b")


# ---- bad rows ----------------------------------------------------------------------------------------------

def test_third_line_missing_rejected(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROW, ROW, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    (problem,) = excinfo.value.problems
    assert ":3:" in problem and "rejected" in problem and "missing" in problem


def test_third_line_chosen_an_integer(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROW, ROW, {**ROW, "chosen": 7}])
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert excinfo.value.problems == [f"{path}:3: field 'chosen': expected a string, got int"]


def test_third_line_invalid_json(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + '\n{"prompt": "p", "chosen": \n')
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{path}:3: invalid JSON: ")


def test_more_than_twenty_bad_rows_lists_twenty_and_the_total(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [ROW] + [{"prompt": "p", "chosen": "c"}] * 25)
    with pytest.raises(DataError) as excinfo:
        load_pairs(path)
    assert excinfo.value.total == 25
    lines = str(excinfo.value).splitlines()
    assert "25 problem(s)" in lines[0]
    assert sum("field 'rejected': missing" in line for line in lines) == 20
    assert f"{path}:21:" in str(excinfo.value) and f"{path}:22:" not in str(excinfo.value)
    assert "and 5 more" in lines[-1]


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "p", "chosen": None, "rejected": "r"}, "field 'chosen': null"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "field 'chosen': empty string"),
    ({"prompt": "p", "chosen": ["c"], "rejected": "r"}, "field 'chosen': expected a string, got list"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "field 'prompt': null"),
])
def test_explicit_field_problems(row, expected):
    assert problems([ROW, row]) == [f"rows row 2: {expected}"]


CONVERSATION = {"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}


@pytest.mark.parametrize("change, expected", [
    ({"prompt": [{"role": "bot", "content": "q"}]}, "field 'prompt': message 1: role 'bot' is not one of"),
    ({"prompt": [{"content": "q"}]}, "field 'prompt': message 1: 'role' missing"),
    ({"prompt": [user("q"), {"role": "user", "content": 3}]},
     "field 'prompt': message 2: 'content': expected a string, got int"),
    ({"prompt": [user(" ")]}, "field 'prompt': message 1: 'content' is empty"),
    ({"prompt": []}, "field 'prompt': empty list of messages"),
    ({"prompt": [user("q"), assistant("a")]}, "field 'prompt': the last message is an assistant turn"),
    ({"chosen": [user("a")]}, "field 'chosen': message 1: a 'user' turn where the answer's assistant turns"),
    ({"chosen": "a"}, "field 'chosen': expected a list of messages, got string"),
    ({"rejected": ["b"]},
     "field 'rejected': message 1: expected an object with 'role' and 'content', got string"),
])
def test_message_problems(change, expected):
    (problem,) = problems([CONVERSATION, {**CONVERSATION, **change}])
    assert problem.startswith(f"rows row 2: {expected}")


def test_all_problems_of_a_row_are_listed():
    assert problems([ROW, {"prompt": 1, "chosen": None}]) == [
        "rows row 2: field 'prompt': expected a string, got int", "rows row 2: field 'chosen': null",
        "rows row 2: field 'rejected': missing"]


def test_mixed_shapes_name_the_first_row_of_the_other_shape():
    ranked = {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 0}]}
    found = problems([ROW, ROW, ranked, CONVERSATION, ranked, ROW])
    assert found == [
        "rows row 3: row shape 'ranked' differs from the file's shape 'explicit' (first of 2 such row(s)); "
        "use one shape per file",
        "rows row 4: row shape 'conversational' differs from the file's shape 'explicit' (first of 1 such "
        "row(s)); use one shape per file"]


def test_the_shape_of_most_rows_wins():
    found = problems([{"chosen": "a", "rejected": "b"}, ROW, ROW])
    assert found == ["rows row 1: field 'prompt': missing"]


def test_rows_that_are_not_objects():
    assert problems([ROW, [1, 2]]) == ["rows row 2: expected an object, got list"]


def test_rows_with_only_a_prompt_are_missing_fields_of_the_files_shape():
    ranked = {"prompt": "p", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 0}]}
    assert problems([ranked, {"prompt": "p"}]) == ["rows row 2: field 'completions': missing"]
    assert problems([ROW, {"prompt": "p", "completions": None}]) == [
        "rows row 2: field 'chosen': missing", "rows row 2: field 'rejected': missing"]


def test_hh_answer_that_opens_a_new_human_turn():
    row = {"chosen": "\n\nHuman: q\n\nAssistant: a\n\nHuman: more?\n\nAssistant: b",
           "rejected": "\n\nHuman: q\n\nAssistant: c"}
    (problem,) = problems([row])
    assert problem.startswith("rows row 1: field 'chosen': a '\\n\\nHuman:' turn after the prompt")


def test_implicit_conversations_without_a_common_prompt():
    (problem,) = problems([{"chosen": [user("q"), assistant("a")], "rejected": [user("r"), assistant("b")]}])
    assert problem.startswith("rows row 1: field 'prompt': missing")


def test_implicit_conversation_that_ends_with_the_prompt():
    (problem,) = problems([{"chosen": [user("q")], "rejected": [user("q"), assistant("b")]}])
    assert problem == "rows row 1: field 'chosen': no assistant turn after the common prompt"
