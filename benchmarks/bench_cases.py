"""The benchmark's workloads: which pairs, how long, what batch; both engines build the same rows from this.

Every case starts from the builtin arithmetic task (low edit distance, train split, seed 0) and is given to
both engines as the same conversational rows, so each sees the same ChatML text through the tokenizer's chat
template. dpop reads the rows from a file in their order and shuffles them with its seed; TRL gets them
already in dpop's first-epoch order (`in_dpop_order`) and reads them sequentially, so in each step both
engines train on the same pairs.

Long sequences are made from the same problems: the prompt is preceded by other problems with their
worked solutions until it reaches `prompt_tokens`, and each response is followed by the same filler (more
worked solutions) until it reaches `response_tokens`. Chosen and rejected keep their one-digit difference at
the start and share the filler, so a long pair is still a low-edit pair. Lengths are reached whole lines at
a time, so a long prompt or response ends within a line of its target and never above it (unless the
problem's own text is already longer).

    case = make_case("long")
    rows = build_rows(case, tokenizer, num_pairs=case.batch_size * 4)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

TASK_SEED = 0  # the builtin pairs' seed, and dpop's data-order seed


@dataclass(frozen=True)
class Case:
    """One workload. `prompt_tokens` / `response_tokens` None = the task's natural lengths."""

    name: str
    batch_size: int
    max_length: int  # tokens of prompt + one response; both engines truncate to it
    prompt_tokens: int | None = None
    response_tokens: int | None = None
    max_prompt_length: int | None = None  # dpop's prompt limit (TRL 1.16 has none; rows never reach it)

    def describe(self) -> str:
        prompt = f"prompt ~{self.prompt_tokens}" if self.prompt_tokens else "natural prompt"
        response = f"responses ~{self.response_tokens}" if self.response_tokens else "natural responses"
        return f"batch {self.batch_size}, {prompt}, {response}, max_length {self.max_length}"


# The workloads: the bench workload (builtin pairs, batch 8, max_length 256) and the long one.
CASES = {
    "bench": Case("bench", batch_size=8, max_length=256),
    "long": Case("long", batch_size=2, max_length=1100, prompt_tokens=512, response_tokens=512,
                 max_prompt_length=560),
}


def scaling_case(response_tokens: int, batch_size: int) -> Case:
    """A point of dpop's scaling table: natural prompt (~65 tokens), responses of ~`response_tokens`."""
    return Case(f"scale-r{response_tokens}-b{batch_size}", batch_size=batch_size,
                max_length=response_tokens + 160, response_tokens=response_tokens, max_prompt_length=150)


def make_case(name: str, batch_size: int | None = None) -> Case:
    """A case by name: 'bench', 'long', 'curve' (the bench workload, for the bf16/fp32 loss curves) or
    'scale-r<response tokens>-b<batch>'."""
    match = re.fullmatch(r"scale-r(\d+)-b(\d+)", name)
    if match:
        case = scaling_case(int(match.group(1)), int(match.group(2)))
    elif name == "curve":
        case = replace(CASES["bench"], name="curve")
    elif name in CASES:
        case = CASES[name]
    else:
        raise SystemExit(f"unknown case {name!r}: expected bench, long, curve or scale-r<N>-b<B>")
    return replace(case, batch_size=batch_size) if batch_size else case


# --- rows -----------------------------------------------------------------------------------------------

def _text(messages) -> str:
    return messages[0]["content"]


def _prompt_length(tokenizer, content: str) -> int:
    messages = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    return len(tokenizer(content)["input_ids"])


def _response_length(tokenizer, content: str) -> int:
    return len(tokenizer(content, add_special_tokens=False)["input_ids"]) + 1  # + the end-of-turn token


def _grow(base: str, lines: list[str], target: int, measure, *, before: bool) -> str:
    """`base` with whole `lines` added (before or after it) while the measured length stays <= target."""
    text, used = base, 0
    while used < len(lines):
        candidate = (lines[used] + "\n" + text) if before else (text + "\n" + lines[used])
        if measure(candidate) > target:
            break
        text, used = candidate, used + 1
    return text


def _filler_lines(others: list[dict], *, with_questions: bool) -> list[str]:
    lines = []
    for row in others:
        if with_questions:
            lines.append("Example: " + _text(row["prompt"]))
        lines.extend(_text(row["chosen"]).splitlines())
    return lines


def build_rows(case: Case, tokenizer, num_pairs: int) -> list[dict]:
    """`num_pairs` conversational rows (prompt/chosen/rejected message lists) for `case`, in file order.
    The same call gives the same rows in every process."""
    from dpop.tasks.arithmetic import make_pairs

    base = make_pairs(num_pairs, edit="low", seed=TASK_SEED, split="train")
    spare = make_pairs(num_pairs + 64, edit="low", seed=TASK_SEED + 1, split="train")  # filler material
    rows = []
    for index, row in enumerate(base):
        others = spare[index:index + 64]
        question, chosen, rejected = _text(row["prompt"]), _text(row["chosen"]), _text(row["rejected"])
        if case.prompt_tokens:
            examples = _filler_lines(others, with_questions=True)
            question = _grow(question, examples[::-1], case.prompt_tokens,
                             lambda text: _prompt_length(tokenizer, text), before=True)
        if case.response_tokens:
            filler = _filler_lines(others[::-1], with_questions=False)
            budget = case.response_tokens - (_response_length(tokenizer, chosen) - 1)
            tail = _grow("", filler, budget, lambda text: _response_length(tokenizer, text), before=False)
            chosen, rejected = chosen + tail, rejected + tail
        rows.append({"prompt": [{"role": "user", "content": question}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def in_dpop_order(rows: list[dict]) -> list[dict]:
    """The rows as dpop's data stream visits them in its first epoch (seed TASK_SEED): consecutive slices
    of `batch_size` are dpop's micro-batches."""
    from dpop.data.order import epoch_order

    return [rows[i] for i in epoch_order(len(rows), TASK_SEED, 0)]
