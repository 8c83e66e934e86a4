"""The training loop for `dpop train` (preference losses) and `dpop sft` (loss "sft").

    dpop train --loss dpop --max-steps 100 --output-dir runs/dpop
    dpop sft --data pairs.jsonl --output-dir runs/sft      # then: dpop train --ref-model runs/sft/final ...

Stages: check the run dir -> load and validate data -> model, tokenizer, tokenise -> reference log-probs
-> optimizer and schedule -> steps (micro-batches, loss, clip, update, metrics, eval, checkpoints) -> final/.
The loop never branches on the loss name: losses are looked up in dpop.losses' registry.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpop.checkpoint import TrainState, restore_latest, save_checkpoint
from dpop.config import TrainConfig, write_yaml
from dpop.errors import ConfigError
from dpop.logprobs import sequence_logps
from dpop.losses import LOSSES, loss_options, preference_loss
from dpop.metrics import FailureModeWatch, MetricsLog, PairStats, record_pairs, summarize_pairs
from dpop.pipeline import (load_run_pairs, make_batch, micro_batches, ordered_batches, steps_per_epoch,
                           tokenize_run_pairs)
from dpop.reference import (CachedReference, LiveReference, cache_key, cache_path_for, model_fingerprint,
                            pairs_fingerprint, precompute)


@dataclass
class Run:
    """Everything the steps need, built once by `setup`."""

    config: TrainConfig
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    accelerator: object
    data: object  # RunData
    reference: object | None  # callable (batch, pair_indices) -> RefLogps, or None (sft, reference-free)
    eval_reference: object | None
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    state: TrainState
    sft_tokens_in_step: int = 0  # chosen tokens of the current step (sft averages its loss per token)

    @property
    def is_sft(self) -> bool:
        return self.config.loss == "sft"

    def layout(self, **extra) -> dict:
        return dict(layout=self.config.layout, pad_id=self.tokenizer.pad_token_id,
                    pack_length=self.config.max_length, **extra)


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def check_run_dir(config: TrainConfig) -> Path:
    """Refuse to mix two runs in one dir; nothing is written here."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} exists and is not a directory")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if occupied and not (config.resume or config.overwrite):
        raise ConfigError(f"output_dir {run_dir} already holds files; pass --resume to continue that run or "
                          "--overwrite to replace it")
    if config.resume and not (run_dir / "config.yaml").exists():
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start one")
    return run_dir


def _build_model(config: TrainConfig):
    from dpop.models import load_model

    model, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code)
    if not config.dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model, tokenizer


def _make_optimizer(config: TrainConfig, model, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def _build_reference(config, model, accelerator, data, *, needed_micro_batches: int):
    """(train reference, eval reference) per config.ref_strategy; None for sft and reference-free losses."""
    if config.loss == "sft" or LOSSES[config.loss].reference_free:
        return None, None
    if config.ref_model:
        from dpop.models import load_model

        ref_model, _ = load_model(config.ref_model, trust_remote_code=config.trust_remote_code)
        ref_source = config.ref_model
    elif config.ref_strategy == "model" or config.ref_strategy == "precompute":
        ref_model, ref_source = (copy.deepcopy(model) if config.ref_strategy == "model" else model), config.model
    else:  # lora: the policy with adapters disabled
        ref_model, ref_source = model, config.model
    ref_model.eval()
    for param in (ref_model.parameters() if ref_model is not model else ()):
        param.requires_grad_(False)
    live = LiveReference(ref_model, accelerator.autocast, disable_adapters=config.ref_strategy == "lora" and ref_model is model,
                         chunk_tokens=config.chunk_tokens)
    if config.ref_strategy != "precompute":
        return live, live
    return (_precomputed(config, live, ref_source, data, needed_micro_batches=needed_micro_batches),
            _precomputed(config, live, ref_source, data, split="eval") if data.eval else None)


def _precomputed(config, live, ref_source, data, split: str = "train", needed_micro_batches: int | None = None):
    """A CachedReference over the pairs the run will use, computed in the same micro-batches the policy
    will see (train: the first epoch's order; eval: file order)."""
    from dpop.models import resolve_model

    pairs = data.train.pairs if split == "train" else data.eval.pairs
    layout = dict(layout=config.layout, pad_id=live.model.config.pad_token_id or 0, pack_length=config.max_length)
    if split == "train":
        per_epoch = math.ceil(len(pairs) / config.batch_size)
        count = min(per_epoch, needed_micro_batches or per_epoch)
        stream = micro_batches(len(pairs), config.batch_size, config.seed)
        schedule = [next(stream).pair_indices for _ in range(count)]
    else:
        schedule = [indices for _, indices in ordered_batches(pairs, config.batch_size, **layout)]
    fingerprint = dict(split=split, layout=config.layout, batch_size=config.batch_size, seed=config.seed,
                       precision=resolve_precision(config.precision), chunk_tokens=config.chunk_tokens,
                       lora=config.ref_strategy == "lora")
    key = cache_key(model_fingerprint=model_fingerprint(resolve_model(ref_source)),
                    pairs_fingerprint=pairs_fingerprint(pairs), schedule=fingerprint)
    return precompute(live, schedule, lambda indices: make_batch(pairs, indices, **layout), len(pairs),
                      cache_path=cache_path_for(key), description=f"reference pass ({split})")


def setup(config: TrainConfig) -> Run:
    from accelerate import Accelerator

    run_dir = check_run_dir(config)
    precision = resolve_precision(config.precision)
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no",
                              cpu=not torch.cuda.is_available())
    pairs = load_run_pairs(config)  # every row validated before a model is loaded or a file written
    torch.manual_seed(config.seed)
    model, tokenizer = _build_model(config)
    data = tokenize_run_pairs(pairs, tokenizer, config)
    if config.overwrite and run_dir.exists() and not config.resume:
        shutil.rmtree(run_dir)
    per_epoch = steps_per_epoch(len(data.train.pairs), config.batch_size, config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    state = TrainState()
    reference, eval_reference = _build_reference(config, model, accelerator, data,
                                                 needed_micro_batches=total_steps * config.grad_accum)
    model.train()
    optimizer, scheduler = _make_optimizer(config, model, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return Run(config, run_dir, model, tokenizer, accelerator, data, reference, eval_reference, optimizer,
               scheduler, total_steps, state)


def _loss_for(run: Run, batch, indices, stats: PairStats, pairs_in_step: int) -> torch.Tensor:
    """Sum of per-pair losses of one micro-batch divided by the pairs in the whole step, so that any split
    into micro-batches gives the same gradient."""
    config = run.config
    with run.accelerator.autocast():
        policy = sequence_logps(run.model, batch, chunk_tokens=config.chunk_tokens)
    if run.is_sft:
        # cross-entropy on chosen tokens, averaged per token over the step (stored per pair for metrics)
        losses = -policy.chosen / policy.chosen_lengths.clamp(min=1)
        stats.add(losses=losses, chosen=policy.chosen)
        return -policy.chosen.sum() / run.sft_tokens_in_step
    ref = run.reference(batch, indices) if run.reference is not None else None
    losses, chosen_rewards, rejected_rewards = preference_loss(
        config.loss, policy.chosen, policy.rejected, ref.chosen if ref else None, ref.rejected if ref else None,
        beta=config.beta, chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
        **loss_options(config.loss, config.to_dict()))
    record_pairs(stats, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                 policy=policy, ref_chosen=ref.chosen if ref else None, ref_rejected=ref.rejected if ref else None)
    return losses.sum() / pairs_in_step


def train_step(run: Run, step_batches) -> dict:
    """One optimizer step over `step_batches` (a list of MicroBatch). Returns the step's metrics."""
    config, pairs = run.config, run.data.train.pairs
    started = time.perf_counter()
    stats = PairStats()
    pairs_in_step = sum(len(mb.pair_indices) for mb in step_batches)
    run.sft_tokens_in_step = sum(len(pairs[i].chosen_ids) for mb in step_batches for i in mb.pair_indices)
    tokens = 0
    for micro in step_batches:
        batch = make_batch(pairs, micro.pair_indices, **run.layout(with_rejected=not run.is_sft))
        tokens += batch.num_input_tokens
        loss = _loss_for(run, batch.to(run.accelerator.device), micro.pair_indices, stats, pairs_in_step)
        run.accelerator.backward(loss)
    grad_norm = _clip(run)
    finite = math.isfinite(grad_norm) and bool(torch.isfinite(stats.get("losses")).all())
    if finite:
        run.optimizer.step()
    else:
        run.state.skipped_steps += 1
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    last = step_batches[-1]
    run.state.step += 1
    run.state.epoch, run.state.micro_index = last.epoch, last.index + 1
    run.state.pairs_seen += pairs_in_step
    row = summarize_pairs(stats) if not run.is_sft else {"loss": float(stats.get("losses").mean()),
                                                        "logps/chosen": float(stats.get("chosen").mean())}
    per_epoch_pairs = len(pairs)
    row.update({"lr": lr, "grad_norm": grad_norm, "throughput/pairs_per_s": pairs_in_step / elapsed,
                "throughput/tokens_per_s": tokens / elapsed, "memory/peak_gb": _peak_memory_gb(),
                "step": run.state.step, "epoch": run.state.pairs_seen / per_epoch_pairs,
                "pairs_seen": run.state.pairs_seen, "skipped_steps": run.state.skipped_steps})
    return row


def _clip(run: Run) -> float:
    params = [p for p in run.model.parameters() if p.grad is not None]
    if run.config.max_grad_norm > 0:
        norm = run.accelerator.clip_grad_norm_(params, run.config.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    return float(norm)


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Pair accuracy (policy prefers y_w), implicit-reward accuracy and losses on the eval data."""
    if run.data.eval is None:
        return {}
    pairs, config = run.data.eval.pairs, run.config
    stats = PairStats()
    was_training = run.model.training
    run.model.eval()
    prefers_chosen = []
    for batch, indices in ordered_batches(pairs, config.batch_size, **run.layout(with_rejected=not run.is_sft)):
        batch = batch.to(run.accelerator.device)
        with run.accelerator.autocast():
            policy = sequence_logps(run.model, batch, chunk_tokens=config.chunk_tokens)
        prefers_chosen.append((policy.chosen > policy.rejected).float())
        if run.is_sft:
            stats.add(losses=-policy.chosen / policy.chosen_lengths.clamp(min=1), chosen=policy.chosen)
            continue
        ref = run.eval_reference(batch, indices) if run.eval_reference is not None else None
        losses, chosen_rewards, rejected_rewards = preference_loss(
            config.loss, policy.chosen, policy.rejected, ref.chosen if ref else None, ref.rejected if ref else None,
            beta=config.beta, chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
            **loss_options(config.loss, config.to_dict()))
        record_pairs(stats, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                     policy=policy, ref_chosen=ref.chosen if ref else None, ref_rejected=ref.rejected if ref else None)
    run.model.train(was_training)
    row = summarize_pairs(stats) if not run.is_sft else {"loss": float(stats.get("losses").mean())}
    row = {f"eval/{k}": v for k, v in row.items()}
    if not run.is_sft:
        row["eval/pair_accuracy"] = float(torch.cat(prefers_chosen).mean())
    return row


def _resume(run: Run) -> None:
    restored = restore_latest(run.run_dir, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler)
    if restored is None:
        print(f"dpop: {run.run_dir} has no loadable checkpoint; starting from step 0")
        return
    run.state, path = restored
    print(f"dpop: resumed from {path} (step {run.state.step}, {run.state.pairs_seen} pairs seen)")


def _save_final(run: Run) -> Path:
    final = run.run_dir / "final"
    staging = run.run_dir / ".final.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model = run.accelerator.unwrap_model(run.model)
    model.config.use_cache = True
    model.save_pretrained(staging)
    run.tokenizer.save_pretrained(staging)
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


def train(config: TrainConfig) -> dict:
    """Run training end to end; returns the summary written to RUN/summary.json."""
    run = setup(config)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume:
        _resume(run)
    write_yaml(config, run.run_dir / "config.yaml")
    log = MetricsLog(run.run_dir / "metrics.jsonl", truncate_after_step=run.state.step if config.resume else -1)
    watch = FailureModeWatch(config.loss)
    print(f"dpop {'sft' if run.is_sft else 'train'}: loss {config.loss}, {len(run.data.train.pairs)} pairs "
          f"from {run.data.description}, {run.total_steps} steps, precision {resolve_precision(config.precision)}, "
          f"layout {config.layout}, output {run.run_dir}")
    last_row = _loop(run, log, watch)
    final_eval = evaluate(run)
    if final_eval:
        log.write({**final_eval, "step": run.state.step, "split": "eval"})
    log.close()
    final = _save_final(run)
    summary = {"steps": run.state.step, "pairs_seen": run.state.pairs_seen, "final_model": str(final),
               "dropped_pairs": run.data.train.dropped, "watch_fired_at": watch.fired_at,
               "train": last_row, "eval": final_eval}
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _print_summary(run, last_row, final_eval, final)
    return summary


def _loop(run: Run, log: MetricsLog, watch: FailureModeWatch) -> dict:
    from tqdm.auto import tqdm

    config = run.config
    stream = micro_batches(len(run.data.train.pairs), config.batch_size, config.seed,
                           start_epoch=run.state.epoch, start_index=run.state.micro_index)
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=f"dpop {config.loss}", unit="step")
    row = {}
    while run.state.step < run.total_steps:
        row = train_step(run, [next(stream) for _ in range(config.grad_accum)])
        step = run.state.step
        if step % config.log_every == 0 or step == run.total_steps:
            log.write({**row, "split": "train"})
        bar.set_postfix(_postfix(row), refresh=False)
        bar.update(1)
        warning = watch.update(step, row.get("logps/chosen_delta", math.nan), row.get("rewards/margins", math.nan))
        if warning:
            bar.write(f"WARNING: {warning}")
        if config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
            log.write({**evaluate(run), "step": step, "split": "eval"})
        if config.save_every and step % config.save_every == 0:
            save_checkpoint(run.run_dir, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler,
                            run.state, keep=config.keep_checkpoints)
    bar.close()
    return row


def _postfix(row: dict) -> dict:
    names = {"loss": "loss", "rewards/margins": "margin", "logps/chosen_delta": "chosen_delta"}
    return {short: f"{row[key]:.4f}" for key, short in names.items() if key in row and row[key] is not None}


def _print_summary(run: Run, row: dict, final_eval: dict, final: Path) -> None:
    parts = [f"{run.state.step} steps", f"loss {row.get('loss', math.nan):.4f}"]
    if "rewards/accuracies" in row:
        parts += [f"reward acc {row['rewards/accuracies']:.3f}", f"margin {row['rewards/margins']:.4f}",
                  f"chosen_delta {row['logps/chosen_delta']:.4f}"]
    if "eval/pair_accuracy" in final_eval:
        parts.append(f"eval pair acc {final_eval['eval/pair_accuracy']:.3f}")
    print(f"dpop: done: {', '.join(parts)}; final model in {final}", file=sys.stdout)

