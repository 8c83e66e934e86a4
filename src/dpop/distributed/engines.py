"""Setting a multi-process run's engine up and taking it down: DDP (accelerate's), FSDP2 (dpop's own,
dpop.distributed.fsdp) or DeepSpeed ZeRO (accelerate's, by an accelerate config; NOT verified)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from dpop.errors import ConfigError

_ENGINES_KEPT: list = []  # multi-process runs' engines, never freed before the worker leaves (see shut_down)


def shut_down(accelerator, engine=None) -> None:
    """End a run, at its end or on a stop: every process waits for the others (the main one may still be writing
    the final model), then the trackers finish and the process group is destroyed (a no-op for one process).

    On several processes the accelerator and the wrapped `engine` are kept alive until the worker leaves
    (exit_worker): freeing DDP's Reducer destroys the gloo process group it holds, whose destructor joins gloo's
    run-loop threads while this thread holds the GIL; a run-loop thread that is at that moment releasing a tensor
    waits for the GIL, and the worker hangs for ever (seen once in a test run here, torch 2.13: the main thread in
    ~ProcessGroupGloo -> std::thread::join from Reducer dealloc, a pt_gloo_runloop thread in take_gil)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        _ENGINES_KEPT.append((accelerator, engine))


def exit_worker(code: int) -> NoReturn:
    """End a process of a multi-process run with `code`, skipping the interpreter's teardown.

    destroy_process_group does not stop gloo's threads: two pt_gloo_runloop and a gloo_tcp_loop are still alive
    after it and a gc.collect(), with no DDP or ProcessGroup object left in Python (C++ keeps the group). Tearing
    the interpreter down around them aborted workers that had finished cleanly ('terminate called without an
    active exception', SIGABRT, no Python frame) in 3 of 51 two-process test runs here (torch 2.13), and in 1 of
    76 with the barrier in `shut_down`; torchrun then reports the run failed. Everything a run writes is closed
    by now (metrics, checkpoints, final model, summary), so the worker flushes its streams and logging and
    leaves at once, as multiprocessing's children do."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def uses_fsdp2(config) -> bool:
    """Whether the run shards with dpop's FSDP2 engine (engine fsdp2; check_launch sets it under an accelerate
    config with FSDP version 2)."""
    return config.engine == "fsdp2"


def engine_name(accelerator, config) -> str:
    from accelerate.utils import DistributedType

    if uses_fsdp2(config):
        return "FSDP2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "one process"


def splits_state(accelerator, config) -> bool:
    """FSDP2 and DeepSpeed split optimizer state (and, FSDP2 and ZeRO-3, the parameters) over processes."""
    from accelerate.utils import DistributedType

    return uses_fsdp2(config) or accelerator.distributed_type == DistributedType.DEEPSPEED


def splits_parameters(accelerator, config) -> bool:
    from accelerate.utils import DistributedType

    return uses_fsdp2(config) or (accelerator.distributed_type == DistributedType.DEEPSPEED
                                  and accelerator.state.deepspeed_plugin.zero_stage == 3)


def check_engine(accelerator, config) -> None:
    """Refuse what dpop cannot do under the launched engine, and hand DeepSpeed the settings dpop owns.
    Call before accelerator.prepare. The DeepSpeed path is NOT verified (docs/scaling.md); FSDP2's refusals of
    LoRA and live references are in dpop.config.checks."""
    from accelerate.utils import DistributedType

    if accelerator.gradient_accumulation_steps != 1:
        raise ConfigError(f"the accelerate config sets gradient_accumulation_steps "
                          f"{accelerator.gradient_accumulation_steps}; dpop accumulates itself: set --grad-accum "
                          f"{accelerator.gradient_accumulation_steps} and 1 (or nothing) in the accelerate config")
    if uses_fsdp2(config):
        return
    asked_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    if asked_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ConfigError(f"the accelerate config asks for DeepSpeed, but accelerate set this run up as "
                          f"{accelerator.distributed_type.value} (on a CPU, accelerate 1.15 runs a DeepSpeed config "
                          "as plain DDP); use configs/accelerate/ddp.yaml or --engine fsdp2 here, DeepSpeed on GPUs")
    name = engine_name(accelerator, config)
    if splits_state(accelerator, config) and (config.save_every or config.resume):
        raise ConfigError(f"{name} splits the optimizer state over processes, and dpop's checkpoints (save_every, "
                          "--resume) hold it whole: they work with DDP and FSDP2 only; set save_every 0, or use "
                          "--engine fsdp2 or DDP")
    if splits_parameters(accelerator, config) and (config.lora_r > 0 or config.ref_strategy == "lora"):
        raise ConfigError(f"LoRA under {name} is not supported (its adapters would be sharded and merged on one "
                          "process); LoRA's optimizer state is small: use DDP (configs/accelerate/ddp.yaml)")
    if splits_state(accelerator, config) and config.precision == "bf16-sr":
        raise ConfigError(f"precision bf16-sr under {name} is not supported (its dither is added to and taken "
                          "off whole parameters, which this engine shards); use --precision bf16 or fp32 there, "
                          "or DDP or --engine fsdp2")
    if name.startswith("DeepSpeed"):
        settings = accelerator.state.deepspeed_plugin.deepspeed_config
        settings["train_micro_batch_size_per_gpu"] = config.batch_size  # dpop has no DataLoader to read it from
        settings["gradient_clipping"] = config.max_grad_norm


def no_sync(accelerator, scorer, config):
    """A block whose backward passes accumulate gradients without the engine's reduction (all micro-batches of
    an optimizer step but the last). FSDP2 then keeps unsharded gradients until the last one reduce-scatters."""
    if not uses_fsdp2(config):
        return accelerator.no_sync(scorer)
    return _fsdp2_no_sync(scorer)


@contextlib.contextmanager
def _fsdp2_no_sync(scorer):
    scorer.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        scorer.set_requires_gradient_sync(True)


def clip_gradients(accelerator, config, parameters, max_norm: float) -> float:
    """The whole gradient's norm (clipped to max_norm when > 0) under the run's engine."""
    import torch

    if uses_fsdp2(config):
        from dpop.distributed.fsdp import grad_norm

        return grad_norm(parameters, max_norm)
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(parameters, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in parameters])))


def gathered_weights(accelerator, config, scorer) -> dict | None:
    """The whole model's weights for final/ when the engine splits the parameters (FSDP2, ZeRO-3), keyed as the
    causal LM's; a collective that every process calls; None where every process holds the weights whole."""
    if uses_fsdp2(config):
        from dpop.distributed.fsdp import full_state_dict

        return full_state_dict(scorer)
    if not splits_parameters(accelerator, config):
        return None
    state = accelerator.get_state_dict(scorer)
    return {name.removeprefix("model."): tensor for name, tensor in state.items()}
