"""Exact resume after a hard kill. A `dpop train` process (tests/train_child.py) is SIGKILLed at a random step:
before the step, halfway through its gradient accumulation, or with the step's checkpoint written but not yet
renamed into place; a metrics line torn by the kill is added for good measure. `dpop train --output-dir RUN
--resume` must then end with weights bit-equal to an uninterrupted run's (CPU, fp32), every step training on
the same pairs, no pair skipped or seen twice, no step logged twice.

The kill step is drawn afresh each run and printed on failure; DPOP_CRASH_SEED=N replays one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpop.training.loop
from dpop.cli import main

CHILD = Path(__file__).with_name("train_child.py")
SEED = int(os.environ.get("DPOP_CRASH_SEED", random.SystemRandom().randrange(2**32)))
# 16 pairs in micro-batches of 2 -> 8 a epoch; 3 per step -> steps of 3, 3 and 2 micro-batches an epoch (a step
# ends with its epoch), so steps 3 and 6 end an epoch and every other checkpoint (one a step) lies mid-epoch.
PAIRS, BATCH, ACCUM, STEPS = 16, 2, 3, 6


def train_args(run_dir, model_dir, data) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run_dir),
            "--precision", "fp32", "--max-length", "256", "--batch-size", str(BATCH), "--grad-accum", str(ACCUM),
            "--max-steps", str(STEPS), "--learning-rate", "1e-3", "--save-every", "1", "--keep-checkpoints", "2"]


def record_steps(monkeypatch) -> list:
    """(step, pairs of each micro-batch) for every step this process completes from now on."""
    seen, real_step = [], dpop.training.loop.train_step

    def recording(run, batches):
        number = run.state.step + 1
        row = real_step(run, batches)
        seen.append((number, [list(mb.pair_indices) for mb in batches]))
        return row

    monkeypatch.setattr(dpop.training.loop, "train_step", recording)
    return seen


def start_child(tmp_path, argv, pause, release=None) -> tuple[subprocess.Popen, Path, Path]:
    """Start train_child.py and wait until it pauses; returns (process, its pairs log, its output file)."""
    pairs_log, marker, output = tmp_path / "child-pairs.jsonl", tmp_path / "child-paused", tmp_path / "child.out"
    spec = dict(argv=argv, pairs_log=str(pairs_log), marker=str(marker), pause=pause,
                release=str(release) if release else None)
    with open(output, "w") as out:
        process = subprocess.Popen([sys.executable, str(CHILD), json.dumps(spec)], stdout=out,
                                   stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 600  # a guard against a hung child, not a measurement
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(f"the child exited ({process.returncode}) before pausing at {pause}:\n{output.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the child never paused at {pause}:\n{output.read_text()}")
        time.sleep(0.05)
    return process, pairs_log, output


def logged_steps(pairs_log: Path) -> list:
    return [(row["step"], row["pairs"]) for row in map(json.loads, pairs_log.read_text().splitlines())]


def train_rows(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row for row in rows if row["split"] == "train"]


@pytest.mark.parametrize("phase", ["step", "accumulation", "checkpoint"])
def test_a_run_killed_at_a_random_step_resumes_bit_exactly(phase, tiny_model_dir, pairs_file, tmp_path, dpop_cache,
                                                           monkeypatch, capsys):
    kill_step = random.Random(f"{SEED}-{phase}").randint(2, STEPS - 1)
    context = f"phase {phase}, kill at step {kill_step} (DPOP_CRASH_SEED={SEED})"

    whole_steps = record_steps(monkeypatch)
    assert main(train_args(tmp_path / "whole", tiny_model_dir, pairs_file)) == 0
    monkeypatch.undo()

    run_dir = tmp_path / "killed"
    child, pairs_log, output = start_child(tmp_path, train_args(run_dir, tiny_model_dir, pairs_file),
                                           {"phase": phase, "step": kill_step})
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, context
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    last_good = kill_step - 1
    expected = [f"step-{last_good - 1}", f"step-{last_good}"] if last_good > 1 else ["step-1"]
    if phase == "checkpoint":  # complete, but never renamed: not a checkpoint
        expected = [f".step-{kill_step}.partial", *expected]
    assert checkpoints == expected, context
    assert not (run_dir / "final").exists()

    with open(run_dir / "metrics.jsonl", "a") as metrics:  # and a line torn by a kill in the middle of a write
        metrics.write('{"loss": 0.69, "rewards/chosen": 0.0, "st')

    capsys.readouterr()
    resumed_steps = record_steps(monkeypatch)
    assert main(["train", "--output-dir", str(run_dir), "--resume"]) == 0, context
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{last_good}'}" in capsys.readouterr().out, context

    # The steps that count: the killed run's up to its last checkpoint, then the resumed run's.
    effective = [entry for entry in logged_steps(pairs_log) if entry[0] <= last_good] + resumed_steps
    assert [step for step, _ in effective] == list(range(1, STEPS + 1)), context
    assert effective == whole_steps, context
    order = [pair for _, micro_batches in effective for batch in micro_batches for pair in batch]
    assert [len(micro_batches) for _, micro_batches in effective] == [3, 3, 2, 3, 3, 2], context
    assert len(order) == 2 * PAIRS == 32
    assert Counter(order[:PAIRS]) == Counter(order[PAIRS:]) == Counter(range(PAIRS)), context

    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), context  # no step logged twice
    assert rows[-1]["pairs_seen"] == 32 and json.loads((run_dir / "summary.json").read_text())["pairs_seen"] == 32
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".partial")]

    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(run_dir / "final" / "model.safetensors"))
    assert set(whole) == set(resumed)
    assert [name for name in whole if not torch.equal(whole[name], resumed[name])] == [], context
