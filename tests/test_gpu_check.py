"""benchmarks/gpu_check.py (`make gpu-check`): refuses clearly without CUDA; its code paths run tiny on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(argv, tmp_path, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env)
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)


def test_without_cuda_it_exits_2_and_says_why(tmp_path):
    done = _run(["--results-dir", str(tmp_path)], tmp_path, CUDA_VISIBLE_DEVICES="")  # no GPU, even on one
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
    assert not list(tmp_path.glob("*.json"))


@pytest.mark.slow  # not the builtin model, but 2 minutes: with the slow tests, out of `make test-fast`
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run is the CPU stand-in for the real check")
def test_cpu_smoke_runs_every_part_and_writes_results(tiny_model_dir, tmp_path):
    """~2 minutes on 2 cores: the layout runs, a curve per precision, TRL and dpop bench workers."""
    done = _run(["--cpu-smoke", "--model", str(tiny_model_dir), "--results-dir", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [written] = tmp_path.glob("gpu-check-*-cpu-smoke.json")
    report = json.loads(written.read_text())
    assert report["failures"] == [] and report["layouts"]["passed"]
    assert set(report["layouts"]["checks"]) == {"plain", "shared", "packed"}
    assert report["curves"]["dpo"]["bf16-sr"]["max_rel_diff"] < 0.05
    assert [row["label"] for row in report["bench"]] == ["TRL bf16+precompute", "dpop loss=dpo", "dpop loss=dpop"]
    assert all(row["pairs_per_s"] > 0 and row["mfu"] > 0 for row in report["bench"])
