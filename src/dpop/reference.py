"""Reference log-probs: precomputed and cached on disk, a live frozen model, or the LoRA base.

Whatever the strategy, the reference pass runs the same batches, layout and precision as the policy's
forward, so at step 0 policy and reference log-probs agree and the first rewards are 0.

The `precompute` cache lives in `$DPOP_CACHE/reference/<key>.safetensors`. The key hashes the reference
model's weights and config, the token ids of every pair (which covers the data, the tokenizer and the
truncation) and the batch schedule (layout, batch size, seed, precision), so a later run with the same
inputs (a dpo run after a dpop run, or a resumed run) skips the reference pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpop.batching import PairBatch
from dpop.logprobs import sequence_logps


@dataclass
class RefLogps:
    chosen: torch.Tensor  # (P,)
    rejected: torch.Tensor  # (P,)


class LiveReference:
    """Computes reference log-probs with a frozen model (a copy, a separate ref_model, or the policy
    itself with its LoRA adapters disabled)."""

    def __init__(self, model, autocast, *, disable_adapters: bool = False, chunk_tokens: int = 1024):
        self.model = model
        self.autocast = autocast
        self.disable_adapters = disable_adapters
        self.chunk_tokens = chunk_tokens

    @torch.no_grad()
    def __call__(self, batch: PairBatch, pair_indices) -> RefLogps:
        adapters_off = self.model.disable_adapter() if self.disable_adapters else contextlib.nullcontext()
        with adapters_off, self.autocast():
            logps = sequence_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        return RefLogps(logps.chosen.float(), logps.rejected.float())


class CachedReference:
    """Reference log-probs looked up by pair index."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen, self.rejected = chosen, rejected

    def __call__(self, batch: PairBatch, pair_indices) -> RefLogps:
        index = torch.as_tensor(pair_indices, dtype=torch.long)
        chosen, rejected = self.chosen[index], self.rejected[index]
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            raise RuntimeError("reference log-probs missing for pairs the reference pass did not cover")
        return RefLogps(chosen, rejected)


def precompute(live: LiveReference, schedule: list[list[int]], build, num_pairs: int, *,
               cache_path: Path | None, progress: bool = True, description: str = "reference pass") -> CachedReference:
    """Reference log-probs for every pair in `schedule` (a list of micro-batches of pair indices, each laid
    out by `build(indices) -> PairBatch`). Pairs already in the cache file are not recomputed; a run that
    needs more pairs than an earlier one computes only the missing batches and extends the file."""
    from tqdm.auto import tqdm

    chosen, rejected = _load_cache(cache_path, num_pairs)
    todo = [indices for indices in schedule if torch.isnan(chosen[torch.as_tensor(indices)]).any()]
    if not todo:
        if schedule:
            print(f"dpop: {description}: all {sum(map(len, schedule))} pairs from cache", flush=True)
        return CachedReference(chosen, rejected)
    for indices in tqdm(todo, desc=description, unit="batch", disable=not progress):
        result = live(build(indices), indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        chosen[index], rejected[index] = result.chosen.cpu(), result.rejected.cpu()
    if cache_path is not None:
        _save_cache(cache_path, chosen, rejected)
    return CachedReference(chosen, rejected)


def _load_cache(cache_path: Path | None, num_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    if cache_path is not None and cache_path.exists():
        try:
            tensors = load_file(cache_path)
            if tensors["chosen"].shape == (num_pairs,) and tensors["rejected"].shape == (num_pairs,):
                return tensors["chosen"], tensors["rejected"]
        except Exception:  # a corrupt cache file is recomputed, never trusted
            pass
    return torch.full((num_pairs,), torch.nan), torch.full((num_pairs,), torch.nan)


def _save_cache(cache_path: Path, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    from safetensors.torch import save_file

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_path.with_suffix(f".tmp{os.getpid()}")
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(partial))
    os.replace(partial, cache_path)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def model_fingerprint(path: Path) -> str:
    """sha256 over a model's config and weight files (memoised by path, size and mtime)."""
    from dpop.models import cache_root, sha256_file

    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    stamp = json.dumps([(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo = cache_root() / "fingerprints" / (hashlib.sha256(stamp.encode()).hexdigest() + ".txt")
    if memo.exists():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(sha256_file(file).encode())
    value = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(value)
    return value


def pairs_fingerprint(pairs) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return digest.hexdigest()


def cache_key(*, model_fingerprint: str, pairs_fingerprint: str, schedule: dict) -> str:
    blob = json.dumps({"model": model_fingerprint, "pairs": pairs_fingerprint, "schedule": schedule,
                       "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_path_for(key: str) -> Path:
    from dpop.models import cache_root

    return cache_root() / "reference" / f"{key}.safetensors"
