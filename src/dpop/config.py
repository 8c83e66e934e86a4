"""One typed config for `dpop train` and `dpop sft`: YAML keys and --flags share names.

Each option is documented once, in its field's `help`, and `--help` is generated from it. YAML uses the
underscore form (`max_steps: 10`), flags the dashed form (`--max-steps 10`); flags override the file.
Unknown keys and out-of-range values are errors that name the key and suggest the nearest valid one.

    dpop train config.yaml --beta 0.1 --loss dpo
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dpop.errors import ConfigError


def _opt(default, help: str, *, choices=None, minimum=None, exclusive_minimum=None, maximum=None, yaml_only=False):
    return field(default=default, metadata=dict(help=help, choices=choices, minimum=minimum,
                                                 exclusive_minimum=exclusive_minimum, maximum=maximum,
                                                 yaml_only=yaml_only))


@dataclass(frozen=True)
class TrainConfig:
    # --- what to train, on what ---
    model: str = _opt("smollm2-135m", "Policy model: builtin name, local HF model dir or .gguf file.")
    ref_model: str | None = _opt(None, "Reference model (e.g. an SFT model, Pre-DPO style). Default: the initial policy.")
    data: str | None = _opt(None, "Training pairs (JSONL/JSON/CSV/Parquet/datasets dir). Default: the builtin arithmetic task.")
    eval_data: str | None = _opt(None, "Held-out pairs evaluated every eval_every steps. Default with the builtin task: its eval split.")
    output_dir: str = _opt("runs/train", "Run directory (config.yaml, metrics.jsonl, checkpoints/, final/).")
    columns: str | None = _opt(None, "Column mapping for the data files, e.g. 'prompt=question,chosen=good,rejected=bad'.")
    task_pairs: int = _opt(1000, "Pairs generated for the builtin task when no data is given.", minimum=1)
    task_edit: str = _opt("low", "Edit distance of the builtin task's rejected answers.", choices=("low", "high"))
    # --- the loss ---
    loss: str = _opt("dpop", "Loss: dpo, dpop, ipo, hinge, robust, cdpo, rpo, simpo, cpo, orpo, bco_pair, sppo_hard, "
                             "nca_pair, exo_pair, apo_zero, apo_down, discopop, aot, sigmoid_norm (sft for `dpop sft`).")
    beta: float = _opt(0.3, "β: strength of the implicit KL constraint (DPOP paper default 0.3).", exclusive_minimum=0.0)
    dpop_lambda: float = _opt(50.0, "λ of DPOP: weight of max(0, log πref(y_w) − log πθ(y_w)) inside the sigmoid.", minimum=0.0)
    label_smoothing: float = _opt(0.0, "ε: assumed label-flip rate (robust, cdpo, exo_pair).", minimum=0.0, maximum=0.5)
    rpo_alpha: float = _opt(1.0, "α of RPO (DPO+NLL): weight of the chosen NLL per token.", minimum=0.0)
    simpo_gamma: float = _opt(0.5, "γ of SimPO: target reward margin.", minimum=0.0)
    cpo_alpha: float = _opt(1.0, "α of CPO: weight of the chosen NLL.", minimum=0.0)
    orpo_lambda: float = _opt(0.1, "λ of ORPO: weight of the odds-ratio term.", minimum=0.0)
    discopop_tau: float = _opt(0.05, "τ of DiscoPOP: temperature of the log-ratio modulation.", exclusive_minimum=0.0)
    # --- optimisation ---
    learning_rate: float = _opt(1e-6, "Peak learning rate.", exclusive_minimum=0.0)
    optimizer: str = _opt("adamw", "Optimizer.", choices=("adamw", "rmsprop"))
    weight_decay: float = _opt(0.0, "Weight decay (decoupled for AdamW).", minimum=0.0)
    scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", choices=("linear", "cosine", "constant"))
    warmup_steps: int = _opt(0, "Linear warmup steps.", minimum=0)
    epochs: float = _opt(1.0, "Passes over the data (ignored when max_steps is set).", exclusive_minimum=0.0)
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps.", minimum=1)
    batch_size: int = _opt(8, "Pairs per micro-batch.", minimum=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.", minimum=1)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", minimum=0.0)
    max_length: int = _opt(1024, "Max tokens of prompt + one response; responses are cut at the end.", minimum=2)
    max_prompt_length: int = _opt(512, "Max prompt tokens; prompts keep their end.", minimum=1)
    precision: str = _opt("auto", "fp32, or bf16 autocast with fp32 master weights; auto = bf16 where the hardware "
                                  "has fast bf16 (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else fp32.",
                          choices=("auto", "fp32", "bf16"))
    dropout: bool = _opt(False, "Keep the model's dropout on (off by default: it makes policy and reference disagree).")
    seed: int = _opt(0, "Seed for data order, sampling and initialisation.")
    # --- reference ---
    ref_strategy: str = _opt("precompute", "precompute: one no-grad pass before training, cached on disk; "
                                           "model: a live frozen copy; lora: the policy with adapters disabled.",
                             choices=("precompute", "model", "lora"))
    # --- speed ---
    layout: str = _opt("shared", "Batch layout: plain (2 rows per pair), shared (prompt once, prefix sharing), "
                                 "packed (shared + several pairs per row).", choices=("plain", "shared", "packed"))
    chunk_tokens: int = _opt(1024, "Response tokens per lm-head chunk when computing log-probs.", minimum=1)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in backward to save memory.")
    compile: bool = _opt(False, "torch.compile the model.")
    # --- bookkeeping ---
    log_every: int = _opt(1, "Log metrics every N optimizer steps.", minimum=1)
    eval_every: int = _opt(0, "Evaluate on eval_data every N steps (0 = only at the end).", minimum=0)
    save_every: int = _opt(0, "Write a checkpoint every N steps (0 = only the final model).", minimum=0)
    keep_checkpoints: int = _opt(2, "Keep the last K checkpoints.", minimum=1)
    resume: bool = _opt(False, "Continue the run in output_dir from its last checkpoint.")
    overwrite: bool = _opt(False, "Replace an existing run in output_dir.")
    report_to: str = _opt("none", "Trackers, comma-separated: tensorboard, wandb, mlflow, trackio (or none).")
    num_processes: int = _opt(1, "Local processes (launched through accelerate).", minimum=1)
    lora_r: int = _opt(0, "LoRA rank (0 = full fine-tune).", minimum=0)
    lora_alpha: float = _opt(16.0, "LoRA alpha.", exclusive_minimum=0.0)
    lora_target: str = _opt("all-linear", "LoRA target modules, comma-separated, or all-linear.")
    trust_remote_code: bool = _opt(False, "Allow custom model code from the model dir.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_type(f) -> type:
    hints = typing.get_type_hints(TrainConfig)
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(f, value):
    kind = _field_type(f)
    if value is None:
        if f.default is None:
            return None
        raise ConfigError(f"{f.name}: must not be empty")
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{f.name}: expected {kind.__name__}, got {value!r}") from None


def _check_range(f, value) -> None:
    meta = f.metadata
    if value is None:
        return
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}"
                          f"{_suggest(str(value), meta['choices'])}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"{f.name}: must be >= {meta['minimum']}, got {value}")
    if meta.get("exclusive_minimum") is not None and value <= meta["exclusive_minimum"]:
        raise ConfigError(f"{f.name}: must be > {meta['exclusive_minimum']}, got {value}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"{f.name}: must be <= {meta['maximum']}, got {value}")


def make_config(values: dict[str, Any], base: type = TrainConfig):
    """Build a validated config from a mapping; unknown keys are errors with a suggestion."""
    by_name = {f.name: f for f in fields(base)}
    resolved = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise ConfigError(f"unknown config key '{key}'{_suggest(name, by_name)}")
        value = _coerce(by_name[name], value)
        _check_range(by_name[name], value)
        resolved[name] = value
    config = base(**resolved)
    _check_consistency(config)
    return config


def _check_consistency(config) -> None:
    from dpop.losses import LOSSES

    if config.loss not in LOSSES and config.loss != "sft":
        raise ConfigError(f"loss: unknown loss '{config.loss}'{_suggest(config.loss, LOSSES)}; "
                          f"choose one of {', '.join(LOSSES)}")
    if config.max_prompt_length >= config.max_length:
        raise ConfigError(f"max_prompt_length ({config.max_prompt_length}) must be below max_length "
                          f"({config.max_length}) to leave room for the response")
    if config.ref_strategy == "lora" and config.lora_r == 0:
        raise ConfigError("ref_strategy: 'lora' needs LoRA on (set lora_r > 0)")


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def write_yaml(config, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")


def add_config_arguments(parser: argparse.ArgumentParser, base: type = TrainConfig) -> None:
    """One --flag per config field, help and default from the field itself. Flags default to None
    (= not given), so a YAML file's value is only overridden by flags the user actually typed."""
    parser.add_argument("config_file", nargs="?", help="YAML file with config keys (flags override it).")
    for f in fields(base):
        if f.metadata.get("yaml_only"):
            continue
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, metavar=kind.__name__.upper(),
                                choices=None, help=help_text)


def config_from_args(args: argparse.Namespace, base: type = TrainConfig, overrides: dict | None = None):
    values = read_yaml(args.config_file) if getattr(args, "config_file", None) else {}
    values.update(overrides or {})
    for f in fields(base):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = _parse_flag(f, given)
    return make_config(values, base)


def _parse_flag(f, text):
    """Flags arrive as strings; 'none'/'null' clears an optional value."""
    if isinstance(text, str) and text.lower() in ("none", "null") and f.default is None:
        return None
    return text


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
    unknown = set(mapping) - {"prompt", "chosen", "rejected", "completions"}
    if unknown:
        raise ConfigError(f"columns: unknown field(s) {', '.join(sorted(unknown))}; "
                          "mappable fields are prompt, chosen, rejected, completions")
    return mapping
