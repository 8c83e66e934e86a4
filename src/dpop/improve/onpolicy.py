"""One iteration's data: prompts, K sampled answers each, a verifier's marks, and the (correct, incorrect) pairs.

A verifier is a function (completion text, row) -> bool, or a float score for a reward model; `row` is the
prompt's row (its `prompt` and the other columns, e.g. `answer`). With marks, each prompt pairs its correct
answers with its incorrect ones; with scores, its best answers with its worst (different scores only). A prompt
whose answers are all right, or all wrong (all equal for scores), gives no pair and is counted.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from dpop.errors import ConfigError, DataError

Verifier = Callable[[str, dict], "bool | float"]


def builtin_verifier(completion: str, row: dict) -> bool:
    """The arithmetic task's checker: the first answer the completion states equals the row's `answer`."""
    from dpop.tasks.arithmetic import is_correct

    if "answer" not in row:
        raise DataError([f"{row.get('source', 'a prompt row')}: field 'answer': missing (the builtin verifier "
                         "compares the stated answer with it)"], header="prompts the verifier cannot mark")
    return is_correct(completion, int(row["answer"]))


def load_verifier(spec: str) -> Verifier:
    """builtin, module:function, or rm:PATH (a reward model dir: scores)."""
    if spec == "builtin":
        return builtin_verifier
    if spec.startswith("rm:"):
        from dpop.improve.reward import RewardScorer

        return RewardScorer(spec[3:])
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"verifier {spec!r}: {error}") from None
    if not callable(function):
        raise ConfigError(f"verifier {spec!r} is not a function")
    return function


@dataclass(frozen=True)
class Samples:
    texts: list[list[str]]  # per prompt, its K answers in sampling order
    seconds: float
    tokens: int  # new tokens generated over all samples

    @property
    def count(self) -> int:
        return sum(len(texts) for texts in self.texts)

    def throughput(self) -> dict[str, float]:
        return {"samples_per_s": self.count / self.seconds if self.seconds else float("nan"),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else float("nan")}


def sample_answers(model, tokenizer, prompts: list, *, samples: int, temperature: float, max_new_tokens: int,
                   batch_size: int, seed: int, stop_when=None) -> Samples:
    """`samples` answers to each prompt (text or messages, rendered as training renders them), sampled with a KV
    cache in batches of `batch_size` (the repeats of a prompt share a batch); seeded, so a rerun samples the same.

    Sampling runs in fp32, as evaluation does, never under plain bf16 autocast: a fine-tune's updates are mostly
    below half a bf16 step of its weights, so round-to-nearest bf16 computes nearly the model it started from.
    Measured on the builtin SFT model (32 steps at lr 2e-5): 80% of its weights round to the base model's bf16
    values; its greedy answer accuracy was 0.54 in fp32 and 0.08 under bf16 autocast (24 problems), and at
    temperature 0.8 it was 0.50 in fp32 and 0.08 in bf16 (docs/iterate.md)."""
    from dpop.evaluation.generate import generate_texts

    repeated = [prompt for prompt in prompts for _ in range(samples)]
    started = time.perf_counter()
    texts = generate_texts(model, tokenizer, repeated, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           temperature=temperature, seed=seed, stop_when=stop_when)
    seconds = time.perf_counter() - started
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    return Samples([texts[i * samples:(i + 1) * samples] for i in range(len(prompts))], seconds, tokens)


@dataclass(frozen=True)
class IterationPairs:
    rows: list[dict]  # preference rows: prompt, chosen, rejected and the prompt row's other columns
    judgements: list[list]  # per prompt, the verifier's mark (or score) of each answer
    all_correct: int  # prompts skipped: every answer right (or, for scores, all equal)
    all_wrong: int  # prompts skipped: every answer wrong

    @property
    def skipped_prompts(self) -> int:
        return self.all_correct + self.all_wrong


def _spread(better: list[str], worse: list[str], limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (0: all) of better × worse, spread over both lists: (0,0), (1,0), (0,1), (2,0), (1,1), ..."""
    combos = sorted(((i, j) for i in range(len(better)) for j in range(len(worse))), key=lambda ij: (sum(ij), -ij[0]))
    return [(better[i], worse[j]) for i, j in (combos[:limit] if limit else combos)]


def _answer(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, (list, tuple)) else text


def build_pairs(rows: list[dict], samples: Samples, verifier: Verifier, *, per_prompt: int) -> IterationPairs:
    """Mark every answer and pair them prompt by prompt (see the module docstring). Identical answers of a prompt
    count once. A pair row keeps its prompt row's other columns (e.g. `answer`, `id`)."""
    out, judgements, all_correct, all_wrong = [], [], 0, 0
    for row, texts in zip(rows, samples.texts):
        unique = list(dict.fromkeys(texts))
        marks = [verifier(text, row) for text in unique]
        judgements.append([marks[unique.index(text)] for text in texts])
        if all(isinstance(mark, bool) for mark in marks):
            better = [text for text, mark in zip(unique, marks) if mark]
            worse = [text for text, mark in zip(unique, marks) if not mark]
            if not worse:
                all_correct += 1
                continue
            if not better:
                all_wrong += 1
                continue
            chosen_rejected = _spread(better, worse, per_prompt)
        else:
            scored = sorted(zip(unique, map(float, marks)), key=lambda ts: -ts[1])
            if scored[0][1] == scored[-1][1]:
                all_correct += 1  # nothing to prefer
                continue
            half = len(scored) // 2
            top, bottom = scored[:max(1, half)], scored[len(scored) - max(1, half):][::-1]
            chosen_rejected = [(t, b) for (t, ts), (b, bs) in zip(top, bottom) if ts > bs][:per_prompt or None]
        extra = {key: value for key, value in row.items() if key not in ("prompt", "source")}
        for chosen, rejected in chosen_rejected:
            out.append({"prompt": row["prompt"], "chosen": _answer(row["prompt"], chosen),
                        "rejected": _answer(row["prompt"], rejected), **extra})
    return IterationPairs(out, judgements, all_correct, all_wrong)


def builtin_prompts(count: int, *, seed: int, iteration: int) -> list[dict]:
    """`count` problems of the arithmetic task's train split, different in each iteration (rows: prompt, answer,
    id)."""
    from dpop.tasks.arithmetic import make_pairs

    rows = make_pairs(count, edit="low", seed=seed * 7919 + 104729 * (iteration + 1), split="train")
    return [{key: value for key, value in row.items() if key not in ("chosen", "rejected")} for row in rows]


def file_prompts(path: str, count: int, *, seed: int, iteration: int) -> list[dict]:
    """`count` rows of a prompts file for this iteration: the rows in a seeded order, taken `count` at a time and
    cycling, so iterations see different prompts while the file lasts."""
    import random

    from dpop.data.readers import read_records

    records = read_records(path)
    problems = [f"{r.where}: {r.problem or 'no prompt field'}" for r in records.records
                if r.row is None or r.row.get("prompt") in (None, "", [])]
    if problems:
        raise DataError(problems, header=f"prompt rows without a prompt in {path}")
    rows = [{**record.row, "source": record.where} for record in records.records]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    start = iteration * count
    return [rows[order[(start + k) % len(rows)]] for k in range(count)]
