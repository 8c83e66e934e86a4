"""Damaged and hostile files on resume and load: a checkpoint that does not load is skipped with a warning for
the one before it (and the run still ends bit-equal to an uninterrupted one); pickled data is loaded with
weights_only, so a pickle that would run code is refused, never run; weights load only from safetensors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpop.training.loop import train

COMMON = dict(max_steps=3, save_every=1, keep_checkpoints=3, learning_rate=1e-3)


class RunsCode:
    """A pickle that, when loaded without weights_only, creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_weights(checkpoint: Path, marker: Path) -> None:
    cut_in_half(checkpoint / "weights.safetensors")


def damage_optimizer(checkpoint: Path, marker: Path) -> None:
    cut_in_half(checkpoint / "optimizer.pt")


def hostile_optimizer(checkpoint: Path, marker: Path) -> None:
    torch.save({"optimizer": RunsCode(marker), "scheduler": {}, "rng": {}}, checkpoint / "optimizer.pt")


def damage_state(checkpoint: Path, marker: Path) -> None:
    (checkpoint / "state.json").write_text('{"step": 3, "epo')


@pytest.mark.parametrize("damage", [damage_weights, damage_optimizer, hostile_optimizer, damage_state],
                         ids=["weights cut in half", "optimizer state cut in half", "optimizer pickle that runs code",
                              "state.json cut short"])
def test_a_damaged_last_checkpoint_is_skipped_for_the_previous_one(damage, tiny_config, tmp_path, capsys):
    whole = tiny_config("whole", **COMMON)
    train(whole)
    run = tiny_config("run", **COMMON)
    train(run)
    checkpoints = Path(run.output_dir) / "checkpoints"
    marker = tmp_path / "code-ran"
    damage(checkpoints / "step-3", marker)
    (Path(run.output_dir) / "final").rename(tmp_path / "old-final")

    with pytest.warns(UserWarning, match=r"checkpoint .*step-3 cannot be loaded .*; trying the previous one") as caught:
        summary = train(tiny_config("run", **COMMON, resume=True)).summary
    (warning,) = [str(w.message) for w in caught if "cannot be loaded" in str(w.message)]
    assert "\n" not in warning and "weights_only` set to `False`" not in warning  # one line, no bad advice
    assert f"resumed from {checkpoints / 'step-2'}" in capsys.readouterr().out
    assert not marker.exists()
    assert summary["steps"] == 3
    a = load_file(str(Path(whole.output_dir) / "final" / "model.safetensors"))
    b = load_file(str(Path(run.output_dir) / "final" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_when_no_checkpoint_loads_the_run_says_so_and_starts_over(tiny_config, capsys):
    run = tiny_config("run", **dict(COMMON, keep_checkpoints=1))
    train(run)
    cut_in_half(Path(run.output_dir) / "checkpoints" / "step-3" / "weights.safetensors")
    with pytest.warns(UserWarning, match="step-3 cannot be loaded"):
        summary = train(tiny_config("run", **dict(COMMON, keep_checkpoints=1), resume=True)).summary
    assert "has no loadable checkpoint; starting from step 0" in capsys.readouterr().out
    assert summary["steps"] == 3
    rows = [json.loads(line) for line in (Path(run.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]  # the old rows were dropped, not duplicated


def test_a_pickled_model_is_refused_unloaded(tiny_model_saver, tmp_path):
    from dpop.errors import ModelError
    from dpop.models import load_model

    model_dir = tiny_model_saver(tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match="holds weights only as pytorch_model.bin"):
        load_model(model_dir)
    assert not marker.exists()


def test_checkpoint_files_are_flushed_before_the_rename(tiny_config, monkeypatch):
    """Every file of a checkpoint is fsynced, and so is the dir holding it, before and after the rename."""
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    names = {}

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return real_fsync(descriptor)

    def replace(source, target, *args, **kwargs):
        names[Path(source).name] = len(synced)  # how many fsyncs had happened before this rename
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    config = tiny_config(max_steps=1, save_every=1)
    train(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    staging = checkpoints / ".step-1.partial"
    before_rename = synced[: names[staging.name]]
    expected = {str(staging / name) for name in ("weights.safetensors", "optimizer.pt", "state.json")}
    assert expected | {str(staging)} <= set(before_rename)
    assert str(checkpoints) in synced[names[staging.name]:]  # the rename itself made durable
