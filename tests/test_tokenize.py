"""Tokenization: the prompt/response boundary, EOS, BOS, chat templates and truncation (DESIGN.md §5)."""

from dataclasses import dataclass

import pytest

from dpop.data.tokenize import tokenize_pair, tokenize_pairs, truncate_pair
from dpop.errors import ConfigError
from dpop.models.tiny import make_tiny_tokenizer


@dataclass
class Pair:
    prompt: object
    chosen: object
    rejected: object
    source: str = "test"


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    return make_tiny_tokenizer(bos=True)


def test_prompt_ending_in_space_keeps_its_own_tokens(tokenizer):
    """'The answer is ' + '5.' tokenised together merges the space into ' 5'; ours must not."""
    prompt, response = "What is 2 + 3? The answer is ", "5."
    merged = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert merged[: len(alone)] != alone  # the trap is real with this tokenizer
    pair = tokenize_pair(Pair(prompt, response, "6."), tokenizer)
    assert list(pair.prompt_ids) == alone
    assert tokenizer.decode(list(pair.prompt_ids) + list(pair.chosen_ids)) == prompt + response + "<|im_end|>"


def test_prompt_ending_mid_word_keeps_its_own_tokens(tokenizer):
    prompt, response = "The quick brown fox jumps over the la", "zy dog."
    pair = tokenize_pair(Pair(prompt, response, "st dog."), tokenizer)
    assert list(pair.prompt_ids) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert list(pair.chosen_ids[:-1]) == tokenizer(response, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(list(pair.prompt_ids) + list(pair.chosen_ids)) == prompt + response + "<|im_end|>"


def test_every_response_ends_with_one_eos(tokenizer):
    eos = tokenizer.eos_token_id
    pair = tokenize_pair(Pair("Hello", " world", " there<|im_end|>"), tokenizer)
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids[-1] == eos and list(ids).count(eos) == 1


def test_no_doubled_bos(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    plain = tokenize_pair(Pair("Hello there", " a", " b"), bos_tokenizer)
    assert plain.prompt_ids[0] == bos and plain.prompt_ids[1] != bos
    already = tokenize_pair(Pair("<s>Hello there", " a", " b"), bos_tokenizer)
    assert already.prompt_ids[0] == bos and already.prompt_ids[1] != bos
    assert bos not in plain.chosen_ids  # responses never get a BOS


def test_chat_template_prompt_and_response(tokenizer):
    prompt = ({"role": "user", "content": "What is 2 + 3?"},)
    chosen = ({"role": "assistant", "content": "2 + 3 = 5. The answer is 5."},)
    rejected = ({"role": "assistant", "content": "2 + 3 = 6. The answer is 6."},)
    pair = tokenize_pair(Pair(prompt, chosen, rejected), tokenizer)
    expected_prompt = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(list(pair.prompt_ids)) == expected_prompt
    # the response is the assistant content and the end-of-turn token; the template's trailing newline is cut
    assert tokenizer.decode(list(pair.chosen_ids)) == "2 + 3 = 5. The answer is 5.<|im_end|>"
    full = tokenizer.apply_chat_template(list(prompt + chosen), tokenize=False)
    assert full.startswith(tokenizer.decode(list(pair.prompt_ids) + list(pair.chosen_ids)))


def test_builtin_tokenizer_boundary_and_template():
    """The real SmolLM2 tokenizer (from the cache `make` builds): a space-ending prompt and the template."""
    from dpop.models import load_tokenizer, resolve_model
    from dpop.models.builtin import BUILTIN_NAME

    tokenizer = load_tokenizer(resolve_model(BUILTIN_NAME))
    prompt = "Q: What is 2 + 3?\nA: The answer is "
    pair = tokenize_pair(Pair(prompt, "5", "6"), tokenizer)
    assert list(pair.prompt_ids) == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(list(pair.prompt_ids) + list(pair.chosen_ids)) == prompt + "5<|im_end|>"
    conversational = tokenize_pair(Pair(({"role": "user", "content": "Hi"},), ({"role": "assistant", "content": "Hello!"},),
                                        ({"role": "assistant", "content": "Go away."},)), tokenizer)
    assert tokenizer.decode(list(conversational.chosen_ids)) == "Hello!<|im_end|>"
    # <|im_start|> is this tokenizer's BOS: one per turn (system, user, assistant header), none added on top
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert list(conversational.prompt_ids) == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert list(conversational.prompt_ids).count(tokenizer.bos_token_id) == 3


def test_truncation_keeps_prompt_end_and_response_start(bos_tokenizer):
    pair = tokenize_pair(Pair("one two three four five six seven eight nine ten", " a b c d e f g h", " z"),
                         bos_tokenizer)
    kept, truncated, reason = truncate_pair(pair, max_length=12, max_prompt_length=6, bos_id=bos_tokenizer.bos_token_id)
    assert reason is None and truncated
    assert len(kept.prompt_ids) == 6
    assert kept.prompt_ids[0] == bos_tokenizer.bos_token_id  # BOS kept, then the prompt's end
    assert kept.prompt_ids[1:] == pair.prompt_ids[-5:]
    assert kept.chosen_ids == pair.chosen_ids[:6]  # response keeps its start (and so loses its EOS)
    assert kept.rejected_ids == pair.rejected_ids  # short enough: untouched
    assert len(kept.prompt_ids) + len(kept.chosen_ids) <= 12


def test_pairs_left_without_response_are_dropped_and_counted(tokenizer):
    pairs = [Pair("short", " yes", " no"), Pair("a much longer prompt " * 5, " yes", " no"),
             Pair("x", " same tail", " same tail but longer")]
    data = tokenize_pairs(pairs, tokenizer, max_length=8, max_prompt_length=8)
    assert sum(data.dropped.values()) == 2
    assert data.dropped.get("prompt fills max_length (no room for a response)") == 1
    assert data.dropped.get("chosen and rejected identical after truncation") == 1
    assert len(data.pairs) == 1


def test_max_length_below_two_is_an_error(tokenizer):
    with pytest.raises(ConfigError, match="max_length"):
        tokenize_pairs([Pair("a", "b", "c")], tokenizer, max_length=1)
