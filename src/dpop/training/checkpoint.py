"""The run directory on disk: who may write it, checkpoints written whole or not at all, and final/.

A checkpoint dir `checkpoints/step-N/` holds the trainable weights (safetensors), the optimizer and
scheduler state and the RNG states (torch.save of tensors, numbers and tuples only, loaded with
weights_only=True), and `state.json` (step, data position, pairs seen). It is written into a temporary dir,
flushed, then renamed into place, so a crash leaves either the previous checkpoints or a complete new one.
`final/` is written the same way and is a plain Hugging Face model dir (LoRA adapters merged) with the
tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`; with `lora_save: adapter` it holds the peft
adapter and the tokenizer instead (dpop.models.load_model and peft's AutoPeftModelForCausalLM load it).
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
REFERENCE_FILE = "reference.safetensors"  # TR-DPO: the reference has moved since the start
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "summary.json")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the next micro-batch is (epoch, micro_index)
    micro_index: int = 0
    pairs_seen: int = 0
    skipped_steps: int = 0  # non-finite loss or gradient: update skipped
    num_processes: int = 1  # the run's process count; a resume must keep it (dpop.distributed)


# --- the run directory ----------------------------------------------------------------------------------

def check_run_dir(config) -> Path:
    """Refuse to mix two runs in one dir, and refuse to resume with a config that changes the math.
    Reads only: nothing is written or deleted here."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory")
    _check_creatable(run_dir)
    from dpop.scoring.reference import GUIDE_DIR

    # a Pre-DPO run's guide, trained first into the run dir, does not occupy it for the run itself
    guided = config.ref_strategy == "guided"
    occupied = run_dir.is_dir() and any(not (guided and p.name == GUIDE_DIR) for p in run_dir.iterdir())
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


def _check_creatable(run_dir: Path) -> None:
    """Fail now, not after the model has loaded, when the run dir cannot be made: the nearest existing
    ancestor must be a directory we may write to."""
    ancestor = run_dir.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"output_dir {run_dir} cannot be created: {ancestor} is a file, not a directory")
    if not run_dir.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir} cannot be created: no permission to write in {ancestor}")


def make_run_dir(run_dir: Path) -> None:
    """Create the run dir (after setup has succeeded); a failure is one line naming the dir."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output_dir {run_dir} cannot be created: {error.strerror or error}") from None


def _check_same_run(saved_path: Path, config) -> None:
    from dpop.config import differences, make_config
    from dpop.config.flags import read_yaml

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


def save_final(run_dir: Path, model, tokenizer, *, adapter_only: bool = False, state_dict: dict | None = None) -> Path:
    """Write final/ atomically: the model (LoRA adapters merged into the base) and the tokenizer. With
    `adapter_only` and a PEFT model: adapter_config.json (naming the base model) + adapter_model.safetensors.
    `state_dict`: the weights to write instead of the model's own (gathered whole from a sharding engine)."""
    final = run_dir / "final"
    staging = run_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft and adapter_only:
        model.save_pretrained(staging)
        (staging / "README.md").unlink(missing_ok=True)  # peft's model-card template, all placeholders
    else:
        if is_peft:  # training is over: merge in place
            model = _merged(model, run_dir / ".final.adapter")
        model.config.use_cache = True
        model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def _merged(model, scratch: Path):
    """The PEFT model's adapters merged into its base. A 4-bit (QLoRA) base would round the merged weights back
    to 4 bits, so its adapter is merged into the base reloaded in fp32 instead (UNVERIFIED: needs CUDA)."""
    if getattr(model.config, "quantization_config", None) is None:
        return model.merge_and_unload()
    from dpop.models import load_model

    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    merged = load_model(scratch)[0]
    shutil.rmtree(scratch, ignore_errors=True)
    return merged


# --- checkpoints ----------------------------------------------------------------------------------------

def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _fsync_dir(path: Path) -> None:
    """Flush every file of `path` and then its directory entries, so that after the rename that follows, a
    power cut cannot leave a checkpoint whose names exist but whose bytes never reached the disk."""
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_entries(path)


def _fsync_entries(directory: Path) -> None:
    """Flush a directory's entries (a rename into it, a file created in it)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def rng_state() -> dict:
    """This process's RNG states (torch, python, numpy, cuda), as a checkpoint stores them."""
    return _rng_state()


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


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, *, keep: int,
                    rng_states: list[dict] | None = None, reference: dict | None = None) -> Path:
    """Write checkpoints/step-N atomically. `rng_states`: every process's `rng_state()` in process order
    (a multi-process run; default: this process's). `reference`: a changing reference's weights (TR-DPO)."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step}"
    staging = root / f".step-{state.step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    weights = {name: t.contiguous().clone() for name, t in trainable_state(model).items()}
    save_file(weights, str(staging / "weights.safetensors"))
    if reference is not None:
        save_file(reference, str(staging / REFERENCE_FILE))
    rng_states = rng_states or [_rng_state()]
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states[0],
                "rng_by_process": rng_states}, staging / "optimizer.pt")
    (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    _fsync_dir(staging)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    _fsync_entries(root)
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


def load_checkpoint(path: Path, model, optimizer, scheduler, *, process_index: int = 0,
                    reference=None) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG (process `process_index`'s) from one checkpoint dir (raises
    if it is damaged); `reference` (a dpop.training.sync.ReferenceSync) gets the reference's weights back."""
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
    if reference is not None:
        reference.load_state_dict(load_file(str(path / REFERENCE_FILE)))
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra.get("rng_by_process", [extra["rng"]])[process_index])
    return state


def restore_latest(run_dir: Path, model, optimizer, scheduler, *, process_index: int = 0,
                   reference=None) -> tuple[TrainState, Path] | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return load_checkpoint(path, model, optimizer, scheduler, process_index=process_index,
                                   reference=reference), path
        except Exception as error:  # truncated or corrupt files: fall back to the previous checkpoint
            warnings.warn(f"checkpoint {path} cannot be loaded ({_load_failure(error)}); trying the previous one",
                          stacklevel=2)
    return None


def _load_failure(error: Exception) -> str:
    """Why a checkpoint did not load, in one line. torch's weights_only refusal runs to paragraphs that suggest
    weights_only=False, the one thing not to do with a file that fails it."""
    import pickle

    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "optimizer.pt holds pickled objects other than tensors and numbers; refused without running them"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no detail'}"
