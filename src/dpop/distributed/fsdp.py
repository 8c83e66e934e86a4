"""dpop's FSDP2 engine: torch's `fully_shard` applied by dpop itself, one unit per decoder layer plus the root.

    dpop train --num-processes 2 --engine fsdp2 ...
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m dpop train ...   # the same engine

Why dpop shards and not accelerate: accelerate 1.15 on a CPU maps an FSDP2 plugin to MULTI_CPU, i.e. DDP, so
its FSDP path cannot be checked here, and its prepare() would wrap the causal LM while dpop's log-prob routine
calls the decoder stack and the lm head itself (dpop.scoring.logprobs.PolicyScorer). Sharding the scorer as the
root (embeddings, final norm and the tied lm head) and each decoder layer as its own unit makes every forward
the engine must see go through a hooked module, on CPU (gloo) and GPU (NCCL) alike.

Each parameter becomes a DTensor sharded on dim 0 (torch.chunk's split: rank r holds rows
[r·⌈n/N⌉, (r+1)·⌈n/N⌉)); its local shard is a flat contiguous range of the whole tensor, which is what bf16-sr's
per-element dither needs to give every shard the thresholds the whole tensor would get (`flat_ranges`).
Gradients are reduce-scattered and AVERAGED over processes, as DDP averages them, so dpop's loss scaling holds.
Checkpoints: model and optimizer by torch.distributed.checkpoint (each process writes its shards into
step-N/sharded/); final/: the full state dict gathered to the main process, a normal HF model dir.
"""

from __future__ import annotations

import warnings

import torch

from dpop.errors import ConfigError


def fsdp2_launched() -> dict | None:
    """The FSDP settings of an `accelerate launch --config_file F` with an FSDP config (its environment), or None.
    Raises ConfigError for what dpop's FSDP2 engine does not do (FSDP1, CPU offload, accelerate's activation
    checkpointing)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return None
    version = int(os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {version}; dpop runs FSDP2 only (torch's "
                          "fully_shard): set fsdp_version: 2 (configs/accelerate/fsdp2.yaml) or use DDP")
    for name, what, fix in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", "false"),
                            ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing",
                             "false and pass dpop's --gradient-checkpointing")):
        if os.environ.get(name, "false").lower() in ("1", "true"):
            raise ConfigError(f"the accelerate config sets {what}: true, which dpop's FSDP2 engine does not do "
                              f"(not verified); set it to {fix}")
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("1", "true", "full_shard")
    return {"reshard_after_forward": reshard}


def shard(scorer: torch.nn.Module, device: torch.device, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard `scorer` (a PolicyScorer) in place over every process: each decoder layer, then the scorer as root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # The root's forward returns SequenceLogps, whose per-pair sums are views of one tensor; FSDP2 warns on each
    # that an in-place op on it could corrupt gradients. dpop's losses never write into them (the equivalence
    # tests compare gradients with a single process), so the warning would only be noise on every run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    layer_classes = tuple(_decoder_layer_classes(scorer))
    for module in scorer.modules():
        if isinstance(module, layer_classes):
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(scorer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return scorer


def _decoder_layer_classes(scorer) -> list[type]:
    names = set(getattr(scorer, "_no_split_modules", None) or ())
    classes = {type(m) for m in scorer.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(f"engine fsdp2: {type(scorer.model).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by; use --engine ddp")
    return sorted(classes, key=lambda c: c.__name__)


def local_parameters(model) -> list[tuple[str, torch.Tensor]]:
    """(name, this process's shard as a plain tensor sharing the parameter's storage) of each trainable
    parameter; in-place changes to it (bf16-sr's dither) are changes to the sharded parameter."""
    return [(name, p.to_local().detach()) for name, p in model.named_parameters() if p.requires_grad]


def flat_ranges(model) -> dict[str, tuple[int, int]]:
    """name -> (offset of this process's shard in the flattened whole tensor, the whole tensor's numel)."""
    ranges = {}
    for name, p in model.named_parameters():
        if hasattr(p, "_local_tensor"):
            rows = p.shape[0]
            world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
            per_rank = -(-rows // world)  # torch.chunk's split: ceil(rows / world)
            start_row = min(rows, rank * per_rank)
            ranges[name] = (start_row * (p.numel() // max(rows, 1)), p.numel())
    return ranges


def grad_norm(parameters, max_norm: float) -> float:
    """The whole gradient's norm over every process (a collective), clipping to max_norm when > 0."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


def full_state_dict(scorer) -> dict[str, torch.Tensor]:
    """The causal LM's whole state dict, keyed as the LM's own, on the main process (empty elsewhere); a
    collective every process calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(scorer, options=options)
    # a tied weight (the lm head's) is gathered under both names; keep the one named_parameters names, as
    # save_pretrained does for a whole model
    kept = {name for name, _ in scorer.named_parameters()} | {name for name, _ in scorer.named_buffers()}
    return {name.removeprefix("model."): tensor for name, tensor in state.items() if name in kept}


def save_sharded(directory, scorer, optimizer) -> None:
    """The model's and the optimizer's shards into `directory` (every process writes its own; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(scorer, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory, scorer, optimizer) -> None:
    """What save_sharded wrote back into the sharded model and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(scorer, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(scorer, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
