"""Does CHES predict which pairs DPO pushes down? And is the edit-distance contrast real per token? (issue 18)

    .venv/bin/python benchmarks/ches_study.py                      # seeds 0 and 1, ~8 minutes each on 2 cores
    .venv/bin/python benchmarks/ches_study.py --seeds 0 --pairs 64 --steps 8   # smoke test

Per seed, on the builtin model and task:
1. SFT on chosen answers of the sft split (the demo's full-mode SFT: 256 problems, 32 steps, lr 2e-5).
2. Training pairs: half low-edit, half high-edit (`--pairs`, 256 by default), on distinct train-split problems.
3. Under the SFT model (fp32): each pair's CHES and length-normalised CHES (dpop.scoring.displacement), its
   normalised character edit distance, and every response token's log-prob.
4. One epoch of DPO and, separately, of DPOP from the SFT model as policy and reference (batch 8, lr 5e-6,
   the demo's full-mode settings, dpop's default precision), then every token's log-prob again (fp32).
5. Per pair, the chosen response's change read four ways: summed (what DPO's margin and the demo report), per
   token, per token over the shared tokens before the first difference, and per token after it (the DPOP
   paper's Fig. 4 quantity). Spearman's ρ of the summed change with CHES, normalised CHES and edit distance;
   means of each change on low- and high-edit pairs.
Writes OUT/results.json (per-pair values included) and prints the tables docs/losses.md quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from dpop.scoring.displacement import READINGS


def make_data(out: Path, pairs: int, seed: int) -> tuple[Path, Path]:
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    half = pairs // 2
    low = make_pairs(pairs, edit="low", seed=seed, split="train")[:half]
    high = make_pairs(pairs, edit="high", seed=seed, split="train")[half:]  # other problems than the low half
    for row, edit in [(r, "low") for r in low] + [(r, "high") for r in high]:
        row["edit"] = edit
    sft = make_pairs(256, edit="low", seed=seed, split="sft")
    return write_jsonl(sft, out / "sft.jsonl"), write_jsonl(low + high, out / "train.jsonl")


def measure(model_dir: str, tokenized, layout: dict, *, with_ches: bool) -> dict:
    from dpop.models import load_model
    from dpop.scoring.displacement import ches_scores, response_tokens

    model, _ = load_model(model_dir)
    tokens = response_tokens(model, tokenized, layout=layout, batch_size=32)
    result = {"parts": [t.chosen_parts() for t in tokens], "tokens": tokens}
    if with_ches:
        scores = ches_scores(model, tokenized, layout=layout, batch_size=32)
        result["ches"], result["ches_normalized"] = scores.raw, scores.normalized
    return result


def one_seed(out: Path, seed: int, pairs: int, steps: int | None, sft_steps: int) -> dict:
    from dpop.analysis.displacement import spearman
    from dpop.config import TrainConfig
    from dpop.data import load_pairs
    from dpop.data.textdiff import normalized_edit_distance
    from dpop.data.tokenize import tokenize_pairs
    from dpop.models import load_tokenizer, resolve_model
    from dpop.training.loop import train

    out.mkdir(parents=True, exist_ok=True)
    sft_file, train_file = make_data(out, pairs, seed)
    base = TrainConfig(batch_size=8, seed=seed, max_length=256, max_prompt_length=128, overwrite=True, log_every=1)
    train(replace(base, loss="sft", data=str(sft_file), output_dir=str(out / "sft"), max_steps=sft_steps,
                  learning_rate=2e-5, warmup_steps=max(1, sft_steps // 10)))
    sft_model = str(out / "sft" / "final")
    rows = load_pairs(train_file).pairs
    tokenizer = load_tokenizer(resolve_model(sft_model))
    data = tokenize_pairs(rows, tokenizer, max_length=256, max_prompt_length=128)
    assert not data.dropped, data.dropped
    layout = {"layout": "shared", "pad_id": tokenizer.pad_token_id, "pack_length": None}
    before = measure(sft_model, data.pairs, layout, with_ches=True)
    edit = [normalized_edit_distance(_text(r.chosen), _text(r.rejected)) for r in rows]
    kinds = [r.metadata.get("edit") for r in rows]
    result = {"seed": seed, "pairs": len(rows), "per_pair": {"edit_distance": edit, "edit": kinds,
                                                            "ches": before["ches"],
                                                            "ches_normalized": before["ches_normalized"]}}
    for loss in ("dpo", "dpop"):
        run_steps = steps or math.ceil(len(rows) / base.batch_size)
        train(replace(base, loss=loss, model=sft_model, data=str(train_file), output_dir=str(out / loss),
                      max_steps=run_steps, learning_rate=5e-6, warmup_steps=max(1, run_steps // 10)))
        after = measure(str(out / loss / "final"), data.pairs, layout, with_ches=False)
        changes = {reading: [a[reading] - b[reading] for a, b in zip(after["parts"], before["parts"])]
                   for reading in READINGS}
        result["per_pair"][f"{loss}_change"] = changes
        result[loss] = {
            "spearman_sum_change": {name: spearman(before[name] if name != "edit_distance" else edit, changes["sum"])
                                    for name in ("ches", "ches_normalized", "edit_distance")},
            "spearman_per_token_change": {
                name: spearman(before[name] if name != "edit_distance" else edit, changes["per_token"])
                for name in ("ches", "ches_normalized", "edit_distance")},
            "mean_change": {case: {reading: _mean([c for c, k in zip(changes[reading], kinds) if k == case])
                                   for reading in READINGS} for case in ("low", "high")},
        }
    return result


def _text(value) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _mean(values: list[float]) -> dict:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return {"mean": math.nan, "stderr": math.nan, "n": 0}
    spread = statistics.stdev(kept) / math.sqrt(len(kept)) if len(kept) > 1 else math.nan
    return {"mean": statistics.fmean(kept), "stderr": spread, "n": len(kept)}


def print_tables(results: list[dict]) -> None:
    print("\nSpearman rho of the per-pair chosen log-prob change (summed / per token) with the pre-training score")
    print(f"{'seed':<6}{'loss':<6}{'CHES':>16}{'norm. CHES':>16}{'edit distance':>16}")
    for result in results:
        for loss in ("dpo", "dpop"):
            summed, per_token = result[loss]["spearman_sum_change"], result[loss]["spearman_per_token_change"]
            cells = [f"{summed[n]:+.3f} / {per_token[n]:+.3f}" for n in ("ches", "ches_normalized", "edit_distance")]
            print(f"{result['seed']:<6}{loss:<6}" + "".join(f"{c:>16}" for c in cells))
    print("\nMean chosen change (nats; ± standard error) on low- and high-edit pairs")
    print(f"{'seed':<6}{'loss':<6}{'case':<6}" + "".join(f"{r:>22}" for r in READINGS))
    for result in results:
        for loss in ("dpo", "dpop"):
            for case in ("low", "high"):
                means = result[loss]["mean_change"][case]
                print(f"{result['seed']:<6}{loss:<6}{case:<6}" + "".join(
                    f"{means[r]['mean']:>+13.3f} ± {means[r]['stderr']:<6.3f}" for r in READINGS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pairs", type=int, default=256, help="Training pairs per seed, half low-edit, half high.")
    parser.add_argument("--steps", type=int, default=None, help="Preference steps (default: one epoch).")
    parser.add_argument("--sft-steps", type=int, default=32)
    parser.add_argument("--out", default="runs/ches_study")
    args = parser.parse_args()
    started = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(one_seed(Path(args.out) / f"seed-{seed}", seed, args.pairs, args.steps, args.sft_steps))
    summary = {"results": results, "minutes": round((time.perf_counter() - started) / 60, 2), "args": vars(args)}
    Path(args.out, "results.json").write_text(json.dumps(summary, indent=1))
    print_tables(results)
    print(f"\n{args.out}/results.json ({summary['minutes']} min)")


if __name__ == "__main__":
    main()
