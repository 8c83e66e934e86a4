"""dpop against TRL 1.16's DPOTrainer: throughput, memory and MFU on the same model, pairs and batch (issue 6).

    make bench                                   # = .venv/bin/python benchmarks/bench.py (~40+ min on 2 cores)
    .venv/bin/python benchmarks/bench.py --quick # smoke test: few steps, small scaling table
    .venv/bin/python benchmarks/bench.py --case bench --case curves --dpop-set compile=true
    .venv/bin/python benchmarks/bench.py worker --engine dpop --case bench --steps 8 --warmup 2

One invocation runs, each engine in its own subprocess (so each peak RSS is that engine's alone), all with
the same environment (torch threads, offline HF libraries, no progress bars). Every configuration runs twice:
- a speed run, with glibc's default allocator settings (what a user gets): step times, pairs/s, MFU;
- a memory run (a few steps), with MALLOC_MMAP_THRESHOLD_=65536, so glibc returns freed blocks and RSS
  follows live memory: the peak RSS. That setting makes every block over 64 KiB its own mmap, page-faulted
  in again each step, which slows both engines ~2x; so it is kept out of the speed run. The speed run's
  peak RSS (allocator default) is recorded too.

- matmul: the bf16 (and fp32) matmul rate at the model's shapes, the denominator of MFU (bench_flops.py).
- bench: builtin low-edit pairs, batch 8, max_length 256. TRL in its best configuration (bf16 autocast +
  precomputed reference log-probs; with and without gradient checkpointing, TRL's default being on: the
  faster one is the throughput anchor, the smaller one the memory anchor), dpop's best configuration (its
  default precision, bf16-sr on bf16 hardware; precomputed reference, TrainConfig's default layout) with
  loss dpo (parity with TRL), the same with gradient checkpointing (dpop's smaller-memory setting), with
  loss dpop, and with loss dpo in plain bf16 autocast (the speed the default must keep). Throughput
  compares the faster dpop (dpo, default precision) setting with the faster TRL one, memory the smaller
  with the smaller.
- long: prompt ~512 + responses ~512 tokens, batch 2, max_length 1100; dpop (dpo, checkpointing off and on)
  and TRL with its default gradient checkpointing on (its smaller-memory setting, so the memory anchor).
- scaling: dpop (dpo) pairs/s and peak RSS against response length (64, 256, 1024) and batch.
- curves: TrainConfig's defaults (its learning rate) for 50 steps of 4 pairs of the bench workload, in fp32,
  bf16 autocast and bf16-sr, same pairs and seed, for dpo, dpop and sft: the largest and the mean of
  |loss - loss_fp32| / loss_fp32 over the steps, and the step's chosen delta (lw - rw) and margin
  ((lw - rw) - (ll - rl), nats) at steps 10, 25 and 50 beside fp32's.

How each number is computed (per worker, over the timed steps only, i.e. after `warmup` steps):
- step time: median of the optimizer steps' wall times. dpop: perf_counter around `train_step` (batch
  collation included). TRL: on_step_begin -> on_step_end (collation happens before on_step_begin).
- pairs/s = pairs per step / median step time.
- tokens/s = median over steps of (real input tokens of the step / its time). Input tokens are what the
  decoder reads: TRL reads the prompt twice (one row per response), dpop's shared layout once.
- MFU = median over steps of (model FLOPs of the step / its time) / bf16 matmul rate of one decoder layer's
  shapes measured in this run (formula in bench_flops.py).
- peak RSS: the worker process's peak resident set (its rusage seen by the parent through wait4): model load,
  tokenisation, reference pass and steps. Also shown: the peak during the steps alone.
- reference pass: the precompute of reference log-probs (inside setup for both engines), in seconds.
Results go to benchmarks/results/<timestamp>.json with the machine's description and every worker's per-step
records; the workers' logs go to a temp dir, deleted when every worker succeeded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_report import TARGETS, compare, curve_difference, print_header, print_report, summarize, target_rows  # noqa: E402

from dpop.config import resolve_precision  # noqa: E402

ALL_CASES = ("bench", "long", "scaling", "curves")
DEFAULT_PRECISION = resolve_precision("auto")  # what a dpop user gets on this machine
AUTOCAST_LABEL = "loss=dpo autocast"  # plain bf16 autocast, the old default
CURVE_LOSSES = ("dpo", "dpop", "sft")
CURVE_PRECISIONS = ("fp32", "bf16", "bf16-sr")


@dataclass(frozen=True)
class Plan:
    """Steps per case: full (`make bench`) or quick (smoke test)."""

    bench: tuple[int, int]  # (warmup, timed steps)
    memory: tuple[int, int]  # (warmup, steps) of a memory run: enough to reach the peak
    long: tuple[int, int]
    scaling_points: tuple[tuple[int, int], ...]  # (response tokens, batch)
    scaling_steps: tuple[int, int]
    curve_steps: int
    curve_batch: int  # the bench workload's pairs, this many per step (fp32 steps are the slow ones)
    trl_checkpointing: tuple[str, ...]  # bench-case TRL variants: gradient checkpointing off / on
    long_trl_checkpointing: tuple[str, ...]
    matmul_tokens: int = 1024


FULL = Plan(bench=(2, 8), memory=(1, 2), long=(1, 3),
            scaling_points=((64, 1), (64, 4), (64, 8), (256, 1), (256, 4), (256, 8), (1024, 1), (1024, 2), (1024, 4)),
            scaling_steps=(1, 2), curve_steps=50, curve_batch=4, trl_checkpointing=("off", "on"),
            long_trl_checkpointing=("on",))
QUICK = Plan(bench=(1, 2), memory=(0, 1), long=(1, 1), scaling_points=((64, 1), (256, 2)), scaling_steps=(1, 1), curve_steps=4,
             curve_batch=2, trl_checkpointing=("off",), long_trl_checkpointing=("on",), matmul_tokens=256)


# --- machine and environment ----------------------------------------------------------------------------

def machine_description() -> dict:
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def first(key: str) -> str | None:
        for line in cpuinfo.splitlines():
            if line.split(":")[0].strip() == key:
                return line.split(":", 1)[1].strip()
        return None

    flags = set((first("flags") or "").split())
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    ram_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), None)
    versions = {}
    for package in ("torch", "transformers", "trl", "accelerate", "datasets", "dpop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu_model": first("model name") or platform.processor(), "logical_cpus": os.cpu_count(),
            "cores_per_socket": first("cpu cores"),
            "flags": {name: name in flags for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
            "ram_gb": round(ram_kib * 1024 / 1e9, 1) if ram_kib else None, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "dpop_commit": commit or None,
            "load_average_at_start": os.getloadavg()}


def worker_environment(threads: int, malloc_threshold: str) -> dict:
    """The one environment every worker gets, whatever its engine."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONHASHSEED="0", TRANSFORMERS_VERBOSITY="error")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if malloc_threshold != "none":
        env["MALLOC_MMAP_THRESHOLD_"] = malloc_threshold
    return env


# --- running workers ------------------------------------------------------------------------------------

@dataclass
class Runner:
    env: dict  # speed runs
    memory_env: dict | None  # memory runs; None: one run gives both
    log_dir: Path
    common: list[str]  # worker flags shared by every call (--model, --threads)
    failures: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)  # label -> the worker's full result (per-step records)

    def __call__(self, label: str, argv: list[str], env: dict | None = None) -> dict | None:
        """Run one worker; its result dict (with `child_peak_rss_gb`, `wall_s`, `load_before`), or None."""
        log_path = self.log_dir / (label.replace(" ", "_").replace("/", "-") + ".log")
        command = [sys.executable, str(Path(__file__).resolve()), "worker", *argv, *self.common]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        print(f"  {label} ...", end="", flush=True)
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env or self.env, text=True)
            stdout = process.stdout.read()
            process.stdout.close()
            _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak RSS
            process.returncode = os.waitstatus_to_exitcode(status)
            log.write(stdout)
        wall = time.perf_counter() - started
        result = _last_result(stdout)
        if process.returncode != 0 or result is None:
            print(f" FAILED after {wall:.0f} s (exit {process.returncode}); log: {log_path}")
            tail = log_path.read_text().splitlines()[-15:]
            print("    " + "\n    ".join(tail))
            self.failures.append(label)
            return None
        print(f" {wall:.0f} s", flush=True)
        result.update(label=label, wall_s=wall, load_before=load_before,
                      child_peak_rss_gb=usage.ru_maxrss * 1024 / 1e9)
        self.raw[label] = result
        return result

    def measure(self, label: str, argv: list[str], steps: tuple[int, int], memory_steps: tuple[int, int]) -> dict | None:
        """A speed run, then (with a memory environment) a memory run whose peak RSS replaces the speed run's."""
        result = self(label, [*argv, *steps_args(*steps)])
        if result is None or self.memory_env is None:
            return result
        memory = self(f"{label} [memory]", [*argv, *steps_args(*memory_steps)], env=self.memory_env)
        result["speed_run_peak_rss_gb"] = result["child_peak_rss_gb"]
        result["child_peak_rss_gb"] = memory["child_peak_rss_gb"] if memory else None
        result["steps_peak_rss_gb"] = memory.get("steps_peak_rss_gb") if memory else None
        return result


def _last_result(stdout: str) -> dict | None:
    """The worker's JSON line: the last line that parses as an object with an 'engine' key (libraries may
    print dicts of their own before it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "engine" in value:
                return value
    return None


# --- the cases ------------------------------------------------------------------------------------------

def steps_args(warmup: int, steps: int) -> list[str]:
    return ["--warmup", str(warmup), "--steps", str(steps)]


def run_trl(run: Runner, label: str, case: str, steps: tuple[int, int], memory_steps: tuple[int, int],
            checkpointing: str, args) -> dict | None:
    """One TRL configuration; warns when TRL did not apply the asked activation checkpointing."""
    result = run.measure(label, ["--engine", "trl", "--case", case, "--set",
                                 f"activation_checkpointing={checkpointing == 'on'}", *_sets(args.trl_set)],
                         steps, memory_steps)
    if result is not None and result["settings"].get("activation_checkpointing_active") != (checkpointing == "on"):
        print(f"  WARNING: {label}: TRL's model reports activation checkpointing "
              f"{result['settings'].get('activation_checkpointing_active')}")
    return result


def run_bench_case(run: Runner, plan: Plan, args, rate) -> tuple[list, dict]:
    results = []
    if "trl" in args.engines:
        for checkpointing in plan.trl_checkpointing:
            results.append(run_trl(run, f"TRL bf16+precompute gc={checkpointing}", "bench", plan.bench,
                                   plan.memory, checkpointing, args))
    if "dpop" in args.engines:
        for label, extra in _dpop_variants(True):
            precision = "bf16" if label == AUTOCAST_LABEL else DEFAULT_PRECISION
            results.append(run.measure(f"dpop {precision}+precompute {label}",
                                       ["--engine", "dpop", "--case", "bench", *extra, *_dpop_args(args)],
                                       plan.bench, plan.memory))
    summaries = [summarize(r, rate) for r in results]
    return summaries, compare(summaries)


def run_long_case(run: Runner, plan: Plan, args, rate) -> tuple[list, dict]:
    results = []
    if "trl" in args.engines:
        for checkpointing in plan.long_trl_checkpointing:
            results.append(run_trl(run, f"TRL long gc={checkpointing}", "long", plan.long, plan.memory,
                                   checkpointing, args))
    if "dpop" in args.engines:
        for label, extra in _dpop_variants(False):
            results.append(run.measure(f"dpop long {label}", ["--engine", "dpop", "--case", "long", *extra,
                                                              *_dpop_args(args)], plan.long, plan.memory))
    summaries = [summarize(r, rate) for r in results]
    return summaries, compare(summaries)


def _dpop_variants(bench_case: bool) -> list[tuple[str, list[str]]]:
    """dpop's settings compared with TRL, all in dpop's default precision: loss dpo (TRL's loss) with
    checkpointing off (the default) and on. The bench case adds loss dpop and loss dpo in plain bf16
    autocast (the old default, the speed the default must keep), both reported, not compared with TRL."""
    variants = [("loss=dpo", ["--loss", "dpo"]),
                ("loss=dpo gc=on", ["--loss", "dpo", "--set", "gradient_checkpointing=true"])]
    if bench_case:
        variants += [("loss=dpop", ["--loss", "dpop"]), (AUTOCAST_LABEL, ["--loss", "dpo", "--precision", "bf16"])]
    return variants


def run_scaling(run: Runner, plan: Plan, args, rate) -> list:
    summaries = []
    for response_tokens, batch in plan.scaling_points:
        case = f"scale-r{response_tokens}-b{batch}"
        result = run(f"dpop {case}", ["--engine", "dpop", "--case", case, "--loss", "dpo",
                                      *steps_args(*plan.scaling_steps), *_dpop_args(args)])
        summary = summarize(result, rate)
        if summary:
            summary.update(response_tokens=response_tokens, batch=batch)
        summaries.append(summary)
    return summaries


def run_curves(run: Runner, plan: Plan, args) -> dict:
    """TrainConfig's defaults (learning rate, layout) on the bench workload in each precision, for dpo, dpop
    and sft: {loss: {precision: difference from fp32, or None}}."""
    curves = {}
    for loss in CURVE_LOSSES:
        results = {}
        for precision in CURVE_PRECISIONS:
            results[precision] = run(f"dpop curve {loss} {precision}",
                                     ["--engine", "dpop", "--case", "curve", "--precision", precision,
                                      "--loss", loss, "--batch-size", str(plan.curve_batch),
                                      *steps_args(0, plan.curve_steps), *_dpop_args(args)])
        curves[loss] = {precision: curve_difference(results["fp32"], results[precision])
                        for precision in CURVE_PRECISIONS if precision != "fp32"}
    return curves


def _sets(items) -> list[str]:
    return [flag for item in items or () for flag in ("--set", item)]


def _dpop_args(args) -> list[str]:
    return (["--layout", args.layout] if args.layout else []) + _sets(args.dpop_set)


# --- main -----------------------------------------------------------------------------------------------

def run_cases(run: Runner, plan: Plan, args, report: dict) -> None:
    """Run the matmul measurement and each asked case, filling `report`; prints each case's elapsed time."""
    def timed(name, fn):
        case_started = time.perf_counter()
        print(f"\n[{name}]")
        value = fn()
        report["elapsed_s"][name] = time.perf_counter() - case_started
        print(f"  [{name}] elapsed {report['elapsed_s'][name]:.0f} s")
        return value

    cases = report["cases"]
    matmul = timed("matmul", lambda: run("matmul", ["--engine", "matmul", "--tokens", str(plan.matmul_tokens)]))
    report["matmul"] = matmul
    rate = matmul["bf16"]["layer"] if matmul else None
    if matmul:
        print(f"  bf16 matmul at the model's shapes ({matmul['tokens']} rows): decoder-layer mix "
              f"{rate:.0f} GFLOP/s (MFU's denominator), lm head {matmul['bf16']['lm_head']:.0f}; fp32 layer mix "
              f"{matmul['fp32']['layer']:.0f} GFLOP/s")
    if "bench" in cases:
        report["bench"], report["bench_comparison"] = timed("bench", lambda: run_bench_case(run, plan, args, rate))
    if "long" in cases:
        report["long"], report["long_comparison"] = timed("long", lambda: run_long_case(run, plan, args, rate))
    if "scaling" in cases and "dpop" in args.engines:
        report["scaling"] = timed("scaling", lambda: run_scaling(run, plan, args, rate))
    if "curves" in cases and "dpop" in args.engines:
        report["curves"] = timed("curves", lambda: run_curves(run, plan, args))


def run_parent(args) -> int:
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    log_dir = Path(tempfile.mkdtemp(prefix=f"dpop-bench-{stamp}-"))
    memory_env = (worker_environment(args.threads, args.malloc_threshold)
                  if args.malloc_threshold != args.speed_malloc_threshold else None)
    run = Runner(worker_environment(args.threads, args.speed_malloc_threshold), memory_env, log_dir,
                 ["--model", args.model, "--threads", str(args.threads)])
    machine = machine_description()
    print_header(args, machine, log_dir)
    report = {"machine": machine, "quick": args.quick, "model": args.model, "threads": args.threads,
              "malloc_mmap_threshold": args.malloc_threshold, "speed_malloc_mmap_threshold": args.speed_malloc_threshold,
              "targets": TARGETS, "cases": args.case or list(ALL_CASES),
              "engines": args.engines, "dpop_set": args.dpop_set, "trl_set": args.trl_set, "layout": args.layout,
              "plan": dataclasses.asdict(plan), "elapsed_s": {}}
    run_cases(run, plan, args, report)
    report["elapsed_s"]["total"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report.update(targets_result=target_rows(report), failures=run.failures, workers=run.raw)
    print_report(report, plan.curve_batch)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {out}")
    if run.failures:
        print(f"FAILED workers: {', '.join(run.failures)} (logs in {log_dir})")
        return 1
    shutil.rmtree(log_dir, ignore_errors=True)
    return 0


def parse_args(argv: list[str]):
    from dpop.config import TrainConfig

    if argv and argv[0] == "worker":
        parser = argparse.ArgumentParser(prog="bench.py worker", description="One benchmark subprocess; prints "
                                         "one JSON line last on stdout.")
        parser.add_argument("--engine", choices=("dpop", "trl", "matmul"), required=True)
        parser.add_argument("--case", default="bench", help="bench, long, curve or scale-r<N>-b<B>")
        parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
        parser.add_argument("--warmup", type=int, default=2, help="optimizer steps run before the timed ones")
        parser.add_argument("--batch-size", type=int, default=None, help="override the case's batch size")
        parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "bf16-sr"), default="auto",
                            help="dpop's precision (auto: dpop's default); TRL runs bf16 autocast unless fp32")
        parser.add_argument("--loss", default="dpo", help="dpop's loss (TRL always runs DPO's sigmoid loss)")
        parser.add_argument("--layout", default=None, help="dpop's layout (default: TrainConfig's)")
        parser.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="extra TrainConfig (dpop) or DPOConfig (trl) setting")
        parser.add_argument("--tokens", type=int, default=1024, help="matmul rows (matmul engine)")
        parser.add_argument("--model", default="smollm2-135m")
        parser.add_argument("--threads", type=int, default=2)
        return parser.parse_args(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps and a small scaling table (smoke test)")
    parser.add_argument("--case", action="append", choices=ALL_CASES, help="run only these cases (repeatable)")
    parser.add_argument("--engines", default="trl,dpop", help="comma-separated: trl, dpop")
    parser.add_argument("--model", default="smollm2-135m", help="builtin name or model dir")
    parser.add_argument("--layout", default=None, help="dpop's layout (default: TrainConfig's)")
    parser.add_argument("--dpop-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra TrainConfig setting for every dpop worker, e.g. compile=true")
    parser.add_argument("--trl-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra DPOConfig setting for every TRL worker")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker")
    parser.add_argument("--malloc-threshold", default="65536",
                        help="MALLOC_MMAP_THRESHOLD_ of the memory runs ('none' = glibc's default)")
    parser.add_argument("--speed-malloc-threshold", default="none",
                        help="MALLOC_MMAP_THRESHOLD_ of the speed runs; equal to --malloc-threshold: one run each")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    args.engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if argv and argv[0] == "worker":
        from bench_workers import main as worker_main

        worker_main(args)
        return 0
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
