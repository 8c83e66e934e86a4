"""Evaluation on preference pairs: the training loop's held-out evaluation, `dpop eval`, and the demo's
`evaluate_model`. One scoring routine serves all three (no grad, the same log-prob routine as training).

    dpop eval --model runs/dpop/final --ref-model runs/sft/final --data eval.jsonl --out eval.json

Metrics, over all pairs (DESIGN.md §6 names where they exist):
- `pair_accuracy`: fraction of pairs with log πθ(y_w|x) > log πθ(y_l|x) (the policy itself prefers y_w).
- `rewards/accuracies`: fraction with β(lw − rw) > β(ll − rl) (implicit-reward accuracy; needs a reference).
- `logps/chosen`, `logps/rejected` (and `logps/ref_*`): mean response log-prob sums.
- `logps/chosen_delta`: mean lw − rw, negative when the policy finds y_w less likely than the reference does.
- `tokens/divergent_chosen_logp`: mean per-token log-prob of y_w after its first token that differs from y_l.
- `answer_accuracy`: for rows whose metadata carries an integer `answer` (the builtin task's rows do), the
  fraction of greedy generations whose stated answer is right (`dpop.tasks.arithmetic.is_correct`).
Values that cannot be computed (no reference, no answer rows) are None.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from dpop.config import TrainConfig
from dpop.errors import ConfigError
from dpop.scoring.pairs import autocast_for, pair_metrics, score_pairs
from dpop.scoring.reference import OwnReference, _memoized

BUILTIN_EVAL_PROBLEMS = 200


def _as_answer(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def answer_accuracy(model, tokenizer, pairs, *, batch_size: int, max_new_tokens: int,
                    progress: bool = False) -> tuple[float | None, int]:
    """(accuracy, rows scored) of greedy generations over pairs whose metadata has an integer `answer`.
    A row stops at EOS, at max_new_tokens, or once it has stated an answer ("The answer is 13." then a
    newline or space): what it states first is what is scored, and a batch is not held up by rows that
    keep talking after answering."""
    from dpop.evaluation.generate import generate_texts
    from dpop.tasks.arithmetic import is_correct, states_answer

    answered = [(pair, _as_answer(pair.metadata.get("answer"))) for pair in pairs if pair.metadata]
    answered = [(pair, answer) for pair, answer in answered if answer is not None]
    if not answered:
        return None, 0
    texts = generate_texts(model, tokenizer, [pair.prompt for pair, _ in answered], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress, stop_when=states_answer)
    correct = sum(is_correct(text, answer) for text, (_, answer) in zip(texts, answered))
    return correct / len(answered), len(answered)


def evaluate_model(model, tokenizer, pairs, *, ref_model=None, beta: float = TrainConfig.beta, batch_size: int = 16,
                   max_length: int = TrainConfig.max_length, max_prompt_length: int | None = None,
                   generate: bool = True, max_new_tokens: int = 128, precision: str = "fp32",
                   layout: str = TrainConfig.layout, chunk_tokens: int = TrainConfig.chunk_tokens,
                   progress: bool = False, ref_memo: dict | None = None) -> dict:
    """Evaluate `model` on preference `pairs` (PreferencePairs, or row dicts as `dpop data make` writes them).

    Returns a dict: pair_accuracy, rewards/accuracies, rewards/chosen, rewards/rejected, rewards/margins,
    logps/chosen, logps/rejected, logps/ref_chosen, logps/ref_rejected, logps/chosen_delta,
    tokens/divergent_chosen_logp, answer_accuracy, num_pairs, num_answer_rows, dropped_pairs (see the
    module docstring); None where a value cannot be computed (the reward keys without `ref_model`).
    `ref_model` must share the tokenizer (e.g. the SFT model a run started from). `precision`: fp32, bf16
    (autocast; on CPU with fp32 attention while scoring: dpop.precision), bf16-sr (autocast
    over the weights with bf16-sr's dither, taken off again after scoring) or auto. Generation runs in fp32.
    `ref_memo`: a dict shared by calls that score the same `pairs` against the same `ref_model` with the
    same settings, so each batch's reference log-probs are computed once (the demo scores three models
    against one SFT reference).
    """
    from dpop.config import resolve_precision
    from dpop.data import pairs_from_rows
    from dpop.data.tokenize import tokenize_pairs
    from dpop.precision import fp32_attention_scope, prepare_model, restore_sdpa

    pairs = list(pairs)
    if pairs and isinstance(pairs[0], dict):
        pairs = pairs_from_rows(pairs, name="eval rows").pairs
    data = tokenize_pairs(pairs, tokenizer, max_length=max_length,
                          max_prompt_length=max_prompt_length or max_length // 2)
    if not data.pairs:
        raise ConfigError(f"eval: no pairs left after tokenization with max_length {max_length}")
    device = next(model.parameters()).device
    precision = resolve_precision(precision)
    models = [each for each in (model, ref_model) if each is not None]
    with fp32_attention_scope():  # the models and transformers' registry are left as they were found
        try:
            for each in models:  # the arithmetic training used (bf16 on CPU: fp32 attention)
                prepare_model(each, precision, device)
            stats = _score(model, data, ref_model, tokenizer, precision=precision, beta=beta, batch_size=batch_size,
                           layout=layout, max_length=max_length, chunk_tokens=chunk_tokens, ref_memo=ref_memo)
        finally:
            for each in models:
                restore_sdpa(each)
    metrics = pair_metrics(stats)
    keys = ("pair_accuracy", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "logps/chosen_delta",
            "tokens/divergent_chosen_logp")
    results = {key: _finite_or_none(metrics[key]) for key in keys}
    accuracy, answered = (answer_accuracy(model, tokenizer, pairs, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens, progress=progress)
                          if generate else (None, 0))
    results.update({"answer_accuracy": accuracy, "num_pairs": len(data.pairs), "num_answer_rows": answered,
                    "dropped_pairs": sum(data.dropped.values())})
    return results


def _score(model, data, ref_model, tokenizer, *, precision: str, beta: float, batch_size: int, layout: str,
           max_length: int, chunk_tokens: int, ref_memo: dict | None):
    from dpop.precision import scoring_weights
    from dpop.scoring.reference import LiveReference

    autocast = autocast_for(precision, next(model.parameters()).device)
    if ref_model is None:
        reference = None
    elif ref_model is model and not hasattr(model, "disable_adapter"):  # no second forward of the same model
        reference = OwnReference(ref_memo if ref_memo is not None else {})
    else:
        reference = LiveReference(ref_model, autocast, disable_adapters=hasattr(ref_model, "disable_adapter"),
                                  chunk_tokens=chunk_tokens)
        if ref_memo is not None:
            reference = _memoized(reference, ref_memo)
    with scoring_weights((model, ref_model), precision):  # bf16-sr: stochastic rounding, as training computes
        return score_pairs(model, data.pairs, batch_size=batch_size, autocast=autocast, reference=reference,
                           beta=beta, layout=dict(layout=layout, pad_id=tokenizer.pad_token_id, pack_length=max_length),
                           chunk_tokens=chunk_tokens)


def _finite_or_none(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def _eval_pairs(data: str | None, columns: str | None = None) -> tuple[list, str]:
    from dpop.config import parse_columns
    from dpop.data import load_pairs, pairs_from_rows
    from dpop.tasks.arithmetic import make_pairs

    if data:
        loaded = load_pairs(data, columns=parse_columns(columns))
        return loaded.pairs, str(data)
    rows = make_pairs(BUILTIN_EVAL_PROBLEMS, edit="low", seed=0, split="eval")
    return pairs_from_rows(rows, name="arithmetic-low-eval").pairs, f"builtin arithmetic eval split ({len(rows)} pairs)"


def run_eval(args) -> int:
    """`dpop eval` (args: a dpop.config.commands.EvalConfig): validate the data, load the model(s), evaluate,
    print a table, optionally write JSON."""
    from dpop.config import resolve_precision
    from dpop.models import load_model
    from dpop.scoring.reference import check_same_tokenizer

    pairs, description = _eval_pairs(args.data, args.columns)  # every row checked before a model is loaded
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    ref_model = None
    if args.ref_model:
        ref_model, ref_tokenizer = load_model(args.ref_model, trust_remote_code=args.trust_remote_code)
        check_same_tokenizer(tokenizer, ref_tokenizer, args.ref_model)
    precision = resolve_precision(args.precision)
    results = evaluate_model(model, tokenizer, pairs, ref_model=ref_model, beta=args.beta,
                             batch_size=args.batch_size, max_length=args.max_length, generate=args.generate,
                             max_new_tokens=args.max_new_tokens, precision=precision, layout=args.layout,
                             chunk_tokens=args.chunk_tokens, progress=True)
    results = {"model": args.model, "ref_model": args.ref_model, "data": description,
               "precision": precision, "beta": args.beta, **results}
    print(format_table(results))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return 0


def format_table(results: dict) -> str:
    """Two aligned columns, numbers to 4 decimals, '-' for values that do not exist."""
    width = max(len(key) for key in results)
    lines = []
    for key, value in results.items():
        shown = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)
