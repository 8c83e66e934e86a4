"""`dpop demo`: the DPOP paper's finding, reproduced on the builtin model and task, with a report.

    dpop demo --quick            # ~3 minutes on 2 cores: low-edit case only, fewer steps
    dpop demo --out runs/demo    # ~12.5 minutes: low-edit and high-edit cases (make demo)

Stages: (1) make the data (disjoint sft / train / eval problem splits); (2) SFT on chosen answers of the
sft split, to teach the answer format; (3) from the SFT model as policy and reference, a dpo run and a
dpop run on the same pairs with the same seed, batch and learning rate; (4) evaluate SFT, DPO and DPOP on
held-out problems; the full mode repeats (3)-(4) on high-edit-distance pairs, the contrast case. Then
summary.json, report.html with plots and a reading of the numbers, and a table in the terminal.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

from dpop.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoPlan:
    cases: tuple[str, ...]  # "low", "high"
    sft_pairs: int
    sft_steps: int
    pairs: int  # preference pairs per case
    steps: int  # preference steps per run
    eval_problems: int
    batch_size: int = 8
    sft_learning_rate: float = 2e-5
    learning_rate: float = 5e-6
    beta: float = TrainConfig.beta  # the DPOP paper's β and (None: dpop's own default) λ
    dpop_lambda: float | None = None
    max_new_tokens: int = 72  # the task's longest solution is 61 tokens; rows also stop once they answer
    group_by_length: bool = False  # pairs of similar length share a step: 1% padding instead of ~14%


# Every preference run sees each of its pairs once (pairs = steps x batch). FULL: 12.5 min on 2 idle CPU cores (bf16-sr).
# QUICK must fit in 3 minutes, so it has 16 steps of 6 pairs against FULL's 40 of 8. At FULL's learning rate,
# 20 steps of 6 were too little training for the finding: the DPO run's held-out chosen delta ended at -0.42
# (seed 0), and at +0.47, +1.48, +0.47 (seeds 0-2) after a 12-step SFT. At 1e-5 (lr x steps near FULL's) it
# shows in seeds 0-2; length-grouped batches cut the padding. Measured in bf16-sr: 3.0-3.2 min in one session,
# 2.5-2.6 min for the same training earlier in it (docs/performance.md). The lr was chosen under the old
# tie-laden weights; the finding still shows in bf16-sr and in fp32 (seed 0), re-checked in issue 14.
QUICK = DemoPlan(cases=("low",), sft_pairs=96, sft_steps=16, pairs=96, steps=16, eval_problems=24, batch_size=6,
                 learning_rate=1e-5, group_by_length=True)
FULL = DemoPlan(cases=("low", "high"), sft_pairs=256, sft_steps=32, pairs=320, steps=40, eval_problems=64)
CASE_KEYS = {"low": "low_edit", "high": "high_edit"}
STRIP_PAIRS = 3  # held-out pairs per case whose tokens the report draws


def _stage(number: int, total: int, text: str) -> None:
    logger.info(f"\n[{number}/{total}] {text}")


def _write_data(out: Path, plan: DemoPlan, seed: int) -> dict[str, Path]:
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = {"sft": write_jsonl(make_pairs(plan.sft_pairs, edit="low", seed=seed, split="sft"), data / "sft.jsonl")}
    for case in plan.cases:
        files[f"{case}_train"] = write_jsonl(make_pairs(plan.pairs, edit=case, seed=seed, split="train"),
                                             data / f"{case}_train.jsonl")
        files[f"{case}_eval"] = write_jsonl(make_pairs(plan.eval_problems, edit=case, seed=seed, split="eval"),
                                            data / f"{case}_eval.jsonl")
    return files


def _base_config(plan: DemoPlan, seed: int) -> TrainConfig:
    return TrainConfig(batch_size=plan.batch_size, seed=seed, beta=plan.beta, dpop_lambda=plan.dpop_lambda,
                       max_length=256, max_prompt_length=128, precision="auto", overwrite=True,
                       group_by_length=plan.group_by_length,
                       log_every=1, save_every=0, eval_every=0)


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, seed: int = 0, model: str | None = None,
             plan: DemoPlan | None = None) -> dict:
    """Run every stage; returns the summary also written to OUT/summary.json. `model` and `plan` exist for
    tests (a tiny model, a few steps); the demo itself is the builtin model with QUICK or FULL."""
    from dpop.losses import loss_option_defaults
    from dpop.training.loop import train

    plan = plan or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    total = 3 + len(plan.cases)
    base = _base_config(plan, seed)
    if model is not None:
        base = replace(base, model=model)
    _stage(1, total, f"data: {plan.sft_pairs} SFT problems, {plan.pairs} pairs per case "
                     f"({', '.join(c + '-edit' for c in plan.cases)}), {plan.eval_problems} held-out problems")
    files = _write_data(out, plan, seed)
    _stage(2, total, f"SFT on chosen answers ({plan.sft_steps} steps, lr {plan.sft_learning_rate:g})")
    train(replace(base, loss="sft", data=str(files["sft"]), output_dir=str(out / "sft"), max_steps=plan.sft_steps,
                  learning_rate=plan.sft_learning_rate, warmup_steps=max(1, plan.sft_steps // 10)))
    sft_model = str(out / "sft" / "final")
    runs = {}
    for i, case in enumerate(plan.cases):
        _stage(3 + i, total, f"{case}-edit pairs: dpo and dpop from the SFT model ({plan.steps} steps each, "
                             f"β {plan.beta}, λ {loss_option_defaults()['dpop_lambda'] if base.dpop_lambda is None else base.dpop_lambda:g}, lr {plan.learning_rate:g})")
        for loss in ("dpo", "dpop"):
            run_dir = out / f"{case}_edit" / loss
            train(replace(base, loss=loss, model=sft_model, data=str(files[f"{case}_train"]),
                          # the held-out pairs are scored once, in the last stage, not also by the run
                          eval_data=None, output_dir=str(run_dir),
                          max_steps=plan.steps,
                          learning_rate=plan.learning_rate, warmup_steps=max(1, plan.steps // 10)))
            runs[(case, loss)] = run_dir
    _stage(total, total, "evaluation on held-out problems: answers (greedy) and pair log-probs")
    summary, strips = _evaluate_all(out, plan, files, sft_model, runs)
    (out / "token_changes.json").write_text(json.dumps(strips))
    summary["meta"] = {"quick": quick, "seed": seed, "plan": plan.__dict__ | {"cases": list(plan.cases)},
                       "minutes": round((time.perf_counter() - started) / 60, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    from dpop.reporting.demo_report import write_demo_report

    report = write_demo_report(out, summary, runs, strips)
    print(format_table(summary))
    print(f"\nreport: {report}\nsummary: {out / 'summary.json'}  ({summary['meta']['minutes']} min)")
    return summary


def _evaluate_all(out: Path, plan: DemoPlan, files: dict, sft_model: str, runs: dict) -> tuple[dict, dict]:
    """(summary by case, token strips by case: the first STRIP_PAIRS held-out pairs' per-token changes). Each
    trained model's entry also holds `chosen_change`, the chosen responses' mean change read four ways
    (dpop.scoring.displacement.READINGS: summed, per token, shared tokens, after the first difference)."""
    from dpop.analysis.displacement import mean_chosen_changes, token_changes
    from dpop.data import load_pairs
    from dpop.evaluation.evaluate import evaluate_model
    from dpop.models import load_model

    reference, tokenizer = load_model(sft_model)
    summary, strips = {}, {}
    sft_answers = None  # the SFT model's answers are the same for every case: the problems are the same
    for case in plan.cases:
        pairs = load_pairs(files[f"{case}_eval"]).pairs
        # ref_memo: the SFT reference's log-probs of these pairs, computed once for the three models
        score = functools.partial(evaluate_model, tokenizer=tokenizer, pairs=pairs, ref_model=reference,
                                  beta=plan.beta, batch_size=64, max_length=256, max_prompt_length=128,
                                  max_new_tokens=plan.max_new_tokens, precision="auto", progress=True, ref_memo={})

        sft = score(reference, generate=sft_answers is None)
        sft_answers = sft_answers or (sft["answer_accuracy"], sft["num_answer_rows"])
        sft["answer_accuracy"], sft["num_answer_rows"] = sft_answers
        results = {"sft": _summary_entry(sft)}
        trained = {loss: load_model(str(runs[(case, loss)] / "final"))[0] for loss in ("dpo", "dpop")}
        for loss, model in trained.items():
            results[loss] = _summary_entry(score(model))
        entries = token_changes(reference, trained, tokenizer, pairs)  # every pair's tokens, in fp32
        for loss in trained:
            results[loss]["chosen_change"] = mean_chosen_changes(entries, loss)
        summary[CASE_KEYS[case]] = results
        strips[CASE_KEYS[case]] = entries[:STRIP_PAIRS]
    return summary, strips


def _summary_entry(metrics: dict) -> dict:
    n = metrics["num_answer_rows"]
    accuracy = metrics["answer_accuracy"]
    return {"answer_accuracy": accuracy, "answer_correct": round(accuracy * n) if accuracy is not None else None,
            "answer_total": n, "pair_accuracy": metrics["pair_accuracy"],
            "reward_accuracy": metrics["rewards/accuracies"], "chosen_delta": metrics["logps/chosen_delta"],
            "margin": metrics["rewards/margins"], "divergent_chosen_logp": metrics["tokens/divergent_chosen_logp"],
            "logps_chosen": metrics["logps/chosen"], "logps_rejected": metrics["logps/rejected"],
            "num_pairs": metrics["num_pairs"]}


def format_table(summary: dict) -> str:
    from dpop.reporting.report import wilson_interval

    header = f"{'case':<10}{'model':<6}{'answer acc (95% CI)':<28}{'pair acc':>9}{'chosen Δ':>10}{'margin':>9}{'div. logp':>11}"
    lines = ["", header, "-" * len(header)]
    for case, models in summary.items():
        if case == "meta":
            continue
        for name, m in models.items():
            lo, hi = wilson_interval(m["answer_correct"] or 0, m["answer_total"] or 0)
            accuracy = (f"{m['answer_accuracy']:.3f} ({m['answer_correct']}/{m['answer_total']}, {lo:.2f}-{hi:.2f})"
                        if m["answer_accuracy"] is not None else "n/a")
            lines.append(f"{case:<10}{name:<6}{accuracy:<28}{_num(m['pair_accuracy'], 9, 3)}"
                         f"{_num(m['chosen_delta'], 10, 2)}{_num(m['margin'], 9, 3)}{_num(m['divergent_chosen_logp'], 11, 3)}")
    return "\n".join(lines)


def _num(value, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else f"{'n/a':>{width}}"
