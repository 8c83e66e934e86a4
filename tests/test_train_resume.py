"""Checkpoints and resume: a resumed run ends bit-exactly where an uninterrupted one does (CPU, fp32)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpop.training.loop
from dpop.errors import ConfigError
from dpop.training.loop import train


def final_weights(config):
    return load_file(str(Path(config.output_dir) / "final" / "model.safetensors"))


def assert_bit_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different


def steps_logged(config):
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [(row["split"], row["step"]) for row in map(json.loads, lines)]


def count_steps(monkeypatch) -> list:
    """Record the step index of every train_step call from now on."""
    calls, real_step = [], dpop.training.loop.train_step

    def counting(run, batches):
        calls.append(run.state.step + 1)
        return real_step(run, batches)

    monkeypatch.setattr(dpop.training.loop, "train_step", counting)
    return calls


def train_until_a_crash_in_step(step: int, config, monkeypatch) -> None:
    """train(config), dying (KeyboardInterrupt) as optimizer step `step` begins; train_step is restored after."""
    real_step = dpop.training.loop.train_step

    def dies(run, batches):
        if run.state.step == step - 1:
            raise KeyboardInterrupt
        return real_step(run, batches)

    monkeypatch.setattr(dpop.training.loop, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(dpop.training.loop, "train_step", real_step)


COMMON = dict(max_steps=4, save_every=2, learning_rate=1e-3, batch_size=3, grad_accum=2)


@pytest.mark.parametrize("precision", ["fp32", "bf16-sr"])
def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_config, eval_pairs_file, monkeypatch, precision):
    """Linear decay over 4 steps, checkpoints every 2; the run dies in step 3 and is resumed. Under bf16-sr the
    checkpoint holds the fp32 masters and the resumed run rounds them as the uninterrupted one did."""
    common = dict(COMMON, eval_data=str(eval_pairs_file), eval_every=1, precision=precision)
    uninterrupted = tiny_config("whole", **common)
    train(uninterrupted)

    crashing = tiny_config("crashed", **common)
    train_until_a_crash_in_step(3, crashing, monkeypatch)
    assert not (Path(crashing.output_dir) / "final").exists()
    assert steps_logged(crashing)[-1] == ("eval", 2)

    calls = count_steps(monkeypatch)
    train(tiny_config("crashed", **common, resume=True))
    assert calls == [3, 4]
    assert_bit_equal(final_weights(uninterrupted), final_weights(crashing))
    assert steps_logged(crashing) == steps_logged(uninterrupted)  # no step logged twice


def test_a_short_run_resumed_to_more_steps_equals_the_long_run(tiny_config, monkeypatch):
    """A fresh 2-step run, then --resume with max_steps 4 (constant lr, so the schedule does not depend on
    the planned length) ends with the weights of a 4-step run."""
    common = dict(COMMON, scheduler="constant")
    long = tiny_config("long", **common)
    long_summary = train(long).summary
    short = tiny_config("short", **dict(common, max_steps=2))
    train(short)
    checkpoints = Path(short.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2"]
    calls = count_steps(monkeypatch)
    summary = train(tiny_config("short", **common, resume=True)).summary
    assert calls == [3, 4]
    assert summary["steps"] == 4 and summary["pairs_seen"] == long_summary["pairs_seen"] == 22  # 16 + 6
    assert_bit_equal(final_weights(long), final_weights(short))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]


def test_resume_refuses_a_config_that_changes_the_math(tiny_config):
    train(tiny_config("run", max_steps=2, save_every=1))
    with pytest.raises(ConfigError, match=r"beta: 0\.3 -> 0\.5"):
        train(tiny_config("run", max_steps=3, beta=0.5, resume=True))
    with pytest.raises(ConfigError, match="no config.yaml"):
        train(tiny_config("empty", resume=True))


def test_keep_checkpoints_prunes_old_ones_and_a_damaged_one_is_skipped(tiny_config):
    config = tiny_config("run", max_steps=3, save_every=1, keep_checkpoints=2)
    train(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-3"]
    (checkpoints / "step-3" / "weights.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="step-3 cannot be loaded"):
        summary = train(tiny_config("run", max_steps=3, save_every=1, keep_checkpoints=2, resume=True)).summary
    assert summary["steps"] == 3  # step 3 redone from step 2
