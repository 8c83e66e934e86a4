"""SIGINT / SIGTERM: the step in progress finishes, a checkpoint is written (even with save_every 0), the run
exits 0 printing the command that resumes it, and that command ends bit-equal to a run never stopped. A second
signal stops at once."""

import json
import os
import shlex
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_crash_resume import record_steps, start_child

import dpop.training.loop
from dpop.cli import main


def train_args(run_dir, model_dir, data, *extra) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run_dir),
            "--precision", "fp32", "--max-length", "256", "--batch-size", "3", "--grad-accum", "2",
            "--max-steps", "4", "--learning-rate", "1e-3", *extra]


def final_weights(run_dir) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def signal_during_step(monkeypatch, number: int, signum: int, times: int = 1) -> None:
    """Deliver `signum` to this process `times` times just as step `number` begins."""
    real_step = dpop.training.loop.train_step

    def signalling(run, batches):
        if run.state.step + 1 == number:
            for _ in range(times):
                signal.raise_signal(signum)
        return real_step(run, batches)

    monkeypatch.setattr(dpop.training.loop, "train_step", signalling)


def resume_command(stdout: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if "Resume with: " in line]
    return shlex.split(line.split("Resume with: ", 1)[1])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_checkpoints_and_the_printed_command_resumes(
        signum, tiny_model_dir, pairs_file, tmp_path, dpop_cache, monkeypatch, capsys):
    assert main(train_args(tmp_path / "whole", tiny_model_dir, pairs_file)) == 0
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    run_dir = tmp_path / "stopped"
    signal_during_step(monkeypatch, 2, signum)
    capsys.readouterr()
    assert main(train_args(run_dir, tiny_model_dir, pairs_file)) == 0  # save_every 0: no checkpoint but this one
    out = capsys.readouterr().out
    name = signal.Signals(signum).name
    assert f"dpop: stopped by {name} after step 2 of 4; checkpoint {run_dir / 'checkpoints' / 'step-2'}" in out
    assert {number: signal.getsignal(number) for number in before} == before  # handlers given back
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    command = resume_command(out)
    assert command == ["dpop", "train", "--output-dir", str(run_dir), "--resume"]
    monkeypatch.undo()
    steps = record_steps(monkeypatch)
    assert main(command[1:]) == 0
    assert [number for number, _ in steps] == [3, 4]
    assert_bit_equal(final_weights(tmp_path / "whole"), final_weights(run_dir))


def test_a_second_signal_stops_at_once_without_a_checkpoint(tiny_model_dir, pairs_file, tmp_path, dpop_cache,
                                                            monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)
    signal_during_step(monkeypatch, 2, signal.SIGINT, times=2)
    run_dir = tmp_path / "run"
    assert main(train_args(run_dir, tiny_model_dir, pairs_file, "--save-every", "1")) == 130
    assert "dpop train: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1"]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_from_outside_stops_a_cli_process_with_exit_0(tiny_model_dir, pairs_file, tmp_path, dpop_cache):
    """A real `kill -TERM` to a training process paused at the start of step 2."""
    run_dir, release = tmp_path / "run", tmp_path / "release"
    child, pairs_log, output = start_child(tmp_path, train_args(run_dir, tiny_model_dir, pairs_file),
                                           {"phase": "step", "step": 2}, release=release)
    os.kill(child.pid, signal.SIGTERM)
    release.write_text("")
    assert child.wait(timeout=600) == 0, output.read_text()
    text = output.read_text()
    assert "SIGTERM received: stopping after the current step" in text
    assert f"Resume with: dpop train --output-dir {run_dir} --resume" in text
    assert [json.loads(line)["step"] for line in pairs_log.read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]


def test_train_called_from_python_raises_run_stopped(tiny_config, monkeypatch):
    """A caller that would go on to use final/ (the demo's SFT stage) must not carry on as if the run were done."""
    from dpop.training.loop import train
    from dpop.training.stopping import RunStopped

    signal_during_step(monkeypatch, 1, signal.SIGTERM)
    config = tiny_config(max_steps=3)
    with pytest.raises(RunStopped, match="stopped by SIGTERM after step 1 of 3") as stopped:
        train(config)
    assert stopped.value.step == 1 and stopped.value.checkpoint.is_dir()
