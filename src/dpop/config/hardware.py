"""What the machine can do, for the config's automatic values: fast bf16 (precision auto), and QLoRA's CUDA and
bitsandbytes."""

from __future__ import annotations

from pathlib import Path

from dpop.errors import ConfigError


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16-sr' where the hardware has fast bf16 (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else 'fp32'."""
    if precision != "auto":
        return precision
    return "bf16-sr" if has_fast_bf16() else "fp32"


def has_fast_bf16() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_4bit_available() -> None:
    """QLoRA's 4-bit kernels (bitsandbytes) run on CUDA only: refuse early, before any data or model loads."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError("lora_4bit (QLoRA) needs a CUDA GPU for bitsandbytes' 4-bit weights, and none is "
                          "available here; drop --lora-4bit to train the same LoRA adapters on full-precision "
                          "weights, or run on a CUDA machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("lora_4bit (QLoRA) needs the bitsandbytes package: pip install bitsandbytes "
                          "(or drop --lora-4bit)")
