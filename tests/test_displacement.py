"""CHES scores (Razin et al. 2024) and per-token response log-probs, against a computation by hand from a plain
transformers forward; the CHES training filter; Spearman's rank correlation."""

import math

import pytest
import torch

from dpop.data.tokenize import TokenizedPair
from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer
from dpop.scoring.batching import collate
from dpop.scoring.displacement import ches_scores, response_tokens, top_fraction
from dpop.scoring.logprobs import sequence_logps

PAIRS = [
    TokenizedPair((5, 6, 7), (10, 11, 12, 13), (10, 11, 40)),  # share two tokens, then differ
    TokenizedPair((8,), (20, 21), (30, 31, 32, 33, 34)),  # differ at once
    TokenizedPair((9, 9, 9, 9), (50,), (50, 51)),  # chosen is a prefix of rejected
]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(make_tiny_tokenizer(), seed=3).eval()


def by_hand(model, pair):
    """Sums and means of the last layer's states that predict each response token, from HF's own forward of
    [prompt | response] alone (output_hidden_states: the last entry is after the final norm, what the head reads)."""
    sums, means = [], []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        with torch.no_grad():
            states = model(ids, output_hidden_states=True).hidden_states[-1][0].double()  # (T, H)
        start = len(pair.prompt_ids) - 1  # the prompt's last token predicts the first response token
        predicting = states[start:start + len(response)]  # (|y|, H)
        sums.append(predicting.sum(0))
        means.append(predicting.mean(0))
    raw = float(sums[0] @ sums[1] - sums[0] @ sums[0])
    normalized = float(means[0] @ means[1] - means[0] @ means[0])
    return raw, normalized


@pytest.mark.parametrize("layout", ["plain", "shared", "packed"])
def test_ches_equals_the_definition_computed_by_hand(model, layout):
    scores = ches_scores(model, PAIRS, layout={"layout": layout, "pad_id": 0, "pack_length": 32}, batch_size=2)
    for index, pair in enumerate(PAIRS):
        raw, normalized = by_hand(model, pair)
        assert scores.raw[index] == pytest.approx(raw, rel=1e-4, abs=1e-3)
        assert scores.normalized[index] == pytest.approx(normalized, rel=1e-4, abs=1e-4)
    assert scores.raw[0] != pytest.approx(scores.normalized[0])  # lengths > 1: the two forms differ


def test_identical_summed_states_give_zero_and_distinct_ones_a_negative_score():
    from dpop.scoring.displacement import ches_from_states

    w = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    l = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    # pair 0: ⟨w,w⟩ − ‖w‖² = 0; pair 1: ⟨(1,0),(0,3)⟩ − 1 = −1
    assert ches_from_states(w, l).tolist() == [0.0, -1.0]


def test_response_tokens_match_the_log_prob_routine_and_split_at_the_first_difference(model):
    layout = {"layout": "shared", "pad_id": 0, "pack_length": None}
    tokens = response_tokens(model, PAIRS, layout=layout, batch_size=2)
    with torch.no_grad():
        reference = sequence_logps(model, collate(PAIRS, layout="plain"))
    for index, scored in enumerate(tokens):
        assert len(scored.chosen_logps) == len(PAIRS[index].chosen_ids)
        assert len(scored.rejected_logps) == len(PAIRS[index].rejected_ids)
        parts = scored.chosen_parts()
        assert parts["sum"] == pytest.approx(float(reference.chosen[index]), abs=1e-4)
        assert sum(scored.rejected_logps) == pytest.approx(float(reference.rejected[index]), abs=1e-4)
        assert parts["per_token"] == pytest.approx(parts["sum"] / len(PAIRS[index].chosen_ids))
        divergent = float(reference.divergent_chosen_mean()[index])
        assert (math.isnan(parts["divergent_per_token"]) and math.isnan(divergent)
                or parts["divergent_per_token"] == pytest.approx(divergent, abs=1e-5))
    assert [t.divergence for t in tokens] == [2, 0, 1]
    first = tokens[0]
    assert first.chosen_parts()["shared_per_token"] == pytest.approx(sum(first.chosen_logps[:2]) / 2)
    assert math.isnan(tokens[1].chosen_parts()["shared_per_token"])  # no shared token


def test_top_fraction_takes_the_highest_scores_and_breaks_ties_towards_later_pairs():
    scores = [0.5, 3.0, -1.0, 3.0, 2.0]
    assert top_fraction(scores, 0.4) == {1, 3}
    assert top_fraction(scores, 0.2) == {3}  # a tie: the later pair goes, the earlier one stays
    assert top_fraction(scores, 0.0) == set()
    assert top_fraction(scores, 1.0) == {0, 1, 2, 3, 4}


def test_spearman_matches_a_worked_example_with_ties():
    from dpop.analysis.displacement import spearman

    # x ranks 1, 2, 3, 4; y = 10, 20, 20, 40 ranks 1, 2.5, 2.5, 4 -> Pearson of the ranks
    x, y = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 20.0, 40.0]
    rx, ry = [1, 2, 3, 4], [1, 2.5, 2.5, 4]
    mx, my = 2.5, 2.5
    expected = sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman(x, y) == pytest.approx(expected)
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    assert spearman([1.0, math.nan, 2.0, 3.0], [3.0, 0.0, 2.0, 1.0]) == pytest.approx(-1.0)  # NaN pairs dropped


def test_filter_ches_drops_the_top_fraction_by_normalised_score_before_training(tiny_config, caplog):
    import logging

    from dpop.data.runs import load_run_pairs, tokenize_run_pairs
    from dpop.models import load_model
    from dpop.training.setup import setup

    config = tiny_config(filter_ches=0.25)
    every = tokenize_run_pairs(load_run_pairs(config, None, None), load_model(config.model)[1], config).train.pairs
    model, tokenizer = load_model(config.model)
    layout = {"layout": config.layout, "pad_id": tokenizer.pad_token_id, "pack_length": config.max_length}
    scores = ches_scores(model, every, layout=layout).normalized
    expected = [pair for index, pair in enumerate(every) if index not in top_fraction(scores, 0.25)]
    with caplog.at_level(logging.INFO, logger="dpop"):
        run = setup(config)
    assert len(every) == 16 and len(run.data.train.pairs) == 12
    assert run.data.train.pairs == expected  # the rest, in their order
    assert "filter_ches 0.25: dropped 4 of 16 training pairs" in caplog.text
    assert len(setup(tiny_config("unfiltered")).data.train.pairs) == 16


@pytest.mark.parametrize("overrides, message", [
    (dict(filter_ches=1.0), "filter_ches"),
    (dict(filter_ches=0.5, loss="kto", unpair=True), "unpaired rows"),
])
def test_filter_ches_values_that_cannot_work_are_refused(tiny_config, overrides, message):
    from dpop.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_doctor_with_a_model_prints_ches_and_writes_the_scores_it_computed(pairs_file, tiny_model_dir, tmp_path,
                                                                           capsys):
    import json

    from dpop.cli import main
    from dpop.data import load_pairs
    from dpop.data.tokenize import tokenize_pairs
    from dpop.models import load_model

    out = tmp_path / "scores.jsonl"
    assert main(["data", "doctor", str(pairs_file), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "CHES under" in printed and "length-normalised" in printed
    assert "rank correlation with edit distance" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model, tokenizer = load_model(str(tiny_model_dir))
    tokenized = tokenize_pairs(load_pairs(pairs_file).pairs, tokenizer, max_length=1024, max_prompt_length=512).pairs
    scores = ches_scores(model, tokenized, layout={"layout": "plain", "pad_id": tokenizer.pad_token_id})
    assert [r["index"] for r in rows] == list(range(16))
    # another layout than the doctor's (shared): equal up to fp32 summation order
    assert [r["ches"] for r in rows] == pytest.approx(scores.raw, rel=1e-4)
    assert [r["ches_normalized"] for r in rows] == pytest.approx(scores.normalized, rel=1e-4)
    assert all(0 <= r["edit_distance"] <= 1 for r in rows)

    assert main(["data", "doctor", str(pairs_file)]) == 0  # without a model: no CHES, and says how to get it
    assert "pass --model" in capsys.readouterr().out


def test_token_pieces_give_a_split_character_whole_to_the_token_that_completes_it():
    """Byte-level BPE splits ÷ and é over two tokens; decoded alone each is U+FFFD. The strips' texts join back
    to the response, and the token that starts a split character carries ''."""
    from dpop.analysis.displacement import token_pieces
    from dpop.reporting.strips import strip_html

    tokenizer = make_tiny_tokenizer()
    text = "12 ÷ 4 = 3, café"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    alone = [tokenizer.decode([token]) for token in ids]
    assert any("\ufffd" in piece for piece in alone)  # the case this is about
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[alone.index("\ufffd")] == ""
    html = strip_html(pieces, [0.0] * len(pieces), None)
    assert html.count('class="tok"') == len(ids) and "part of the next character" in html and "\ufffd" not in html
