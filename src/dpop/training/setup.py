"""Everything a run needs before its first step, built once by `setup`: the validated config, data, model (LoRA,
precision), reference, optimizer, schedule and accelerator. Nothing is written to the run dir here except the
removal of an old run on --overwrite, once everything else has succeeded."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dpop import distributed, precision
from dpop.config import TrainConfig, make_config, resolve
from dpop.data.order import steps_per_epoch
from dpop.data.runs import load_run_pairs, tokenize_run_pairs
from dpop.errors import ConfigError
from dpop.losses.objective import Objective, objective_of
from dpop.scoring.logprobs import PolicyScorer, backbone_and_head
from dpop.scoring.reference import build_reference
from dpop.training.checkpoint import TrainState, check_run_dir, clear_run_dir
from dpop.training.monitor import check_trackers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What a Python caller hands `train` instead of paths: a model and its tokenizer (trained in place), and
    pairs in memory (row dicts, a datasets.Dataset, LoadedPairs or PreferencePairs). None: from the config."""

    model: torch.nn.Module | None = None
    tokenizer: object | None = None
    data: object | None = None
    eval_data: object | None = None

    def __post_init__(self):
        if (self.model is None) != (self.tokenizer is None):
            raise ConfigError("train(model=..., tokenizer=...): give both the model and its tokenizer, or neither "
                              "(then config.model names the model to load)")


@dataclass
class Run:
    """Everything the steps need, built once by `setup`."""

    config: TrainConfig  # resolved: no "auto" or None left where a value is needed
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    accelerator: object
    data: object  # RunData
    reference: object | None  # callable (batch, pair_indices) -> RefLogps, or None (a reference-free loss)
    eval_reference: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    objective: Objective  # the loss, or the weighted losses, with their options from the config
    state: TrainState = field(default_factory=TrainState)
    scorer: torch.nn.Module | None = None  # what the engine wraps: every policy forward goes through it
    weights: precision.TrainedWeights | None = None  # the trainable parameters (bf16-sr's dither, precision/*)
    sync: object | None = None  # dpop.training.sync.ReferenceSync under TR-DPO's sync_ref_model

    @property
    def world_batch(self) -> int:
        """Pairs in one micro-batch of all processes together."""
        return self.config.batch_size * self.accelerator.num_processes

    def layout(self, **extra) -> dict:
        return dict(layout=self.config.layout, pad_id=self.tokenizer.pad_token_id,
                    pack_length=self.config.max_length, **extra)


def _disable_dropout(model) -> None:
    """Zero every dropout, also the attention dropout modules keep as a float (Llama's attention_dropout),
    so the policy in train mode computes exactly what the reference computes in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if config.lora_target == "all-linear" else [
        name.strip() for name in config.lora_target.split(",") if name.strip()]
    # No LoRA dropout: with it, the policy at step 0 would not compute what the reference computes.
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0,
                      use_dora=config.lora_dora, task_type="CAUSAL_LM")
    base = model.name_or_path
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:
        raise ConfigError(f"lora_target {config.lora_target!r}: {error}") from None
    if base and Path(base).exists():  # an adapter-only final/ must find its base from any working dir
        model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    if config.lora_dora:
        _match_dora_magnitudes(model)
    return model


@torch.no_grad()
def _match_dora_magnitudes(model) -> None:
    """DoRA's forward divides the magnitude by ‖W + ΔW‖ computed in the adapters' dtype (fp32), but peft sets the
    magnitude while the adapters still have the base weights' dtype: with bf16 weights the ratio is then
    1 ± 2^-9, not 1, and the untrained policy already differs from its reference (step-0 rewards ~1e-4).
    Recompute each magnitude exactly as the forward computes the norm, so the ratio is exactly 1 at step 0."""
    from peft.utils.integrations import dequantize_module_weight

    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        for name, dora in (magnitudes or {}).items():
            dtype = module.lora_A[name].weight.dtype  # the forward casts its input, and so W, to this dtype
            weight = dequantize_module_weight(module.get_base_layer()).to(dtype)
            delta = dora.get_lora_weight(lora_A=module.lora_A[name], lora_B=module.lora_B[name]).to(dtype)
            dora.weight.copy_(dora.get_weight_norm(weight, delta, module.scaling[name]))


def _quantization_config(config: TrainConfig):
    """QLoRA (Dettmers et al. 2023): NF4 base weights with double quantization, matmuls in the run's precision.
    UNVERIFIED: written for CUDA + bitsandbytes, which the project's machines lack (config.resolve refuses a
    run without them); the path is kept this small on purpose."""
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if precision.uses_bf16(config.precision) else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_model(config: TrainConfig, inputs: RunInputs):
    from dpop.models import load_model

    if inputs.model is not None:
        model, tokenizer = inputs.model, inputs.tokenizer
        if tokenizer.pad_token_id is None:  # load_model does the same for a model it loads
            tokenizer.pad_token = tokenizer.eos_token
    else:
        quantization = _quantization_config(config) if config.lora_4bit else None
        model, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code,
                                      quantization_config=quantization)
    if not config.dropout:
        _disable_dropout(model)
    precision.prepare_model(model, config.precision, _device_type())  # bf16 on CPU: fp32 attention
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if config.lora_r > 0:
        model = _add_lora(model, config)
    if config.compile:
        backbone_and_head(model)[0].compile()
    return model, tokenizer


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of the peak.

    Warmup ramps (s + 1) / (warmup + 1): unlike transformers' schedules, the first step is not taken at
    lr 0, which wastes a whole step (a tenth of a 20-step demo run). After warmup: linear decay to 0 at
    `total_steps`, half a cosine, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return 1.0


def _make_optimizer(config: TrainConfig, model, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[config.optimizer]
    # fused AdamW: one kernel per tensor instead of a dozen foreach passes, ~7x faster on this CPU
    extra = {"fused": True} if config.optimizer == "adamw" else {}
    optimizer = optimizer_class(params, lr=config.learning_rate, weight_decay=config.weight_decay, **extra)
    factor = functools.partial(lr_factor, schedule=config.scheduler, warmup_steps=config.warmup_steps,
                               total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def _trackers(config: TrainConfig) -> list:
    """What accelerate's log_with gets: tracker names (tests substitute GeneralTracker instances)."""
    return list(config.trackers)


def _new_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings in process-wide singletons and refuses a second Accelerator with another
    # precision; a second run in one process (sft then train, a notebook, the tests) drops the previous run's
    # settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trackers = _trackers(config)
    # step_scheduler_with_optimizer=False: otherwise the prepared scheduler steps num_processes times per step
    with distributed.signals_to_this_thread():  # the process group's threads must not take stop signals
        return Accelerator(mixed_precision="bf16" if precision.uses_bf16(config.precision) else "no",
                           cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(run_dir),
                           step_scheduler_with_optimizer=False)


def _filter_ches(config: TrainConfig, model, tokenizer, data, processes):
    """The run's data without the fraction config.filter_ches of training pairs whose length-normalised CHES under
    the starting policy is highest (dpop.scoring.displacement). Scored on the main process, in fp32, and sent to
    the others, so every process drops the same pairs."""
    from dpop.scoring.displacement import ches_scores, top_fraction

    train = data.train
    dropped = None
    if processes.is_main_process:
        layout = dict(layout=config.layout, pad_id=tokenizer.pad_token_id, pack_length=config.max_length)
        batch_size = config.eval_batch_size or 4 * config.batch_size
        scores = ches_scores(model, train.pairs, layout=layout, batch_size=batch_size,
                             progress=len(train.pairs) > 256).normalized
        dropped = sorted(top_fraction(scores, config.filter_ches))
        threshold = min((scores[i] for i in dropped), default=math.nan)
        logger.info("dpop: filter_ches %g: dropped %d of %d training pairs (length-normalised CHES >= %.4g)",
                    config.filter_ches, len(dropped), len(train.pairs), threshold)
    dropped = set(distributed.from_main(dropped, processes))
    kept = [pair for index, pair in enumerate(train.pairs) if index not in dropped]
    if not kept:
        raise ConfigError(f"filter_ches {config.filter_ches} leaves none of the {len(train.pairs)} training pairs; "
                          "use a smaller fraction")
    return replace(data, train=replace(train, pairs=kept))


def _shard(scorer, config: TrainConfig, accelerator):
    """FSDP2 (dpop.distributed.fsdp): the sharded scorer and the TrainedWeights of this process's shards. The
    reference pass has run on the whole model before (each process scored its slices, as under DDP), and
    bf16-sr's dither is already in the weights being sharded."""
    from dpop.distributed import fsdp

    settings = fsdp.fsdp2_launched() or {}
    scorer = fsdp.shard(scorer, accelerator.device, reshard_after_forward=settings.get("reshard_after_forward", True))
    weights = precision.sharded_weights(fsdp.local_parameters(scorer.model), config.precision, config.seed,
                                        ranges=fsdp.flat_ranges(scorer.model),
                                        reduce=lambda sums: accelerator.reduce(sums, reduction="sum"))
    return scorer, weights


def setup(config: TrainConfig, inputs: RunInputs | None = None) -> Run:
    """Validate, load, tokenise and build the reference; write nothing to the run dir except deleting the
    old run on --overwrite once everything else has succeeded."""
    inputs = inputs or RunInputs()
    from accelerate.utils import set_seed

    config = resolve(make_config(config.to_dict()))  # a TrainConfig built in Python is validated too
    config = distributed.check_launch(config)  # num_processes: the processes launched
    run_dir = check_run_dir(config)
    check_trackers(config.trackers)
    pairs = load_run_pairs(config, inputs.data, inputs.eval_data)  # validated before a model loads or a file is written
    accelerator = _new_accelerator(config, run_dir)
    accelerator.wait_for_everyone()  # every process has checked the run dir before the main one writes to it
    distributed.check_engine(accelerator, config)
    set_seed(config.seed)
    model, tokenizer = _build_model(config, inputs)
    model.to(accelerator.device)
    data = tokenize_run_pairs(pairs, tokenizer, config)
    if config.filter_ches:
        data = _filter_ches(config, model, tokenizer, data, accelerator)  # on the starting weights, before any dither
    weights = precision.trained_weights(model, config.precision, config.seed)  # bf16-sr: dithers them now
    if config.eval_every and data.eval is None:
        logger.warning("dpop: eval_every %d but no eval_data: no evaluation in this run", config.eval_every)
    world_batch = config.batch_size * accelerator.num_processes
    per_epoch = steps_per_epoch(len(data.train.pairs), world_batch, config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    reference, eval_reference = build_reference(config, model, tokenizer, accelerator.autocast, data,
                                                needed_micro_batches=total_steps * config.grad_accum,
                                                processes=accelerator, policy_on_disk=inputs.model is None)
    if config.overwrite and accelerator.is_main_process:
        clear_run_dir(run_dir)
    model.train()
    scorer = PolicyScorer(model, config.chunk_tokens, config.ld_alpha, config.use_weighting)
    if distributed.uses_fsdp2(config):  # dpop shards the scorer itself; the optimizer gets the shards
        scorer, weights = _shard(scorer, config, accelerator)
        optimizer, scheduler = _make_optimizer(config, model, total_steps)
    else:
        optimizer, scheduler = _make_optimizer(config, model, total_steps)
        scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)
    run = Run(config, run_dir, model, tokenizer, accelerator, data, reference, eval_reference, optimizer, scheduler,
              total_steps, objective_of(config), state=TrainState(num_processes=accelerator.num_processes),
              scorer=scorer, weights=weights)
    if config.sync_ref_model:
        from dpop.training.sync import ReferenceSync

        run.sync = ReferenceSync(run)
    return run
