"""One typed config for `dpop train` and `dpop sft`: YAML keys and --flags share names.

Each option is documented once, in its field's `help`, and `--help` is generated from it. The loss options
(dpop_lambda, label_smoothing, ...) and the list of losses come from `dpop.losses`, where they are defined:
their fields default to None (= the loss's own default, made concrete by `resolve`), and their help is
rendered from dpop.losses when help is printed, because that module imports torch and every `dpop` command
builds this parser.
YAML uses the underscore form (`max_steps: 10`), flags the dashed form (`--max-steps 10`); flags override
the file. Unknown keys and out-of-range values are errors that name the key and suggest the nearest valid one.

    dpop train config.yaml --beta 0.1 --loss dpo
    dpop train --output-dir runs/a --resume        # the run's own config.yaml is the base; flags override it
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from dpop.config.hardware import check_4bit_available, resolve_precision
from dpop.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
# Keys that may change when a run is resumed: they do not change the math of the steps already taken.
RESUMABLE_CHANGES = frozenset({"resume", "overwrite", "max_steps", "epochs", "eval_every", "save_every",
                               "keep_checkpoints", "log_every", "report_to", "eval_data", "eval_batch_size",
                               "gradient_checkpointing", "compile", "lora_save", "max_bad_steps"})


def _opt(default, help: str | None, *, choices=None, minimum=None, exclusive_minimum=None, maximum=None,
         exclusive_maximum=None, **extra):
    return field(default=default, metadata=dict(help=help, choices=choices, minimum=minimum,
                                                 exclusive_minimum=exclusive_minimum, maximum=maximum,
                                                 exclusive_maximum=exclusive_maximum, **extra))


def _loss_opt(name: str):
    """A loss option: its help, bounds and default live in dpop.losses (OPTIONS, loss_option_defaults); None
    here means that default. Bounds are checked for every loss, so a bad value fails before a model loads even
    when the chosen loss ignores the option."""
    return _opt(None, None, loss_option=name)


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train, on what ---
    model: str = _opt("smollm2-135m", "Policy model: builtin name, local HF model dir or .gguf file.")
    ref_model: str | None = _opt(None, "Reference model, e.g. an SFT run's final/ (none = the initial policy).")
    data: str | None = _opt(None, "Training pairs: JSONL/JSON/CSV/Parquet file or datasets dir (none = the builtin arithmetic task).")
    eval_data: str | None = _opt(None, "Held-out pairs evaluated every eval_every steps and at the end (none = no evaluation, except with the builtin task: its eval split).")
    output_dir: str = _opt("runs/train", "Run directory (config.yaml, metrics.jsonl, checkpoints/, final/, summary.json).")
    columns: str | None = _opt(None, "Column mapping for the data files, e.g. 'prompt=question,chosen=good,rejected=bad' "
                                     "(in YAML also a mapping {prompt: question}; none = the standard names).",
                               mapping=True)
    ranked_pairs: str = _opt("best_worst", "Pairs from ranked rows (completions with scores): best_worst (the "
                                           "highest against the lowest score) or all (every pair of different "
                                           "scores).", choices=("best_worst", "all"))
    unpair: bool = _opt(False, "Split each preference pair into two unpaired rows, the chosen answer desirable and "
                               "the rejected one not (for kto; TRL's unpair_preference_dataset).")
    filter_ches: float = _opt(0.0, "Drop this fraction of the training pairs with the highest length-normalised "
                                   "CHES score under the starting policy before training (Razin et al. 2024: the "
                                   "pairs likeliest to make DPO lower the chosen answer; `dpop data doctor --model` "
                                   "shows the scores). 0 = keep all.", minimum=0.0, exclusive_maximum=1.0)
    task_pairs: int = _opt(1000, "Pairs generated for the builtin task when no data is given.", minimum=1)
    task_edit: str = _opt("low", "Edit distance of the builtin task's rejected answers.", choices=("low", "high"))
    task_split: str = _opt("train", "The builtin task's split of problems to train on (dpop sft: sft; the eval "
                                    "split is held out).", choices=("train", "sft"))
    # --- the loss ---
    loss: str = _opt("dpop", "Training loss (sft = cross-entropy on the chosen responses, what `dpop sft` runs); "
                             "several, comma-separated (a list in YAML), train on their weighted sum, each "
                             "logged as loss/NAME.", choices_from_losses=True, list=True)
    use_weighting: bool = _opt(False, "WPO (Zhou et al. 2024): weight each pair's loss by how likely the current policy "
                                      "finds its two responses (exp of their mean calibrated token log-prob; TRL's "
                                      "use_weighting). One more pass of the lm head per step.")
    ld_alpha: float | None = _opt(None, "LD-DPO (Liu et al. 2024): weight α of the longer response's tokens past the "
                                        "shorter one's length, in the policy's and the reference's log-probs alike "
                                        "(TRL's ld_alpha; none = off, the same as 1).", minimum=0.0, maximum=1.0)
    loss_weights: str | None = _opt(None, "Weights of the losses in loss, comma-separated (a list in YAML), one per "
                                          "loss (none = 1 each); each loss keeps its own normalisation.", list=True,
                                    numbers=True)
    beta: float = _opt(0.3, "β > 0: strength of the implicit KL constraint (DPOP paper: 0.3); ORPO: the weight λ "
                            "of its odds-ratio term.", exclusive_minimum=0.0)
    dpop_lambda: float | None = _loss_opt("dpop_lambda")
    label_smoothing: float | None = _loss_opt("label_smoothing")
    rpo_alpha: float | None = _loss_opt("rpo_alpha")
    simpo_gamma: float | None = _loss_opt("simpo_gamma")
    cpo_alpha: float | None = _loss_opt("cpo_alpha")
    exo_epsilon: float | None = _loss_opt("exo_epsilon")
    discopop_tau: float | None = _loss_opt("discopop_tau")
    tdpo_alpha: float | None = _loss_opt("tdpo_alpha")
    desirable_weight: float | None = _loss_opt("desirable_weight")
    undesirable_weight: float | None = _loss_opt("undesirable_weight")
    # --- optimisation ---
    learning_rate: float = _opt(1e-6, "Peak learning rate.", exclusive_minimum=0.0)
    optimizer: str = _opt("adamw", "Optimizer.", choices=("adamw", "rmsprop"))
    weight_decay: float = _opt(0.0, "Weight decay (decoupled for AdamW).", minimum=0.0)
    scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", choices=("linear", "cosine", "constant"))
    warmup_steps: int = _opt(0, "Linear warmup steps: step s < N runs at lr·(s+1)/(N+1), so no step is wasted at lr 0.", minimum=0)
    epochs: float = _opt(1.0, "Passes over the data (ignored when max_steps is set).", exclusive_minimum=0.0)
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps (none = as many as epochs take).", minimum=1)
    batch_size: int = _opt(8, "Pairs per micro-batch.", minimum=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", minimum=1)
    eval_batch_size: int | None = _opt(None, "Pairs per evaluation batch (none = 4 × batch_size: evaluation "
                                             "keeps no activations for a backward pass).", minimum=1)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", minimum=0.0)
    max_bad_steps: int = _opt(5, "Stop the run after this many steps in a row whose loss or gradient is not finite "
                                 "(each such step is skipped and counted in skipped_steps; 0 = never stop).",
                              minimum=0)
    max_length: int = _opt(1024, "Max tokens of prompt + one response; responses are cut at the end.", minimum=2)
    max_prompt_length: int | None = _opt(None, "Max prompt tokens; prompts keep their end (none = max_length // 2).",
                                         minimum=1)
    precision: str = _opt("auto", "fp32; bf16: autocast over fp32 weights (updates below half a bf16 step never reach "
                                  "the weights the model computes with: a dead zone on bf16-grid weights); bf16-sr: "
                                  "bf16 compute weights made by stochastic rounding of fp32 master weights after "
                                  "each step, which follows fp32 (dpop.precision); auto = bf16-sr where the hardware "
                                  "has fast bf16 (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else fp32.",
                          choices=("auto", "fp32", "bf16", "bf16-sr"))
    dropout: bool = _opt(False, "Keep the model's dropout on (off by default: it makes policy and reference disagree).")
    seed: int = _opt(0, "Seed for data order and initialisation (LoRA adapters).")
    # --- reference ---
    ref_strategy: str = _opt("precompute", "precompute: one no-grad pass before training, cached on disk "
                                           "($DPOP_CACHE/reference); model: a live frozen copy (with LoRA and no "
                                           "ref_model: becomes lora, no copy); lora: the policy with its adapters "
                                           "disabled (needs lora_r > 0); guided: Pre-DPO (Pan et al. 2025), first "
                                           "a guide run (guide_loss, in output_dir/guide) from the same policy "
                                           "and data, then this run from the initial policy with the guide as "
                                           "its precomputed reference.",
                             choices=("precompute", "model", "lora", "guided"))
    guide_loss: str = _opt("dpo", "Pre-DPO: the loss of the guide run (the paper: dpo or simpo).",
                           choices_from_losses=True)
    sync_ref_model: bool = _opt(False, "TR-DPO (Gorbatovski et al. 2024): every ref_model_sync_steps steps the reference "
                                       "becomes α·policy + (1 − α)·reference (α = ref_model_mixup_alpha). Needs a live "
                                       "reference (ref_strategy model) and a full fine-tune.")
    ref_model_sync_steps: int = _opt(512, "TR-DPO: optimizer steps between reference updates.", minimum=1)
    ref_model_mixup_alpha: float = _opt(0.6, "TR-DPO: α in [0, 1], the policy's share in each reference update "
                                             "(1 = a hard copy).", minimum=0.0, maximum=1.0)
    # --- speed ---
    layout: str = _opt("shared", "Batch layout: plain (2 rows per pair), shared (prompt once, prefix sharing), "
                                 "packed (shared + several pairs per row).", choices=("plain", "shared", "packed"))
    group_by_length: bool = _opt(False, "Batch pairs of similar length together (less padding); the order stays "
                                        "random between steps and a function of the seed. Off by default: with it "
                                        "on, a run resumed in another process is not yet bit-exact (docs/performance.md).")
    chunk_tokens: int = _opt(1024, "Response tokens per lm-head chunk when computing log-probs.", minimum=1)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    compile: bool = _opt(False, "torch.compile the decoder stack.")
    # --- bookkeeping ---
    log_every: int = _opt(1, "Log metrics every N optimizer steps.", minimum=1)
    eval_every: int = _opt(0, "Evaluate on eval_data every N steps (0 = only at the end).", minimum=0)
    save_every: int = _opt(0, "Write a checkpoint every N steps and at the end (0 = only the final model).", minimum=0)
    keep_checkpoints: int = _opt(2, "Keep the last K checkpoints.", minimum=1)
    resume: bool = _opt(False, "Continue the run in output_dir from its last checkpoint.")
    overwrite: bool = _opt(False, "Replace an existing run in output_dir.")
    report_to: str = _opt("none", f"Trackers, comma-separated (a list in YAML): {', '.join(TRACKERS)} (or none); "
                                  "each needs its package.", list=True)
    num_processes: int = _opt(1, "Data-parallel processes on this machine: N > 1 relaunches the command under "
                                 "torchrun (DDP; gloo on CPU, NCCL on GPUs); batch_size is per process, so a step "
                                 "takes num_processes × batch_size × grad_accum pairs. Under accelerate launch or "
                                 "torchrun the launcher's count is used (docs/scaling.md). A resumed run keeps its "
                                 "count.", minimum=1)
    engine: str = _opt("ddp", "How several processes share the model: ddp (each holds it whole; gradients "
                              "averaged) or fsdp2 (torch's fully_shard per decoder layer: weights, gradients and "
                              "optimizer state split over the processes; checkpoints sharded, final/ gathered; no "
                              "LoRA, no live reference model). An accelerate config with FSDP version 2 selects "
                              "fsdp2 (docs/scaling.md).", choices=("ddp", "fsdp2"))
    lora_r: int = _opt(0, "LoRA rank (0 = full fine-tune).", minimum=0)
    lora_alpha: float = _opt(16.0, "LoRA alpha (the adapters' scale is alpha / r).", exclusive_minimum=0.0)
    lora_target: str = _opt("all-linear", "LoRA target modules, comma-separated names (a list in YAML), or "
                                          "all-linear.", list=True)
    lora_dora: bool = _opt(False, "DoRA (Liu et al. 2024): the adapters also learn each output row's magnitude "
                                  "(needs lora_r > 0; slower per step).")
    lora_save: str = _opt("merged", "What final/ holds after a LoRA run: merged (a plain HF model dir, adapters "
                                    "merged into the base) or adapter (adapter_config.json + "
                                    "adapter_model.safetensors + tokenizer; its base is recorded as an absolute "
                                    "path; dpop eval/generate/--model and peft's AutoPeftModelForCausalLM load it).",
                          choices=("merged", "adapter"))
    lora_4bit: bool = _opt(False, "QLoRA: load the base weights in 4-bit NF4 with bitsandbytes, adapters in full "
                                  "precision (needs lora_r > 0, a CUDA GPU and the bitsandbytes package).")
    trust_remote_code: bool = _opt(False, "Allow custom model code from the model dir.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(name for name in _split_list(self.report_to) if name != "none")


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(f) -> type:
    """A field's value type from its annotation ('float | None' -> float), for any of the config classes."""
    names = [name.strip() for name in str(f.type).split("|")]
    return _KINDS[next(name for name in names if name != "None")]


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(f, value):
    kind = _field_type(f)
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{f.name}: must not be empty (default: {_default(f)})")
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind is int and isinstance(value, str):
            return int(float(value)) if float(value).is_integer() else int(value)
        if kind is str and isinstance(value, (list, tuple)) and f.metadata.get("list"):
            value = _join_list(f, value)  # YAML lists: report_to: [wandb, mlflow]
        if kind is str and isinstance(value, dict) and f.metadata.get("mapping"):
            value = ",".join(f"{_scalar(f, k)}={_scalar(f, v)}" for k, v in value.items())  # columns: {prompt: q}
        if kind is str and not isinstance(value, str):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None


def _choices(f) -> tuple[str, ...] | None:
    if f.metadata.get("choices_from_losses"):
        from dpop.losses import LOSSES

        return tuple(LOSSES)
    return f.metadata.get("choices")


def _default(f):
    """A field's default as --help shows it (a loss option's comes from dpop.losses)."""
    if f.metadata.get("loss_option"):
        from dpop.losses import loss_option_defaults

        return loss_option_defaults()[f.metadata["loss_option"]]
    return f.default


def _help_text(f, command_defaults: dict | None = None) -> str:
    """A field's help with its default (and its choices, when there are many to show)."""
    text = f.metadata["help"]
    if f.metadata.get("loss_option"):
        from dpop.losses import OPTION_HELP

        text = OPTION_HELP[f.metadata["loss_option"]] + "."
    choices = _choices(f)
    shown = f" Choices: {', '.join(choices)}." if choices and len(choices) > 3 else ""
    default = (command_defaults or {}).get(f.name, _default(f))
    return f"{text} (default: {default}){shown}"


def _join_list(f, items) -> str:
    return ",".join(_scalar(f, item) for item in items)


def _scalar(f, item) -> str:
    if f.metadata.get("numbers") and isinstance(item, (int, float)) and not isinstance(item, bool):  # [1, 0.5]
        return repr(item)
    if not isinstance(item, str) or "," in item or "=" in item or not item.strip():
        raise ConfigError(f"{f.name}: expected names, got {item!r}")
    return item.strip()


def _check_range(f, value) -> None:
    """Choices and bounds; the message names the key, the rule and the nearest valid value where one exists."""
    meta = f.metadata
    if value is None:
        return
    if meta.get("loss_option"):
        from dpop.losses import check_option

        check_option(meta["loss_option"], value)
        return
    choices = _choices(f)
    items = _split_list(value) if meta.get("list") and isinstance(value, str) else [value]
    for item in items if choices else ():
        if item not in choices:
            raise ConfigError(f"{f.name}: {item!r} is not one of {', '.join(choices)}{_suggest(str(item), choices)}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"{f.name}: must be >= {meta['minimum']}, got {value}; the nearest valid value is "
                          f"{meta['minimum']} (default: {_default(f)})")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"{f.name}: must be <= {meta['maximum']}, got {value}; the nearest valid value is "
                          f"{meta['maximum']} (default: {_default(f)})")
    if meta.get("exclusive_minimum") is not None and not value > meta["exclusive_minimum"]:
        raise ConfigError(f"{f.name}: must be > {meta['exclusive_minimum']}, got {value} (default: {_default(f)})")
    if meta.get("exclusive_maximum") is not None and not value < meta["exclusive_maximum"]:
        raise ConfigError(f"{f.name}: must be < {meta['exclusive_maximum']}, got {value} (default: {_default(f)})")


def make_config(values: dict[str, Any], base: type = TrainConfig):
    """Build a validated config from a mapping; unknown keys are errors with a suggestion."""
    by_name = {f.name: f for f in fields(base)}
    resolved = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise ConfigError(f"unknown config key '{key}'{_suggest(name, by_name)}")
        value = _coerce(by_name[name], value)
        _check_range(by_name[name], value)
        resolved[name] = value
    config = base(**resolved)
    if isinstance(config, TrainConfig):
        from dpop.config.checks import check_consistency

        check_consistency(config)
    elif hasattr(config, "check"):  # a command's config (dpop.config.commands)
        config.check()
    return config


def resolve(config: TrainConfig) -> TrainConfig:
    """The config with every automatic value made concrete (what RUN/config.yaml records)."""
    from dpop.losses import loss_option_defaults

    if config.lora_4bit:
        check_4bit_available()
    options = {name: default if getattr(config, name) is None else getattr(config, name)
               for name, default in loss_option_defaults().items()}
    # A LoRA policy's frozen base IS the initial model: a live copy would only double the memory.
    lora_reference = config.lora_r > 0 and config.ref_strategy == "model" and not config.ref_model
    return dataclasses.replace(
        config, **options, precision=resolve_precision(config.precision),
        eval_batch_size=config.eval_batch_size or 4 * config.batch_size,
        max_prompt_length=config.max_prompt_length or config.max_length // 2,
        ref_strategy="lora" if lora_reference else config.ref_strategy)


def differences(saved: TrainConfig, given: TrainConfig, *, ignore=RESUMABLE_CHANGES) -> list[str]:
    """'key: saved -> given' for each key that differs, except those in `ignore`."""
    old, new = saved.to_dict(), given.to_dict()
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in old if key not in ignore and old[key] != new[key]]


def parse_columns(text: str | None) -> dict[str, str] | None:
    """'prompt=question,chosen=good' -> {"prompt": "question", "chosen": "good"} (our field -> file column)."""
    if not text:
        return None
    mapping = {}
    for item in text.split(","):
        ours, sep, theirs = item.partition("=")
        if not sep or not ours.strip() or not theirs.strip():
            raise ConfigError(f"columns: expected 'field=column' items separated by commas, got {item!r}")
        mapping[ours.strip()] = theirs.strip()
    fields = ("prompt", "chosen", "rejected", "completions", "completion", "label")  # dpop.data.rows.FIELDS
    unknown = set(mapping) - set(fields)
    if unknown:
        raise ConfigError(f"columns: unknown field(s) {', '.join(sorted(unknown))}; "
                          f"mappable fields are {', '.join(fields)}")
    return mapping
