"""What only a GPU can show, in one prepared run (issue 19): ~6 minutes on one H200, results JSON at the end.

    make gpu-check                                   # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke --model DIR   # the same code paths, tiny, on a CPU

Without CUDA (and without --cpu-smoke) it exits 2 at once, saying so. Three parts, each recorded even when
another fails:
1. layouts: one bf16-sr training run of 2 steps per batch layout (plain, shared, packed) on the builtin model,
   through dpop.train on the GPU. shared and packed build the prefix-sharing masks (B, 1, T, T) that CUDA's
   sdpa kernels take. Checked: step 1's loss is log 2 (the policy is its own reference), every number finite,
   and each layout's step-1 log-probs within bf16 rounding of plain's (relative LAYOUT_TOLERANCE).
2. curves: the bench's precision curves (bench.py's curve case: fp32, bf16, bf16-sr, for dpo, dpop, sft), the
   loss's largest relative distance from fp32 over the steps.
3. bench: TRL's DPOTrainer against dpop on the bench workload (bench.py's workers, same rows and batch):
   pairs/s, MFU against the GPU's bf16 matmul rate measured in this run, and peak GPU memory
   (torch.cuda.max_memory_allocated of each worker).
The results go to benchmarks/results/gpu-check-<timestamp>.json (smoke: ...-cpu-smoke.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import Runner, machine_description, steps_args, worker_environment  # noqa: E402
from bench_report import curve_difference, summarize  # noqa: E402

LAYOUTS = ("plain", "shared", "packed")
LAYOUT_TOLERANCE = 2e-2  # relative, on summed log-probs: bf16 matmuls in another batch shape round otherwise
CURVE_LOSSES = ("dpo", "dpop", "sft")
CURVE_PRECISIONS = ("fp32", "bf16", "bf16-sr")
# (layout steps, layout batch, curve steps, curve batch, bench warmup, bench steps, matmul rows)
FULL = dict(layout_steps=2, layout_batch=8, curve_steps=50, curve_batch=4, curve_losses=CURVE_LOSSES, warmup=2,
            steps=8, matmul_tokens=4096, bench_batch=None)
SMOKE = dict(layout_steps=2, layout_batch=2, curve_steps=2, curve_batch=2, curve_losses=("dpo",), warmup=0,
             steps=1, matmul_tokens=64, bench_batch=2)


def check_layouts(model: str, plan: dict, scratch: Path) -> dict:
    """Part 1: a short bf16-sr run per layout; step-1 metrics and the checks."""
    from dpop.training.loop import train

    results, checks = {}, {}
    for layout in LAYOUTS:
        started = time.perf_counter()
        result = train(dict(model=model, layout=layout, precision="bf16-sr", loss="dpo", max_length=256,
                            max_steps=plan["layout_steps"], batch_size=plan["layout_batch"],
                            task_pairs=plan["layout_batch"] * plan["layout_steps"],
                            output_dir=str(scratch / f"layout-{layout}")))
        rows = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
        train_rows = [r for r in rows if r["split"] == "train"]
        results[layout] = {"seconds": time.perf_counter() - started, "rows": train_rows}
        first = train_rows[0]
        checks[layout] = {
            "step1_loss_is_log2": abs(first["loss"] - math.log(2)) < 1e-4,
            "finite": all(math.isfinite(v) for r in train_rows for k, v in r.items()
                          if isinstance(v, float) and not k.startswith("precision/")),
        }
    plain = results["plain"]["rows"][0]
    for layout in LAYOUTS[1:]:
        mine = results[layout]["rows"][0]
        checks[layout]["logps_match_plain"] = all(abs(mine[key] - plain[key]) <= LAYOUT_TOLERANCE * abs(plain[key])
                                                  for key in ("logps/chosen", "logps/rejected"))
    return {"runs": results, "checks": checks, "passed": all(all(c.values()) for c in checks.values())}


def run_curves(run: Runner, plan: dict) -> dict:
    """Part 2: bench.py's curve workers; {loss: {precision: difference from fp32}}."""
    curves = {}
    for loss in plan["curve_losses"]:
        results = {precision: run(f"curve {loss} {precision}", [
            "--engine", "dpop", "--case", "curve", "--precision", precision, "--loss", loss,
            "--batch-size", str(plan["curve_batch"]), *steps_args(0, plan["curve_steps"])])
            for precision in CURVE_PRECISIONS}
        curves[loss] = {precision: curve_difference(results["fp32"], results[precision])
                        for precision in CURVE_PRECISIONS if precision != "fp32"}
    return curves


def run_bench(run: Runner, plan: dict, rate: float | None) -> list:
    """Part 3: TRL (bf16, precomputed reference, no checkpointing) and dpop (default precision; dpo and dpop)."""
    batch = ["--batch-size", str(plan["bench_batch"])] if plan["bench_batch"] else []
    steps = steps_args(plan["warmup"], plan["steps"])
    workers = {"TRL bf16+precompute": ["--engine", "trl", "--set", "activation_checkpointing=False"],
               "dpop loss=dpo": ["--engine", "dpop", "--loss", "dpo"],
               "dpop loss=dpop": ["--engine", "dpop", "--loss", "dpop"]}
    summaries = []
    for label, argv in workers.items():
        result = run(label, [*argv, "--case", "bench", *batch, *steps])
        summary = summarize(result, rate) if result else None
        if summary is not None:
            summary["cuda_peak_gb"] = result["environment"].get("cuda_peak_gb")
        summaries.append(summary or {"label": label, "failed": True})
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code paths, tiny, without a GPU")
    parser.add_argument("--model", default="smollm2-135m", help="builtin name or model dir")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("gpu_check: no CUDA device here; this check needs one (an NVIDIA GPU and a CUDA build of torch). "
              "--cpu-smoke runs the same code paths tiny on the CPU.", file=sys.stderr)
        return 2
    plan = SMOKE if args.cpu_smoke else FULL
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    scratch = Path(tempfile.mkdtemp(prefix="dpop-gpu-check-"))
    run = Runner(worker_environment(2 if args.cpu_smoke else 8, "none"), None, scratch,
                 ["--model", args.model, "--threads", "2" if args.cpu_smoke else "8"])
    report = {"machine": machine_description(), "cpu_smoke": args.cpu_smoke, "model": args.model, "plan": plan,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "elapsed_s": {}}
    parts = {"matmul": lambda: run("matmul", ["--engine", "matmul", "--tokens", str(plan["matmul_tokens"])]),
             "layouts": lambda: check_layouts(args.model, plan, scratch),
             "curves": lambda: run_curves(run, plan),
             "bench": lambda: run_bench(run, plan, (report.get("matmul") or {}).get("bf16", {}).get("layer"))}
    failures = []
    for name, part in parts.items():
        part_started = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            report[name] = part()
        except Exception as error:  # one part failing must not lose the others' figures
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            failures.append(name)
        report["elapsed_s"][name] = time.perf_counter() - part_started
        print(f"  [{name}] {report['elapsed_s'][name]:.0f} s", flush=True)
    report["elapsed_s"]["total"] = time.perf_counter() - started
    failures += [f"worker {label}" for label in run.failures]
    if isinstance(report.get("layouts"), dict) and report["layouts"].get("passed") is False:
        failures.append("layout checks")
    report["failures"] = failures
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-check-{stamp}{'-cpu-smoke' if args.cpu_smoke else ''}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    _print_summary(report)
    print(f"results: {path}" + (f"; FAILED: {', '.join(failures)} (logs in {scratch})" if failures else ""))
    if not failures:
        shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failures else 0


def _print_summary(report: dict) -> None:
    for layout, checks in (report.get("layouts") or {}).get("checks", {}).items():
        print(f"layout {layout}: " + ", ".join(f"{name} {'ok' if ok else 'FAILED'}" for name, ok in checks.items()))
    for loss, by_precision in (report.get("curves") or {}).items():
        if isinstance(by_precision, dict):
            for precision, curve in by_precision.items():
                if curve:
                    print(f"curve {loss} {precision}: loss within {curve['max_rel_diff']:.2%} of fp32 (max)")
    for row in report.get("bench") or []:
        if isinstance(row, dict) and not row.get("failed") and "pairs_per_s" in row:
            print(f"bench {row['label']}: {row['pairs_per_s']:.2f} pairs/s, MFU {row.get('mfu')}, "
                  f"peak GPU memory {row.get('cuda_peak_gb')} GB")


if __name__ == "__main__":
    sys.exit(main())
