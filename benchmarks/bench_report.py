"""What the benchmark prints and records: per-worker summaries (medians over timed steps), the dpop/TRL
comparison, the bf16/fp32 loss-curve difference and the issue's targets with PASS / MISSED / NOT MEASURED.
How each number is computed is in bench.py's docstring; the FLOPs rule in bench_flops.py."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

TARGETS = dict(throughput_ratio=4.0, mfu=0.50, bench_rss_ratio=0.7, long_rss_ratio=0.5, curve_mean_rel_diff=0.05,
               curve_nats=0.3, curve_rel=0.10, autocast_speed_ratio=1.0)
CURVE_CHECK_STEPS = (10, 25, 50)
DEFAULT_CURVE = "bf16-sr"  # the precision whose fidelity is targeted (dpop's default where bf16 is fast)


# --- summaries ------------------------------------------------------------------------------------------

def summarize(result: dict | None, bf16_rate_gflops: float | None) -> dict | None:
    """Median-based figures of one worker's timed steps (bench.py's docstring says how)."""
    if result is None:
        return None
    timed = result["steps"][result["warmup"]:] or result["steps"]
    seconds = [s["seconds"] for s in timed]
    median_s = statistics.median(seconds)
    flops_per_s = statistics.median(s["flops"] / s["seconds"] for s in timed)
    lengths = result["token_lengths"]
    return {"label": result["label"], "engine": result["engine"], "steps_timed": len(timed),
            "step_s": median_s, "pairs_per_s": statistics.median(s["pairs"] for s in timed) / median_s,
            "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in timed),
            "tokens_per_step": statistics.median(s["tokens"] for s in timed),
            "flops_per_s": flops_per_s, "mfu": flops_per_s / (bf16_rate_gflops * 1e9) if bf16_rate_gflops else None,
            "peak_rss_gb": result["child_peak_rss_gb"], "steps_peak_rss_gb": result.get("steps_peak_rss_gb"),
            "speed_run_peak_rss_gb": result.get("speed_run_peak_rss_gb"),
            "reference_pass_s": result.get("reference_pass_s"), "setup_s": result.get("setup_s"),
            "wall_s": result["wall_s"], "load_before": result["load_before"],
            "tokens_per_pair": (lengths["prompt"], lengths["chosen"], lengths["rejected"])}


def curve_difference(fp32: dict | None, other: dict | None) -> dict | None:
    """Relative difference |other - fp32| / |fp32| of the per-step losses (max and mean over the steps), and
    the chosen delta and margin (nats) of both at CURVE_CHECK_STEPS (1-based; those the run reached)."""
    if fp32 is None or other is None:
        return None
    pairs = [(a["loss"], b["loss"]) for a, b in zip(fp32["steps"], other["steps"])]
    relative = [abs(b - a) / abs(a) for a, b in pairs if a]
    checks = {}
    for step in CURVE_CHECK_STEPS:
        if step <= min(len(fp32["steps"]), len(other["steps"])):
            a, b = fp32["steps"][step - 1], other["steps"][step - 1]
            checks[step] = {key: {"fp32": a.get(key), "other": b.get(key)} for key in ("chosen_delta", "margin_nats")}
    return {"steps": len(pairs), "max_rel_diff": max(relative), "mean_rel_diff": statistics.mean(relative),
            "fp32_losses": [a for a, _ in pairs], "losses": [b for _, b in pairs], "checks": checks,
            "fp32_step_s": statistics.median(s["seconds"] for s in fp32["steps"][1:] or fp32["steps"]),
            "step_s": statistics.median(s["seconds"] for s in other["steps"][1:] or other["steps"])}


def within_tolerance(reference: float | None, value: float | None) -> bool | None:
    """|value - reference| <= max(10% of |reference|, 0.3 nats) (None where either is missing)."""
    if reference is None or value is None:
        return None
    return abs(value - reference) <= max(TARGETS["curve_rel"] * abs(reference), TARGETS["curve_nats"])


def worst_check(curve: dict | None) -> float | None:
    """The largest |value - fp32| / allowed over a curve's chosen-delta and margin checks (<= 1: within)."""
    if not curve or not curve.get("checks"):
        return None
    ratios = [abs(v["other"] - v["fp32"]) / max(TARGETS["curve_rel"] * abs(v["fp32"]), TARGETS["curve_nats"])
              for check in curve["checks"].values() for v in check.values()
              if v["fp32"] is not None and v["other"] is not None]
    return max(ratios) if ratios else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _rss(summary: dict) -> float:
    return summary["peak_rss_gb"] if summary["peak_rss_gb"] is not None else float("inf")


def compare(summaries: list[dict]) -> dict:
    """dpop (loss dpo, TRL's loss) against TRL: throughput fastest against fastest, peak RSS smallest against
    smallest (each engine's settings with and without gradient checkpointing)."""
    trl = [s for s in summaries if s and s["engine"] == "trl"]
    dpop = [s for s in summaries if s and s["engine"] == "dpop" and "loss=dpop" not in s["label"]
            and "autocast" not in s["label"]]
    autocast = next((s for s in summaries if s and "autocast" in s["label"]), None)
    if not trl or not dpop:
        return {}
    fastest, smallest = max(trl, key=lambda s: s["pairs_per_s"]), min(trl, key=_rss)
    dpop_fastest, dpop_smallest = max(dpop, key=lambda s: s["pairs_per_s"]), min(dpop, key=_rss)
    return {"dpop": dpop_fastest["label"], "dpop_smallest": dpop_smallest["label"],
            "trl_fastest": fastest["label"], "trl_smallest": smallest["label"],
            "tokens_per_pair": {"trl": fastest["tokens_per_pair"], "dpop": dpop_fastest["tokens_per_pair"]},
            "throughput_ratio": _ratio(dpop_fastest["pairs_per_s"], fastest["pairs_per_s"]),
            "tokens_ratio": _ratio(dpop_fastest["tokens_per_s"], fastest["tokens_per_s"]),
            "rss_ratio": _ratio(dpop_smallest["peak_rss_gb"], smallest["peak_rss_gb"]),
            "rss_ratio_fastest_dpop": _ratio(dpop_fastest["peak_rss_gb"], smallest["peak_rss_gb"]),
            "rss_ratio_vs_fastest": _ratio(dpop_fastest["peak_rss_gb"], fastest["peak_rss_gb"]),
            "autocast_speed_ratio": _ratio(dpop_fastest["pairs_per_s"], autocast and autocast["pairs_per_s"]),
            "autocast": autocast and autocast["label"]}


# --- printing -------------------------------------------------------------------------------------------

def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(title: str, summaries: list[dict | None]) -> None:
    print(f"\n{title}")
    print(f"  {'run':34} {'pairs/s':>8} {'tokens/s':>9} {'step s':>7} {'MFU':>6} {'peak RSS':>9} {'steps RSS':>9} "
          f"{'RSS*':>7} {'ref pass':>8} {'tokens/pair (p+c+r)':>20}")
    for s in summaries:
        if s is None:
            continue
        p, c, r = s["tokens_per_pair"]
        print(f"  {s['label']:34} {s['pairs_per_s']:8.3f} {s['tokens_per_s']:9.0f} {s['step_s']:7.2f} "
              f"{_fmt(s['mfu'] and 100 * s['mfu'], '5.1f')}% {_fmt(s['peak_rss_gb'], '7.2f')}GB "
              f"{_fmt(s['steps_peak_rss_gb'], '7.2f')}GB {_fmt(s.get('speed_run_peak_rss_gb'), '5.2f')}GB "
              f"{_fmt(s['reference_pass_s'], '7.1f')}s {p:6.1f}+{c:5.1f}+{r:5.1f}")
    print("  (peak RSS, steps RSS: the memory run; RSS*: the speed run's peak, glibc's default allocator settings)")


def print_comparison(name: str, ratios: dict) -> None:
    if ratios:
        (tp, tc, tr), (dp, dc, dr) = ratios["tokens_per_pair"]["trl"], ratios["tokens_per_pair"]["dpop"]
        print(f"  {name}: tokens per pair (prompt+chosen+rejected, same rows): TRL {tp:.1f}+{tc:.1f}+{tr:.1f}, "
              f"dpop {dp:.1f}+{dc:.1f}+{dr:.1f} (TRL's responses keep the template's newline after the end-of-turn)")
        print(f"  {name}: dpop/TRL throughput {_fmt(ratios['throughput_ratio'], '.2f')}x (vs {ratios['trl_fastest']}), "
              f"tokens/s {_fmt(ratios['tokens_ratio'], '.2f')}x")
        print(f"  {name}: peak RSS {_fmt(ratios['rss_ratio'], '.2f')}x ({ratios['dpop_smallest']} vs "
              f"{ratios['trl_smallest']}); {ratios['dpop']} (dpop's fastest): "
              f"{_fmt(ratios['rss_ratio_fastest_dpop'], '.2f')}x, {_fmt(ratios['rss_ratio_vs_fastest'], '.2f')}x vs "
              f"{ratios['trl_fastest']}")
        if ratios.get("autocast"):
            print(f"  {name}: {ratios['dpop']} / {ratios['autocast']} pairs/s "
                  f"{_fmt(ratios['autocast_speed_ratio'], '.3f')}x (the default against plain bf16 autocast)")


def target_rows(report: dict) -> list[dict]:
    """Each target of issues 6 and 14 with its measured value; missing measurements are listed as not measured."""
    bench, long = report.get("bench_comparison", {}), report.get("long_comparison", {})
    dpop_bench = next((s for s in report.get("bench", []) if s and s["engine"] == "dpop"), None)
    curves = report.get("curves") or {}
    rows = [("throughput >= 4x TRL's best (bench)", bench.get("throughput_ratio"), TARGETS["throughput_ratio"],
             ">=", "{:.2f}x"),
            ("MFU >= 50% (bench, dpop)", dpop_bench and dpop_bench["mfu"], TARGETS["mfu"], ">=", "{:.1%}"),
            ("peak RSS <= 0.7x TRL (bench)", bench.get("rss_ratio"), TARGETS["bench_rss_ratio"], "<=", "{:.2f}x"),
            ("peak RSS <= 0.5x TRL (long)", long.get("rss_ratio"), TARGETS["long_rss_ratio"], "<=", "{:.2f}x"),
            ("default pairs/s >= bf16 autocast's (bench)", bench.get("autocast_speed_ratio"),
             TARGETS["autocast_speed_ratio"], ">=", "{:.2f}x"),
            *((f"{DEFAULT_CURVE} loss within 5% of fp32 (loss {loss}, mean over steps)",
               (curves.get(loss) or {}).get(DEFAULT_CURVE) and curves[loss][DEFAULT_CURVE]["mean_rel_diff"],
               TARGETS["curve_mean_rel_diff"], "<=", "{:.2%}") for loss in ("dpo", "sft")),
            *((f"{DEFAULT_CURVE} chosen delta, margin within max(10%, 0.3 nats) (loss {loss}, worst/allowed)",
               worst_check((curves.get(loss) or {}).get(DEFAULT_CURVE)), 1.0, "<=", "{:.2f}")
              for loss in ("dpo", "dpop"))]
    out = []
    for name, value, target, op, spec in rows:
        if value is None:
            status, shown = "NOT MEASURED", "-"
        else:
            ok = value >= target if op == ">=" else value <= target
            status, shown = ("PASS" if ok else "MISSED"), spec.format(value)
        out.append({"target": name, "value": value, "threshold": target, "status": status, "shown": shown})
    return out


def print_scaling(summaries: list) -> None:
    print("\nscaling (dpop, loss dpo, default precision, precompute; speed runs, so RSS at glibc's default settings): "
          "pairs/s and peak RSS by response length and batch")
    print(f"  {'response':>8} {'batch':>5} {'pairs/s':>8} {'tokens/s':>9} {'MFU':>6} {'peak RSS':>9} {'steps RSS':>9}")
    for s in summaries:
        if s:
            print(f"  {s['response_tokens']:8} {s['batch']:5} {s['pairs_per_s']:8.3f} {s['tokens_per_s']:9.0f} "
                  f"{_fmt(s['mfu'] and 100 * s['mfu'], '5.1f')}% {s['peak_rss_gb']:7.2f}GB "
                  f"{_fmt(s['steps_peak_rss_gb'], '7.2f')}GB")


def _malloc_text(threshold: str) -> str:
    return (f"MALLOC_MMAP_THRESHOLD_={threshold}" if threshold != "none"
            else "MALLOC_MMAP_THRESHOLD_ unset (glibc default)")


def print_header(args, machine: dict, log_dir: Path) -> None:
    flags = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in machine["flags"].items())
    print(f"dpop benchmark{' (quick)' if args.quick else ''}: {machine['cpu_model']}, {machine['logical_cpus']} cpus, "
          f"{machine['ram_gb']} GB; {flags}")
    print(f"every worker: {args.threads} torch threads, model {args.model}; speed runs: "
          f"{_malloc_text(args.speed_malloc_threshold)}; memory runs: {_malloc_text(args.malloc_threshold)}; "
          f"logs in {log_dir}")
    if machine["load_average_at_start"][0] > 0.5:
        print(f"WARNING: load average {machine['load_average_at_start'][0]:.2f}: the machine is busy, so timings "
              "are not meaningful")


def print_report(report: dict, curve_batch: int) -> None:
    print(f"\n=== results (speed: {_malloc_text(report['speed_malloc_mmap_threshold'])}; peak RSS: "
          f"{_malloc_text(report['malloc_mmap_threshold'])}; {report['threads']} threads; "
          f"load average at start {report['machine']['load_average_at_start'][0]:.2f}) ===")
    for name in ("bench", "long"):
        if name in report:
            print_table(f"{name}: {_describe(name)}", report[name])
            print_comparison(name, report[f"{name}_comparison"])
    if report.get("scaling"):
        print_scaling(report["scaling"])
    for loss, by_precision in (report.get("curves") or {}).items():
        print_curves(loss, by_precision, curve_batch)
    print("\ntargets (issues 6 and 14, ratios from this run):")
    for row in report["targets_result"]:
        print(f"  {row['target']:78} {row['shown']:>9}  {row['status']}")
    print("\nelapsed: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report["elapsed_s"].items()))


def print_curves(loss: str, by_precision: dict, curve_batch: int) -> None:
    for precision, c in by_precision.items():
        if not c:
            continue
        print(f"\ncurves (loss {loss}, {precision} vs fp32, {c['steps']} steps of {curve_batch} pairs, same pairs and "
              f"seed): loss relative difference max {c['max_rel_diff']:.2%}, mean {c['mean_rel_diff']:.2%}; median "
              f"step fp32 {c['fp32_step_s']:.2f} s, {precision} {c['step_s']:.2f} s")
        for step, check in c["checks"].items():
            shown = []
            for key, name in (("chosen_delta", "chosen delta"), ("margin_nats", "margin")):
                a, b = check[key]["fp32"], check[key]["other"]
                if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):  # sft: no reference
                    ok = "ok" if within_tolerance(a, b) else "OUT"
                    shown.append(f"{name} {b:+.3f} (fp32 {a:+.3f}, {ok})")
            if shown:
                print(f"  step {step:3}: " + ", ".join(shown))


def _describe(name: str) -> str:
    from bench_cases import make_case

    return make_case(name).describe()


