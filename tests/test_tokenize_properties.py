"""Properties of rows -> token ids -> batches: any rows, any text (special-token strings, control characters,
emoji, lone spaces) and any length limits give either our error type or pairs and tensors that a model can
score, in every batch layout, with finite log-probs."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpop.data import pairs_from_rows
from dpop.data.tokenize import tokenize_pairs
from dpop.errors import DpopError
from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer
from dpop.scoring.batching import LAYOUTS, collate
from dpop.scoring.logprobs import sequence_logps

SPECIAL = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<s>", "\n\nHuman:", "\n\nAssistant:", " ", "\n", "\x00",
           "\u200b", "\ufeff", "🙂", "é", "the answer", " 5", "\ud800"]  # the last: a lone surrogate
TEXT = st.lists(st.sampled_from(SPECIAL) | st.text(max_size=6), max_size=8).map("".join)  # may be blank
WORDS = st.builds(str.__add__, st.sampled_from(["a", "5", "é", "<|im_end|>", "🙂", "the", "<s>"])
                  | st.text("abcxyz0123456789", min_size=1, max_size=4), TEXT)  # never blank
LONG = st.lists(WORDS, min_size=5, max_size=30).map(" ".join)
ANSWER = st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": WORDS}), min_size=1, max_size=2)
PROMPT = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                         "content": WORDS}), max_size=2).map(
    lambda turns: turns + [{"role": "user", "content": "q"}])
SHAPES = (
    st.fixed_dictionaries({"prompt": WORDS | LONG, "chosen": WORDS | LONG, "rejected": WORDS | LONG}),
    st.fixed_dictionaries({"prompt": PROMPT, "chosen": ANSWER, "rejected": ANSWER}),
    st.builds(lambda human, chosen, rejected: {"chosen": f"\n\nHuman: {human}\n\nAssistant:{chosen}",
                                               "rejected": f"\n\nHuman: {human}\n\nAssistant:{rejected}"},
              WORDS, WORDS, WORDS),
    # answers that share a long beginning: truncation can make them identical (dropped and counted)
    st.builds(lambda prompt, common, chosen, rejected: {"prompt": prompt, "chosen": common + chosen,
                                                        "rejected": common + rejected}, WORDS, LONG, WORDS, WORDS),
    # anything at all in our fields, roles included
    st.fixed_dictionaries({"prompt": TEXT | st.lists(st.fixed_dictionaries({"role": st.text(max_size=5),
                                                                            "content": TEXT}), max_size=2),
                           "chosen": TEXT, "rejected": TEXT | st.integers() | st.none()}),
)
ROWS = st.one_of(*[st.lists(shape, min_size=1, max_size=3) for shape in SHAPES])  # one shape per file


@pytest.fixture(scope="module")
def models():
    """(tokenizer, model) with and without a BOS-adding tokenizer."""
    built = []
    for bos in (False, True):
        tokenizer = make_tiny_tokenizer(bos=bos)
        built.append((tokenizer, make_tiny_model(tokenizer, layers=1, hidden=32, heads=2)))
    return built


def check_pairs(pairs, tokenizer, max_length: int, prompt_limit: int) -> None:
    for pair in pairs:
        assert 1 <= len(pair.prompt_ids) <= prompt_limit
        for response in (pair.chosen_ids, pair.rejected_ids):
            assert response and len(pair.prompt_ids) + len(response) <= max_length
        assert pair.chosen_ids != pair.rejected_ids
        assert all(0 <= i < len(tokenizer) for i in pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)


def check_batch(batch, pairs, model) -> None:
    rows, width = batch.input_ids.shape
    assert batch.input_ids.dtype == torch.long and int(batch.input_ids.max()) < model.config.vocab_size
    expected_targets = [i for p in pairs for i in p.chosen_ids] + [i for p in pairs for i in p.rejected_ids]
    assert sorted(batch.target_ids.tolist()) == sorted(expected_targets)
    assert int(batch.hidden_index.max()) < rows * width and int(batch.hidden_index.min()) >= 0
    assert batch.chosen_lengths.tolist() == [len(p.chosen_ids) for p in pairs]
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    assert logps.chosen.shape == logps.rejected.shape == (len(pairs),)
    assert torch.isfinite(logps.chosen).all() and torch.isfinite(logps.rejected).all()
    assert (logps.chosen <= 0).all() and (logps.rejected <= 0).all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=ROWS, max_length=st.integers(2, 48), prompt_share=st.floats(0, 1),
       which=st.integers(0, 1), layout=st.sampled_from(LAYOUTS))
def test_any_rows_give_scorable_batches_or_our_error(models, rows, max_length, prompt_share, which, layout):
    tokenizer, model = models[which]
    prompt_limit = max(1, min(max_length - 1, math.floor(prompt_share * max_length)))
    try:
        loaded = pairs_from_rows(rows)
        data = tokenize_pairs(loaded.pairs, tokenizer, max_length=max_length, max_prompt_length=prompt_limit)
    except DpopError:
        return
    assert len(data.pairs) + sum(data.dropped.values()) == len(loaded.pairs)  # every pair kept or counted
    check_pairs(data.pairs, tokenizer, max_length, prompt_limit)
    if data.pairs:
        batch = collate(data.pairs, layout=layout, pad_id=tokenizer.pad_token_id, pack_length=max_length)
        check_batch(batch, data.pairs, model)
