"""Non-finite steps: a step whose loss or gradient is not finite leaves the weights and the optimizer alone and is
counted in skipped_steps; max_bad_steps of them in a row stop the run with a message naming the step and the
last good checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch

import dpop.losses
import dpop.training.loop
from dpop.cli import main
from dpop.errors import TrainingError
from dpop.training.loop import train


def make_steps_non_finite(monkeypatch, bad_steps, *, where: str) -> dict:
    """Make step n's loss (where="loss": NaN losses, so NaN gradients too) or only its gradient
    (where="gradient": the recorded losses stay finite) non-finite for n in `bad_steps`. Returns
    {step: trainable weights after it}."""
    current, weights = {}, {}
    real_step, real_losses, real_micro = dpop.training.loop.train_step, dpop.losses.sequence_loss, dpop.training.loop._micro_batch_loss

    def train_step(run, batches):
        current["step"] = run.state.step + 1
        row = real_step(run, batches)
        weights[current["step"]] = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        return row

    def sequence_loss(*args, **kwargs):
        losses, chosen_rewards, rejected_rewards = real_losses(*args, **kwargs)
        if where == "loss" and current["step"] in bad_steps:
            losses = losses * math.nan
        return losses, chosen_rewards, rejected_rewards

    def micro_batch_loss(*args, **kwargs):
        loss, tokens = real_micro(*args, **kwargs)
        if where == "gradient" and current["step"] in bad_steps:
            loss = loss * math.inf  # its gradient is ±inf or NaN; the per-pair losses recorded are untouched
        return loss, tokens

    monkeypatch.setattr(dpop.training.loop, "train_step", train_step)
    monkeypatch.setattr(dpop.losses, "sequence_loss", sequence_loss)  # what every Objective calls
    monkeypatch.setattr(dpop.training.loop, "_micro_batch_loss", micro_batch_loss)
    return weights


def train_rows(run_dir) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [row for row in rows if row["split"] == "train"]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_steps_are_skipped_counted_and_not_checkpointed(where, tiny_config, monkeypatch):
    weights = make_steps_non_finite(monkeypatch, {2, 3}, where=where)
    config = tiny_config(max_steps=5, learning_rate=1e-3, save_every=1, keep_checkpoints=10, max_bad_steps=3,
                         log_every=5)
    summary = train(config).summary

    assert summary["steps"] == 5 and summary["skipped_steps"] == 2
    assert same(weights[1], weights[2]) and same(weights[2], weights[3])  # no update, not even a partial one
    assert not same(weights[3], weights[4]) and not same(weights[4], weights[5])  # and training goes on
    assert all(torch.isfinite(value).all() for value in weights[5].values())  # the optimizer state stayed finite
    rows = train_rows(Path(config.output_dir))
    # log_every 5 logs step 5 only, but a skipped step is always logged
    assert [(row["step"], row["skipped_steps"]) for row in rows] == [(2, 1), (3, 2), (5, 2)]
    assert rows[0]["grad_norm"] is None  # NaN/inf written as null
    assert (rows[0]["loss"] is None) == (where == "loss")
    checkpoints = Path(config.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-1", "step-4", "step-5"]


def test_max_bad_steps_in_a_row_stop_the_run_naming_the_step_and_the_last_good_checkpoint(
        tiny_model_dir, pairs_file, tmp_path, dpop_cache, monkeypatch, capsys):
    make_steps_non_finite(monkeypatch, {3, 4, 5, 6}, where="loss")
    run_dir = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(run_dir),
            "--precision", "fp32", "--max-length", "256", "--batch-size", "2", "--max-steps", "6",
            "--learning-rate", "1e-3", "--save-every", "1", "--max-bad-steps", "2"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dpop train: error: ")]
    assert line.startswith("dpop train: error: step 4: the loss or gradient was not finite in 2 steps in a row "
                           "(steps 3-4, max_bad_steps 2)")
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / 'step-2'}" in line
    assert f"dpop train --output-dir {run_dir} --resume" in line
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2, 3, 4]
    assert not (run_dir / "final").exists() and not (run_dir / "summary.json").exists()

    # The way on that the message offers: resume from step 2 with the guard off; steps 3-6 are all skipped.
    assert main(["train", "--output-dir", str(run_dir), "--resume", "--max-bad-steps", "0"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == 4


def test_without_a_checkpoint_before_the_streak_the_message_says_so(tiny_config, monkeypatch):
    make_steps_non_finite(monkeypatch, {1, 2}, where="gradient")
    with pytest.raises(TrainingError, match=r"step 2: .* \(steps 1-2, max_bad_steps 2\).* No checkpoint was "
                                            r"written before them"):
        train(tiny_config(max_steps=4, max_bad_steps=2, save_every=1))
