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
import logging
import os
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dpop import distributed
from dpop.errors import ConfigError

STATE_FILE = "state.json"
SHARDED_DIR = "sharded"  # FSDP2: model and optimizer shards, by torch.distributed.checkpoint
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
        elif file.is_dir():  # SHARDED_DIR
            _fsync_dir(file)
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


def _staging(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".step-{step}.partial"


def new_staging(run_dir: Path, step: int) -> Path:
    """An empty staging dir for checkpoint `step` (what was left of an interrupted one is removed)."""
    staging = _staging(run_dir, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: TrainState, *, keep: int,
                    rng_states: list[dict] | None = None, reference: dict | None = None,
                    sharded: bool = False) -> Path:
    """Write checkpoints/step-N atomically. `rng_states`: every process's `rng_state()` in process order
    (a multi-process run; default: this process's). `reference`: a changing reference's weights (TR-DPO).
    `sharded`: the weights and the optimizer state are in the staging dir's SHARDED_DIR already (FSDP2: every
    process wrote its shards there), so only the rest is written here."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    final = root / f"step-{state.step}"
    staging = _staging(run_dir, state.step) if sharded else new_staging(run_dir, state.step)
    if not sharded:
        weights = {name: t.contiguous().clone() for name, t in trainable_state(model).items()}
        save_file(weights, str(staging / "weights.safetensors"))
    if reference is not None:
        save_file(reference, str(staging / REFERENCE_FILE))
    rng_states = rng_states or [_rng_state()]
    torch.save({"optimizer": None if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states[0], "rng_by_process": rng_states}, staging / "optimizer.pt")
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
                    reference=None, load_sharded=None) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG (process `process_index`'s) from one checkpoint dir (raises
    if it is damaged); `reference` (a dpop.training.sync.ReferenceSync) gets the reference's weights back.
    `load_sharded(dir)`: loads the weights and optimizer state of an FSDP2 checkpoint (a collective)."""
    from safetensors.torch import load_file

    extra = torch.load(path / "optimizer.pt", weights_only=True)
    state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    if (load_sharded is None) == (path / SHARDED_DIR).is_dir():
        raise ValueError(f"{path}: a {'sharded' if load_sharded is None else 'whole'} checkpoint, and this run's "
                         "engine writes the other kind")
    if load_sharded is not None:
        load_sharded(path / SHARDED_DIR)
    else:
        weights = load_file(str(path / "weights.safetensors"))
        if set(weights) != set(trainable_state(model)):
            raise ValueError(f"{path}: weights do not match the model's trainable parameters")
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        optimizer.load_state_dict(extra["optimizer"])
    if reference is not None:
        reference.load_state_dict(load_file(str(path / REFERENCE_FILE)))
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra.get("rng_by_process", [extra["rng"]])[process_index])
    return state


def restore_latest(run_dir: Path, model, optimizer, scheduler, *, process_index: int = 0,
                   reference=None, load_sharded=None) -> tuple[TrainState, Path] | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return load_checkpoint(path, model, optimizer, scheduler, process_index=process_index,
                                   reference=reference, load_sharded=load_sharded), path
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


# --- a run's checkpoints --------------------------------------------------------------------------------

def save_run_checkpoint(run) -> Path:
    """Checkpoint a dpop.training.setup.Run at its step. Every process calls it (their RNG states are gathered;
    under FSDP2 each writes its shards); the main process writes the rest."""
    accelerator, config = run.accelerator, run.config
    path = run.run_dir / "checkpoints" / f"step-{run.state.step}"
    fsdp2 = distributed.uses_fsdp2(config)
    if distributed.splits_state(accelerator, config) and not fsdp2:  # refused in setup unless a stop asks for one
        logging.getLogger(__name__).warning("dpop: no checkpoint: %s splits the optimizer state",
                                            distributed.engine_name(accelerator, config))
        return path
    rng_states = distributed.gather_values(rng_state(), accelerator)
    if fsdp2:
        from dpop.distributed.fsdp import save_sharded

        staging = distributed.from_main(new_staging(run.run_dir, run.state.step) if accelerator.is_main_process
                                        else None, accelerator)  # made before any process writes into it
        with run.weights.masters():
            save_sharded(staging / SHARDED_DIR, run.scorer, run.optimizer)
    if accelerator.is_main_process:
        with run.weights.masters():
            save_checkpoint(run.run_dir, accelerator.unwrap_model(run.model), run.optimizer, run.scheduler,
                            run.state, keep=config.keep_checkpoints, rng_states=rng_states,
                            reference=run.sync.state_dict() if run.sync else None, sharded=fsdp2)
    if fsdp2:
        accelerator.wait_for_everyone()  # no process goes on (or leaves) before the checkpoint is complete
    return path


def resume_run(run) -> None:
    """Put a Run back at its newest loadable checkpoint (every process calls it)."""
    accelerator = run.accelerator
    load_sharded = None
    if distributed.uses_fsdp2(run.config):
        from dpop.distributed.fsdp import load_sharded as load

        def load_sharded(directory):
            load(directory, run.scorer, run.optimizer)
    with run.weights.masters():  # a checkpoint holds the weights without bf16-sr's dither, which is added back
        restored = restore_latest(run.run_dir, accelerator.unwrap_model(run.model), run.optimizer, run.scheduler,
                                  process_index=accelerator.process_index, reference=run.sync,
                                  load_sharded=load_sharded)
    if restored is None:
        logging.getLogger(__name__).warning("dpop: %s has no loadable checkpoint; starting from step 0", run.run_dir)
        return
    if restored[0].num_processes != accelerator.num_processes:
        raise ConfigError(f"--resume: {restored[1]} was written by {restored[0].num_processes} process(es), this run "
                          f"has {accelerator.num_processes}; resume with {restored[0].num_processes}")
    run.state, path = restored
    logging.getLogger(__name__).info("dpop: resumed from %s (step %d, %d pairs seen)", path, run.state.step,
                                     run.state.pairs_seen)
