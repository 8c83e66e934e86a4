"""Preference pairs -> token ids: prompt ids, chosen ids, rejected ids.

Rules (DESIGN.md §5):
- Conversational pairs go through the tokenizer's chat template (prompt rendered with the generation
  prompt; each response is what the template adds after it, so it ends with the template's end-of-turn).
  Plain-text pairs are used as they are.
- The prompt and each response are tokenised SEPARATELY and concatenated, so a response's first token can
  never merge with the prompt's last (a prompt ending in a space, or mid-word, keeps its own tokens; the
  model sees exactly what it will see at generation time, when the prompt is tokenised alone).
- Every response ends with EOS (the template's end-of-turn when it is EOS; anything the template prints
  after it, such as a newline, is dropped). A response truncated by max_length loses its EOS, as it should.
- BOS appears once: text rendered by a chat template already carries it, so it is not added again.
- Truncation: the prompt keeps its END within max_prompt_length (keeping a leading BOS), the responses keep
  their START within max_length - len(prompt). A pair left with an empty response is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dpop.errors import ConfigError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    source: str = ""
    metadata: dict = field(default_factory=dict, compare=False)
    desirable: bool | None = None  # an unpaired row's label (KTO): chosen = its completion, rejected = a KL completion

    @property
    def num_tokens(self) -> int:
        """Tokens in the plain layout: prompt twice (once per response) plus both responses."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class TokenizedData:
    pairs: list[TokenizedPair]
    dropped: dict[str, int]  # reason -> count
    truncated: int  # pairs kept but cut by max_prompt_length / max_length


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple))


def _encode_text(tokenizer, text: str, *, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # the text already began with BOS and the tokenizer added another
    return list(ids)


def _end_with_eos(ids: list[int], eos_id: int) -> list[int]:
    """Cut what a template prints after the last EOS (e.g. a newline), or append EOS when there is none."""
    if eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(eos_id)
        return ids[: last + 1]
    return ids + [eos_id]


def render_prompt(tokenizer, prompt) -> tuple[str, bool]:
    """The prompt as text, and whether that text came from a chat template (so it has its own specials)."""
    if _is_messages(prompt):
        if not getattr(tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant: "
            return text, False
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True), True
    return prompt, False


def _response_ids(tokenizer, prompt, prompt_text: str, response) -> list[int]:
    eos = tokenizer.eos_token_id
    if not _is_messages(response):
        return _end_with_eos(_encode_text(tokenizer, response, special=False), eos)
    if _is_messages(prompt) and getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
        if full.startswith(prompt_text):
            return _end_with_eos(_encode_text(tokenizer, full[len(prompt_text):], special=False), eos)
    # No template, or a template that rewrites earlier turns: the assistant text itself, then EOS.
    text = "".join(m["content"] for m in response)
    return _end_with_eos(_encode_text(tokenizer, text, special=False), eos)


def tokenize_pair(pair, tokenizer) -> TokenizedPair:
    """Untruncated ids for one PreferencePair (anything with prompt/chosen/rejected/source)."""
    prompt_text, templated = render_prompt(tokenizer, pair.prompt)
    prompt_ids = _encode_text(tokenizer, prompt_text, special=not templated)
    return TokenizedPair(
        prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(_response_ids(tokenizer, pair.prompt, prompt_text, pair.chosen)),
        rejected_ids=tuple(_response_ids(tokenizer, pair.prompt, prompt_text, pair.rejected)),
        source=getattr(pair, "source", ""),
        metadata=dict(getattr(pair, "metadata", {}) or {}),
        desirable=getattr(pair, "desirable", None),
    )


def truncate_pair(pair: TokenizedPair, *, max_length: int, max_prompt_length: int | None,
                  bos_id: int | None = None) -> tuple[TokenizedPair | None, bool, str | None]:
    """Apply the truncation rules. Returns (pair or None, was_truncated, drop_reason)."""
    prompt = list(pair.prompt_ids)
    limit = min(max_prompt_length or max_length, max_length)
    truncated = False
    if len(prompt) > limit:
        truncated = True
        keep_bos = bos_id is not None and prompt and prompt[0] == bos_id and limit > 1
        prompt = ([bos_id] + prompt[-(limit - 1):]) if keep_bos else prompt[-limit:]
    room = max_length - len(prompt)
    if room <= 0:
        return None, truncated, "prompt fills max_length (no room for a response)"
    chosen, rejected = list(pair.chosen_ids[:room]), list(pair.rejected_ids[:room])
    truncated = truncated or len(chosen) < len(pair.chosen_ids) or len(rejected) < len(pair.rejected_ids)
    if not chosen or not rejected:
        return None, truncated, "empty response after tokenization"
    if chosen == rejected and pair.desirable is None:  # an unpaired row's KL completion may equal its own
        return None, truncated, "chosen and rejected identical after truncation"
    kept = TokenizedPair(tuple(prompt), tuple(chosen), tuple(rejected), pair.source, pair.metadata, pair.desirable)
    return kept, truncated, None


def tokenize_pairs(pairs, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                   progress: bool = False) -> TokenizedData:
    """Tokenise and truncate every pair; dropped pairs are counted by reason, never silently."""
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; set one (tokenizer.eos_token) before training")
    kept, dropped, truncated = [], Counter(), 0
    iterator = pairs
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(pairs, desc="tokenizing", unit="pair", leave=False)
    for pair in iterator:
        result, was_truncated, reason = truncate_pair(
            tokenize_pair(pair, tokenizer), max_length=max_length, max_prompt_length=max_prompt_length,
            bos_id=tokenizer.bos_token_id)
        truncated += bool(was_truncated and result is not None)
        if result is None:
            dropped[reason] += 1
        else:
            kept.append(result)
    return TokenizedData(kept, dict(dropped), truncated)
