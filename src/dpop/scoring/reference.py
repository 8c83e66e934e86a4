"""Reference log-probs: precomputed and cached on disk, a live frozen model, or the LoRA base.

Whatever the strategy, the reference pass runs the same batches, layout and precision as the policy's
forward, so at step 0 policy and reference log-probs agree and the first rewards are 0.

The `precompute` cache lives in `$DPOP_CACHE/reference/<key>.safetensors`. The key hashes the reference
model's weights and config, the token ids of every pair (which covers the data, the tokenizer and the
truncation) and the batch schedule (layout, batch size, seed, precision), so a later run with the same
inputs (a dpo run after a dpop run, or a resumed run) skips the reference pass.

The train pairs are precomputed in the micro-batches of the first epoch, exactly as the policy will see
them; later epochs visit the pairs in other batches, where the policy's log-probs of a pair can differ from
the cached reference by rounding (fp32: ~1e-6 nats; bf16: more), which is far below what training moves.

With several processes each one scores the slices of the micro-batches it will train on; the results are
gathered, the main process writes the cache, and every process uses the main process's copy (dpop.distributed).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dpop.data.order import micro_batches, pair_lengths
from dpop.precision import dither_like_policy, prepare_model
from dpop.scoring.batching import PairBatch, make_batch, ordered_batches
from dpop.scoring.logprobs import DEFAULT_CHUNK_TOKENS, SequenceLogps, sequence_logps

logger = logging.getLogger(__name__)
GUIDE_DIR = "guide"  # a Pre-DPO run's guide run, inside its run dir


@dataclass
class RefLogps:
    chosen: torch.Tensor  # (P,)
    rejected: torch.Tensor  # (P,)


class LiveReference:
    """Computes reference log-probs with a frozen model (a copy, a separate ref_model, or the policy
    itself with its LoRA adapters disabled)."""

    def __init__(self, model, autocast, *, disable_adapters: bool = False,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ld_alpha: float | None = None):
        self.model = model
        self.autocast = autocast
        self.disable_adapters = disable_adapters
        self.chunk_tokens = chunk_tokens
        self.ld_alpha = ld_alpha  # LD-DPO weights the reference's sums as the policy's

    @torch.no_grad()
    def __call__(self, batch: PairBatch, pair_indices, *, keep_hidden: bool = False):
        """RefLogps; with `keep_hidden` the whole SequenceLogps, response states and head kept (TDPO's KL)."""
        adapters_off = self.model.disable_adapter() if self.disable_adapters else contextlib.nullcontext()
        batch = batch.to(next(self.model.parameters()).device)
        was_training = self.model.training  # the policy itself (lora) is in train mode: no dropout here
        self.model.eval()
        try:
            with adapters_off, self.autocast():
                logps = sequence_logps(self.model, batch, chunk_tokens=self.chunk_tokens, ld_alpha=self.ld_alpha,
                                       keep_hidden=keep_hidden)
        finally:
            self.model.train(was_training)
        if keep_hidden:
            logps.chosen, logps.rejected = logps.chosen.float(), logps.rejected.float()
            return logps
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
        device = batch.input_ids.device
        return RefLogps(chosen.to(device), rejected.to(device))


def build_reference(config, model, tokenizer, autocast, data, *, needed_micro_batches: int, processes=None,
                    policy_on_disk: bool = True):
    """(train reference, eval reference) per config.ref_strategy: callables (batch, pair_indices) -> RefLogps,
    or (None, None) for a reference-free loss (sft among them). Call it before training starts: `precompute` and the
    policy-as-reference read the model's current (initial) weights. `processes`: the accelerator of a
    multi-process run (`needed_micro_batches` then counts micro-batches of all processes together).
    `policy_on_disk`: False for a model handed over in memory, whose weights no file fingerprints: its
    precomputed log-probs are kept in memory only, never in (or from) the disk cache."""
    from dpop.distributed import SingleProcess
    from dpop.losses.objective import objective_of

    processes = processes or SingleProcess()

    if objective_of(config).reference_free:
        if config.ref_model:
            logger.warning("dpop: loss %s uses no reference model; ref_model %s is ignored", config.loss,
                           config.ref_model)
        return None, None
    ref_path = guide_model(config) if config.ref_strategy == "guided" else config.ref_model
    if ref_path:
        from dpop.models import load_model

        ref_model, ref_tokenizer = load_model(ref_path, trust_remote_code=config.trust_remote_code)
        check_same_tokenizer(tokenizer, ref_tokenizer, ref_path)
        device = next(model.parameters()).device
        prepare_model(ref_model, config.precision, device)  # the same arithmetic as the policy's
        if config.precision == "bf16-sr":  # the same weights as the policy's start, if it is the same model
            dither_like_policy(ref_model, trainable_names(model), config.seed)
        ref_model.to(device)
        ref_source = ref_path
    elif config.ref_strategy == "model":
        ref_model, ref_source = copy.deepcopy(model), config.model if policy_on_disk else None
    else:  # precompute from the policy itself, or lora: the policy with its adapters disabled
        ref_model, ref_source = model, config.model if policy_on_disk else None
    if ref_model is not model:
        ref_model.eval()
        ref_model.requires_grad_(False)
    live = LiveReference(ref_model, autocast, disable_adapters=hasattr(ref_model, "disable_adapter"),
                         chunk_tokens=config.chunk_tokens, ld_alpha=config.ld_alpha)
    if config.ref_strategy not in ("precompute", "guided"):
        return live, live
    layout = dict(layout=config.layout, pad_id=tokenizer.pad_token_id, pack_length=config.max_length)
    # bf16-sr dithered the policy's trainable parameters (all of them, or a LoRA's adapters alone) by seed
    dithered = (hashlib.sha256(",".join(trainable_names(model)).encode()).hexdigest()
               if config.precision == "bf16-sr" else None)
    train = _precomputed(config, live, ref_source, data.train.pairs, layout, "train",
                         _first_epoch_schedule(config, len(data.train.pairs), needed_micro_batches,
                                               processes.num_processes, pair_lengths(data.train.pairs, config)),
                         processes, dithered=dithered)
    evaluation = None
    if data.eval is not None:
        schedule = [indices for _, indices in ordered_batches(data.eval.pairs, config.eval_batch_size, **layout)]
        evaluation = _precomputed(config, live, ref_source, data.eval.pairs, layout, "eval", schedule, processes,
                                  dithered=dithered)
    return train, evaluation


def _first_epoch_schedule(config, num_pairs: int, needed_micro_batches: int, world: int = 1,
                          lengths=None) -> list[list[int]]:
    """The micro-batches the run will draw, up to one epoch (later epochs revisit the same pairs), as the
    processes will score them: each micro-batch of world × batch_size pairs as its `world` slices, in process
    order (entry k belongs to process k % world)."""
    from dpop.distributed import all_slices

    size = world * config.batch_size
    count = min(math.ceil(num_pairs / size), needed_micro_batches)
    stream = micro_batches(num_pairs, size, config.seed, lengths=lengths, group_size=size * config.grad_accum)
    return [piece for _ in range(count) for piece in all_slices(next(stream).pair_indices, world)]


def _precomputed(config, live, ref_source, pairs, layout: dict, split: str, schedule, processes, *,
                 dithered: str | None) -> CachedReference:
    """`dithered`: under bf16-sr, a hash of the parameters the policy's start dithered (None: none were).
    `ref_source` None (a model in memory): no disk cache."""
    from dpop.models import resolve_model

    fingerprint = dict(split=split, layout=config.layout, seed=config.seed, precision=config.precision,
                       batch_size=config.batch_size if split == "train" else config.eval_batch_size,
                       chunk_tokens=config.chunk_tokens, group_by_length=config.group_by_length,
                       arithmetic=4)  # 4: the target's logit in fp32 under bf16 (3: a .gguf's weights rounded
    # onto the bf16 grid; 2: fp32 attention under bf16 on CPU and the fused lm head); bf16-sr dithers by seed
    if split == "train" and config.group_by_length:  # length groups span a whole optimizer step
        fingerprint["grad_accum"] = config.grad_accum
    if split == "train" and processes.num_processes > 1:  # other batches: other rounding (single-process keys kept)
        fingerprint["num_processes"] = processes.num_processes
    if dithered:
        fingerprint["dithered"] = dithered
    if config.ld_alpha is not None:  # LD-DPO's weighted sums (older keys unchanged)
        fingerprint["ld_alpha"] = config.ld_alpha
    key = cache_key(model_fingerprint=model_fingerprint(resolve_model(ref_source)),
                    pairs_fingerprint=pairs_fingerprint(pairs), schedule=fingerprint) if ref_source else None
    return precompute(live, schedule, lambda indices: make_batch(pairs, indices, **layout), len(pairs),
                      cache_path=cache_path_for(key) if key else None, description=f"reference pass ({split})",
                      processes=processes)


def guide_model(config) -> str:
    """Pre-DPO's reference: the guide run's final model (dpop.training.guided trains it first)."""
    return str(Path(config.output_dir) / GUIDE_DIR / "final")


def trainable_names(model) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def check_same_tokenizer(policy_tokenizer, ref_tokenizer, ref_name) -> None:
    """The reference must read the same token ids as the policy, or its log-probs mean nothing."""
    from dpop.errors import ConfigError

    if policy_tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ConfigError(f"ref_model {ref_name}: its tokenizer differs from the policy's ({len(ref_tokenizer)} vs "
                          f"{len(policy_tokenizer)} tokens or different ids); the reference must share the policy's "
                          "tokenizer, e.g. an SFT model trained from the same base")


def precompute(live: LiveReference, schedule: list[list[int]], build, num_pairs: int, *,
               cache_path: Path | None, progress: bool = True, description: str = "reference pass",
               processes=None) -> CachedReference:
    """Reference log-probs for every pair in `schedule` (a list of micro-batches of pair indices, each laid
    out by `build(indices) -> PairBatch`). Pairs already in the cache file are not recomputed; a run that
    needs more pairs than an earlier one computes only the missing batches and extends the file.

    With several `processes` (an accelerator), entry k of the schedule is scored by process k % N; the main
    process alone reads and writes the cache file, and every process returns the same complete tensors."""
    from tqdm.auto import tqdm

    from dpop.distributed import SingleProcess, from_main, merge_computed

    processes = processes or SingleProcess()
    world, main = processes.num_processes, processes.is_main_process
    chosen, rejected = from_main(_load_cache(cache_path, num_pairs) if main else None, processes)
    todo = [k for k, indices in enumerate(schedule)  # empty slices (a short last batch) are never todo
            if torch.isnan(chosen[torch.as_tensor(indices, dtype=torch.long)]).any()]
    if not todo:
        if schedule and main:
            logger.info("dpop: %s: all %d pairs from cache", description, sum(map(len, schedule)))
        return CachedReference(chosen, rejected)
    mine = [schedule[k] for k in todo if k % world == processes.process_index]
    for indices in tqdm(mine, desc=description, unit="batch", disable=not (progress and main)):
        result = live(build(indices), indices)
        index = torch.as_tensor(indices, dtype=torch.long)
        chosen[index], rejected[index] = result.chosen.cpu(), result.rejected.cpu()
    chosen, rejected = merge_computed((chosen, rejected), processes)
    if cache_path is not None and main:
        _save_cache(cache_path, chosen, rejected)
    processes.wait_for_everyone()  # the cache file is complete before any process goes on
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
    from dpop.models.builtin import cache_root, sha256_file

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
    from dpop.models.builtin import cache_root

    return cache_root() / "reference" / f"{key}.safetensors"


class OwnReference:
    """score_pairs' reference when the scored model is the reference model itself (the demo's SFT row):
    the policy's own log-probs, which are the same computation, so the model runs once per batch. Each
    batch's values are kept in `memo` under its pair indices, as `_memoized` keeps them, so models scored
    later against this one with the same memo reuse them."""

    def __init__(self, memo: dict):
        self.memo = memo

    def record(self, indices, policy: SequenceLogps):
        from dpop.scoring.reference import RefLogps

        ref = RefLogps(policy.chosen.detach().float(), policy.rejected.detach().float())
        self.memo[tuple(indices)] = ref
        return ref


def _memoized(reference, memo: dict):
    def lookup(batch, indices):
        key = tuple(indices)
        if key not in memo:
            memo[key] = reference(batch, indices)
        return memo[key]

    return lookup
