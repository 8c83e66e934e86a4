"""The benchmark harness (benchmarks/bench.py) works end to end on a tiny model; its FLOPs rule and summaries
hold hand-worked values. No timing is asserted: the numbers come from `make bench` on an idle machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

from bench_flops import Work, layout_work, rows_work  # noqa: E402
from bench_report import curve_difference, summarize, target_rows, within_tolerance, worst_check  # noqa: E402

from dpop.config import resolve_precision  # noqa: E402


def _run(argv, tmp_path, *, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DPOP_CACHE=str(tmp_path / "cache"), MALLOC_MMAP_THRESHOLD_="65536", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(BENCH_DIR / "bench.py"), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=tmp_path)


def test_layout_work_by_hand():
    # prompt [p0 p1], chosen [c0 c1 c2], rejected [r0]
    # shared: 6 tokens read; attention pairs: prompt 1+2, chosen (2+1)+(2+2)+(2+3), rejected 2+1 -> 3+12+3 = 18
    assert layout_work(2, 3, 1, "shared") == Work(6, 4, 18)
    # plain: rows [p0 p1 c0 c1 c2] (1+2+3+4+5 = 15) and [p0 p1 r0] (1+2+3 = 6)
    assert layout_work(2, 3, 1, "plain") == Work(8, 4, 21)
    assert rows_work([5, 3], response_tokens=4) == Work(8, 4, 21)  # TRL's rows of the same pair
    with pytest.raises(ValueError, match="no FLOPs rule"):
        layout_work(2, 3, 1, "unknown")


def test_summarize_uses_the_median_of_timed_steps():
    steps = [{"seconds": s, "pairs": 8, "tokens": 800, "flops": 1e12, "loss": 0.69} for s in (9.0, 2.0, 4.0, 3.0)]
    result = {"label": "x", "engine": "dpop", "warmup": 1, "steps": steps, "child_peak_rss_gb": 1.5,
              "wall_s": 1.0, "load_before": 0.0, "token_lengths": {"prompt": 60, "chosen": 40, "rejected": 40}}
    summary = summarize(result, bf16_rate_gflops=1000.0)
    assert summary["step_s"] == 3.0  # median of 2, 4, 3: the warm-up step (9 s) is dropped
    assert summary["pairs_per_s"] == pytest.approx(8 / 3)
    assert summary["tokens_per_s"] == pytest.approx(800 / 3)
    assert summary["mfu"] == pytest.approx(1e12 / 3 / 1e12)


def _curve_run(losses, deltas, margins):
    return {"steps": [{"seconds": 1.0, "loss": loss, "chosen_delta": delta, "margin_nats": margin}
                      for loss, delta, margin in zip(losses, deltas, margins)]}


def test_curve_difference_checks_chosen_delta_and_margin_against_fp32():
    fp32 = _curve_run([0.7] * 12, [0.0] * 9 + [1.0, 5.0, 5.0], [0.0] * 9 + [4.0, 4.0, 4.0])
    other = _curve_run([0.77] * 12, [0.0] * 9 + [1.25, 5.0, 5.0], [0.0] * 9 + [4.5, 4.0, 4.0])
    curve = curve_difference(fp32, other)
    assert curve["mean_rel_diff"] == pytest.approx(0.1) and list(curve["checks"]) == [10]  # steps 25, 50 not reached
    # allowed: max(10%, 0.3 nats): chosen delta 1.0 -> 0.3 (0.25 off: within), margin 4.0 -> 0.4 (0.5 off: out)
    assert within_tolerance(1.0, 1.25) and not within_tolerance(4.0, 4.5)
    assert worst_check(curve) == pytest.approx(0.5 / 0.4)


def test_targets_report_missed_and_unmeasured():
    fp32 = _curve_run([0.7] * 10, [0.0] * 9 + [1.0], [0.0] * 9 + [4.0])
    curves = {"dpo": {"bf16-sr": curve_difference(fp32, _curve_run([0.77] * 10, [0.0] * 9 + [1.1], [0.0] * 9 + [4.1]))},
              "sft": {"bf16-sr": None}}
    report = {"bench_comparison": {"throughput_ratio": 3.0, "rss_ratio": 0.5, "autocast_speed_ratio": 0.96},
              "long_comparison": {}, "bench": [{"engine": "dpop", "mfu": 0.6}], "curves": curves}
    status = {row["target"]: (row["status"], row["shown"]) for row in target_rows(report)}
    assert status["throughput >= 4x TRL's best (bench)"] == ("MISSED", "3.00x")
    assert status["MFU >= 50% (bench, dpop)"] == ("PASS", "60.0%")
    assert status["peak RSS <= 0.7x TRL (bench)"] == ("PASS", "0.50x")
    assert status["peak RSS <= 0.5x TRL (long)"] == ("NOT MEASURED", "-")
    assert status["default pairs/s >= bf16 autocast's (bench)"] == ("MISSED", "0.96x")
    assert status["bf16-sr loss within 5% of fp32 (loss dpo, mean over steps)"] == ("MISSED", "10.00%")
    assert status["bf16-sr loss within 5% of fp32 (loss sft, mean over steps)"] == ("NOT MEASURED", "-")
    name = "bf16-sr chosen delta, margin within max(10%, 0.3 nats) (loss {}, worst/allowed)"
    assert status[name.format("dpo")] == ("PASS", "0.33")
    assert status[name.format("dpop")] == ("NOT MEASURED", "-")


def test_dpop_worker_quick_on_tiny_model(tiny_model_dir, tmp_path):
    out = _run(["worker", "--engine", "dpop", "--case", "bench", "--batch-size", "2", "--warmup", "1", "--steps", "2",
                "--precision", "fp32", "--model", str(tiny_model_dir), "--threads", "1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["engine"] == "dpop" and result["warmup"] == 1 and len(result["steps"]) == 3
    assert result["token_lengths"]["pairs"] == 2 * 3
    assert result["settings"]["ref_strategy"] == "precompute" and result["settings"]["loss"] == "dpo"
    assert result["peak_rss_gb"] > 0 and result["reference_pass_s"] is not None
    first = result["steps"][0]
    # step 0: the policy is the reference, so every DPO loss is log 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["pairs"] == 2 and first["tokens"] > 0 and first["flops"] > 0
    assert first["head_tokens"] < first["tokens"]  # only response tokens go through the lm head


def test_parent_quick_writes_results(tiny_model_dir, tmp_path):
    results = tmp_path / "results"
    out = _run(["--quick", "--engines", "dpop", "--case", "bench", "--model", str(tiny_model_dir),
                "--results-dir", str(results), "--threads", "1"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MALLOC_MMAP_THRESHOLD_=65536" in out.stdout and "targets" in out.stdout
    [written] = results.glob("*-quick.json")
    report = json.loads(written.read_text())
    assert report["machine"]["cpu_model"] and "torch" in report["machine"]["versions"]
    assert report["matmul"]["bf16"]["layer"] > 0
    default = resolve_precision("auto")
    assert [s["label"] for s in report["bench"]] == [f"dpop {default}+precompute loss=dpo",
                                                      f"dpop {default}+precompute loss=dpo gc=on",
                                                      f"dpop {default}+precompute loss=dpop",
                                                      "dpop bf16+precompute loss=dpo autocast"]
    # each setting ran twice: speed (glibc's default), then memory (the peak RSS reported)
    label = f"dpop {default}+precompute loss=dpo"
    assert f"{label} [memory]" in report["workers"]
    first = report["bench"][0]
    assert first["peak_rss_gb"] == report["workers"][f"{label} [memory]"]["child_peak_rss_gb"]
    assert first["speed_run_peak_rss_gb"] == report["workers"][label]["speed_run_peak_rss_gb"]
    assert {row["status"] for row in report["targets_result"]} <= {"PASS", "MISSED", "NOT MEASURED"}
