"""`dpop iterate`: the model improves on its own answers (Iterative RPO, Pang et al. 2024, with any loss).

    dpop iterate                                   # builtin task: SFT, then 3 iterations of dpop (default)
    dpop iterate --loss rpo --iterations 2         # Iterative RPO's DPO+NLL
    dpop iterate --model runs/sft/final --data prompts.jsonl --verifier mypkg.check:is_right

Iteration t (1-based; M_0 is --model, or the SFT model with --sft-steps):
  1. sample --samples K answers to each of --prompts P fresh training prompts from M_{t-1} (KV cache, seeded);
  2. mark each with the verifier; 3. pair correct with incorrect answers (--pairs-per-prompt), counting the
  prompts whose answers are all right or all wrong; 4. train M_t from M_{t-1} with M_{t-1} as the reference
  (OUT/iter-t/train, a whole run directory); 5. score greedy answers to --eval-problems held-out problems.

OUT/iter-t/ holds samples.jsonl, pairs.jsonl, train/ and iteration.json, written last: an iteration with an
iteration.json is finished, and `--resume` continues after the last finished one (an interrupted iteration is
redone from its start; sampling and training are seeded, so the loop ends where an uninterrupted one does).
OUT/summary.json holds `initial` (M_0's accuracy) and `iterations: [{iteration, pairs, skipped_prompts,
answer_accuracy, ...}]`; OUT/report.html plots accuracy per iteration and each iteration's training curves.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

from dpop.config import TrainConfig
from dpop.config.commands import IterateConfig
from dpop.errors import ConfigError

logger = logging.getLogger(__name__)

RESUMABLE = ("iterations", "resume", "overwrite")  # what may change between a run and its --resume


def _state_file(out: Path) -> Path:
    return out / "iterate.json"


def _prepare_dir(config: IterateConfig, out: Path) -> list[dict]:
    """The finished iterations' records (resume), after checking the output dir; [] for a fresh run."""
    saved = _state_file(out)
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    if saved.exists() and not config.resume:
        raise ConfigError(f"{out} holds a dpop iterate run: --resume continues it, --overwrite starts over")
    if not saved.exists():
        if config.resume:
            logger.warning("dpop: %s has no iterate run to resume; starting at iteration 1", out)
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(asdict(config), indent=1))
        return []
    before = json.loads(saved.read_text())
    changed = [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in asdict(config).items()
               if key not in RESUMABLE and before.get(key) != value]
    if changed:
        raise ConfigError("--resume with settings that change the loop: " + "; ".join(changed))
    saved.write_text(json.dumps(asdict(config), indent=1))
    records = []
    for t in range(1, config.iterations + 1):
        done = out / f"iter-{t}" / "iteration.json"
        if not done.exists():
            break
        records.append(json.loads(done.read_text()))
    return records


def _base_train_config(config: IterateConfig) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    shared = {f.name: getattr(config, f.name) for f in fields(IterateConfig) if f.name in names}
    for key in ("data", "model", "output_dir", "resume", "overwrite"):
        shared.pop(key, None)
    return TrainConfig(**shared, max_length=256, max_prompt_length=128, overwrite=True, log_every=1, save_every=0,
                       eval_every=0)


def _sft(config: IterateConfig, out: Path) -> str:
    """M_0: --model, or --model after SFT on the builtin task's sft split (kept in OUT/sft)."""
    steps = config.sft_steps if config.sft_steps is not None else (32 if config.data is None else 0)
    if not steps:
        return config.model
    final = out / "sft" / "final"
    if (out / "sft" / "summary.json").exists():
        return str(final)
    from dpop.training.loop import train

    logger.info("dpop: SFT of %s on the builtin task's chosen answers (%d steps)", config.model, steps)
    base = _base_train_config(config)
    train(replace(base, loss="sft", loss_weights=None, model=config.model, task_split="sft",
                  task_pairs=steps * config.batch_size, max_steps=steps, learning_rate=2e-5,
                  warmup_steps=max(1, steps // 10), output_dir=str(out / "sft")))
    return str(final)


def _accuracy(model, tokenizer, config: IterateConfig) -> dict:
    """Greedy answer accuracy on the held-out problems, with a Wilson 95% interval."""
    from dpop.data import pairs_from_rows
    from dpop.evaluation.evaluate import answer_accuracy
    from dpop.reporting.report import wilson_interval
    from dpop.tasks.arithmetic import make_pairs

    if not config.eval_problems:
        return {"answer_accuracy": None, "answer_correct": None, "answer_total": 0}
    pairs = pairs_from_rows(make_pairs(config.eval_problems, edit="low", seed=config.seed, split="eval")).pairs
    accuracy, total = answer_accuracy(model, tokenizer, pairs, batch_size=config.batch_generate,
                                      max_new_tokens=config.max_new_tokens)
    correct = round(accuracy * total)
    low, high = wilson_interval(correct, total)
    return {"answer_accuracy": accuracy, "answer_correct": correct, "answer_total": total,
            "interval_95": [low, high]}


def _write_jsonl(path: Path, rows) -> None:
    from dpop.reporting.report import write_atomic

    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _iteration(config: IterateConfig, t: int, model_path: str, out: Path, verifier) -> dict:
    from dpop.improve.onpolicy import build_pairs, builtin_prompts, file_prompts, sample_answers
    from dpop.models import load_model
    from dpop.reporting.report import write_atomic
    from dpop.tasks.arithmetic import states_answer
    from dpop.training.loop import train

    started = time.perf_counter()
    folder = out / f"iter-{t}"
    folder.mkdir(parents=True, exist_ok=True)
    rows = (builtin_prompts(config.prompts, seed=config.seed, iteration=t - 1) if config.data is None
            else file_prompts(config.data, config.prompts, seed=config.seed, iteration=t - 1))
    model, tokenizer = load_model(model_path)
    samples = sample_answers(model, tokenizer, [row["prompt"] for row in rows], samples=config.samples,
                             temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                             batch_size=config.batch_generate, seed=config.seed * 1000 + t,
                             stop_when=states_answer if config.verifier == "builtin" else None)
    pairs = build_pairs(rows, samples, verifier, per_prompt=config.pairs_per_prompt)
    _write_jsonl(folder / "samples.jsonl", ({"prompt_index": i, "sample": k, "text": text, "mark": mark}
                                            for i, (texts, marks) in enumerate(zip(samples.texts, pairs.judgements))
                                            for k, (text, mark) in enumerate(zip(texts, marks))))
    _write_jsonl(folder / "pairs.jsonl", pairs.rows)
    throughput = samples.throughput()
    marks = [mark for marks in pairs.judgements for mark in marks]
    logger.info("dpop: iteration %d: %d samples in %.1f s (%.2f samples/s, %.0f tokens/s); %d pairs, %d prompts "
                "skipped (%d all right, %d all wrong)", t, samples.count, samples.seconds,
                throughput["samples_per_s"], throughput["tokens_per_s"], len(pairs.rows), pairs.skipped_prompts,
                pairs.all_correct, pairs.all_wrong)
    record = {"iteration": t, "model": model_path, "pairs": len(pairs.rows), "skipped_prompts": pairs.skipped_prompts,
              "all_correct_prompts": pairs.all_correct, "all_wrong_prompts": pairs.all_wrong,
              "prompts": len(rows), "samples": samples.count,
              "sample_accuracy": (sum(1 for m in marks if m is True) / len(marks)
                                  if marks and all(isinstance(m, bool) for m in marks) else None),
              "sampling_seconds": samples.seconds, **throughput}
    if pairs.rows:
        base = _base_train_config(config)
        result = train(replace(base, model=model_path, data=str(folder / "pairs.jsonl"),
                               output_dir=str(folder / "train"), seed=config.seed + t,
                               warmup_steps=0))  # the reference is the initial policy: M_{t-1}
        model, next_model = result.model, str(result.final_model)
        record["train"] = {key: result.summary["train"].get(key) for key in
                           ("loss", "rewards/margins", "logps/chosen_delta", "logps/chosen", "logps/rejected")}
        record["steps"] = result.summary["steps"]
    else:
        logger.warning("dpop: iteration %d: no pairs (every prompt all right or all wrong): M_%d = M_%d", t, t, t - 1)
        next_model = model_path
    record["next_model"] = next_model
    record.update(_accuracy(model, tokenizer, config))
    record["minutes"] = round((time.perf_counter() - started) / 60, 2)
    write_atomic(folder / "iteration.json", json.dumps(record, indent=1))  # last: the iteration is finished
    return record


def run_iterate(config: IterateConfig) -> dict:
    """The whole loop (see the module docstring); returns the summary also written to OUT/summary.json."""
    from dpop.improve.onpolicy import load_verifier
    from dpop.models import load_model

    out = Path(config.output_dir)
    records = _prepare_dir(config, out)
    verifier = load_verifier(config.verifier)
    started = time.perf_counter()
    start_model = _sft(config, out)
    initial_file = out / "initial.json"
    if initial_file.exists():
        initial = json.loads(initial_file.read_text())
    else:
        model, tokenizer = load_model(start_model)
        initial = {"model": start_model, **_accuracy(model, tokenizer, config)}
        initial_file.write_text(json.dumps(initial, indent=1))
    logger.info("dpop: M_0 %s: %s", start_model, _describe(initial))
    if records:
        logger.info("dpop: resuming after iteration %d", len(records))
    model_path = records[-1]["next_model"] if records else start_model
    for t in range(len(records) + 1, config.iterations + 1):
        record = _iteration(config, t, model_path, out, verifier)
        logger.info("dpop: iteration %d: %s", t, _describe(record))
        records.append(record)
        model_path = record["next_model"]
    summary = {"initial": initial, "iterations": records, "final_model": model_path,
               "minutes_this_call": round((time.perf_counter() - started) / 60, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from dpop.reporting.iterate_report import write_iterate_report

    report = write_iterate_report(out, summary)
    print(format_table(summary))
    print(f"\nreport: {report}\nsummary: {out / 'summary.json'}")
    return summary


def _describe(record: dict) -> str:
    if record.get("answer_accuracy") is None:
        return "no evaluation"
    low, high = record["interval_95"]
    return (f"answer accuracy {record['answer_accuracy']:.3f} ({record['answer_correct']}/{record['answer_total']}, "
            f"95% {low:.3f}–{high:.3f})")


def format_table(summary: dict) -> str:
    lines = [f"{'model':<8} {'pairs':>6} {'skipped':>8} {'samples/s':>10} {'accuracy':>9}  95% interval"]
    entries = [("M_0", summary["initial"])] + [(f"M_{r['iteration']}", r) for r in summary["iterations"]]
    for name, record in entries:
        accuracy = record.get("answer_accuracy")
        interval = "–".join(f"{v:.3f}" for v in record["interval_95"]) if accuracy is not None else "n/a"
        rate = record.get("samples_per_s")
        lines.append(f"{name:<8} {record.get('pairs', '-')!s:>6} {record.get('skipped_prompts', '-')!s:>8} "
                     f"{(f'{rate:.2f}' if isinstance(rate, float) and math.isfinite(rate) else '-'):>10} "
                     f"{(f'{accuracy:.3f}' if accuracy is not None else 'n/a'):>9}  {interval}")
    return "\n".join(lines)
