"""Checkpoints: written whole or not at all, loaded safely, the last K kept.

A checkpoint dir `checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer and
scheduler state (torch.save of tensors and numbers only, loaded with weights_only=True), and
`state.json` (step, data position, pairs seen, RNG). It is written into a temporary dir, flushed, then
renamed into place, so a crash leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

STATE_FILE = "state.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next micro-batch is (epoch, micro_index)
    micro_index: int = 0
    pairs_seen: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient: update skipped


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, *, keep: int) -> Path:
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    staging = root / f".step-{state.step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {name: t.contiguous().clone() for name, t in trainable_state(model).items()}
    save_file(weights, str(staging / "weights.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, staging / "optimizer.pt")
    (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from one checkpoint dir (raises if it is damaged)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "weights.safetensors"))
    expected = trainable_state(model)
    if set(weights) != set(expected):
        raise ValueError(f"{path}: weights do not match the model's trainable parameters")
    extra = torch.load(path / "optimizer.pt", weights_only=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    return TrainState(**json.loads((path / STATE_FILE).read_text()))


def restore_latest(run_dir: Path, model, optimizer, scheduler) -> tuple[TrainState, Path] | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return load_checkpoint(path, model, optimizer, scheduler), path
        except Exception as error:  # truncated or corrupt files: fall back to the previous checkpoint
            warnings.warn(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); "
                          "trying the previous one", stacklevel=2)
    return None
