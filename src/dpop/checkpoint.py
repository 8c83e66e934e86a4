"""The run directory on disk: who may write it, checkpoints written whole or not at all, and final/.

A checkpoint dir `checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer and
scheduler state and the RNG states (torch.save of tensors, numbers and tuples only, loaded with
weights_only=True), and `state.json` (step, data position, pairs seen). It is written into a temporary dir,
flushed, then renamed into place, so a crash leaves either the previous checkpoints or a complete new one.
`final/` is written the same way and is a plain Hugging Face model dir (LoRA adapters merged) with the
tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpop.errors import ConfigError

STATE_FILE = "state.json"
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.json")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next micro-batch is (epoch, micro_index)
    micro_index: int = 0
    pairs_seen: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient: update skipped


# --- the run directory ----------------------------------------------------------------------------------

def check_run_dir(config) -> Path:
    """Refuse to mix two runs in one dir, and refuse to resume with a config that changes the math.
    Reads only: nothing is written or deleted here."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not (config.resume or config.overwrite):
        raise ConfigError(f"output_dir {run_dir} already holds files; pass --resume to continue that run, "
                          "--overwrite to replace it, or choose another --output-dir")
    if occupied and config.overwrite and not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise ConfigError(f"output_dir {run_dir} holds files that are not a dpop run; --overwrite only replaces "
                          "a run directory, so choose another --output-dir")
    if config.resume:
        saved_path = run_dir / "config.yaml"
        if not saved_path.exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start one")
        _check_same_run(saved_path, config)
    return run_dir


def _check_same_run(saved_path: Path, config) -> None:
    from dpop.config import differences, make_config, read_yaml

    saved = make_config(read_yaml(saved_path), type(config))
    changed = differences(saved, config)
    if changed:
        raise ConfigError(f"--resume: the config differs from the run's {saved_path} in keys that change "
                          f"training ({'; '.join(changed)}); resume with the run's own values, or start a new "
                          "run in another --output-dir")


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: delete the previous run (check_run_dir has made sure it is one)."""
    if run_dir.is_dir():
        shutil.rmtree(run_dir)


def save_final(run_dir: Path, model, tokenizer) -> Path:
    """Write final/ atomically: the model (LoRA adapters merged into the base) and the tokenizer."""
    final = run_dir / "final"
    staging = run_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):  # a PEFT model: training is over, merge in place
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


# --- checkpoints ----------------------------------------------------------------------------------------

def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _rng_state() -> dict:
    import numpy

    kind, keys, position, has_gauss, gauss = numpy.random.get_state(legacy=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype("int64")), position, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    numpy.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
               staging / "optimizer.pt")
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
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name])
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return state


def restore_latest(run_dir: Path, model, optimizer, scheduler) -> tuple[TrainState, Path] | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return load_checkpoint(path, model, optimizer, scheduler), path
        except Exception as error:  # truncated or corrupt files: fall back to the previous checkpoint
            warnings.warn(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); "
                          "trying the previous one", stacklevel=2)
    return None
