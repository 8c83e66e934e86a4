"""The training loop for `dpop train` and `dpop sft` (the registered loss sft), on accelerate.

    dpop train --loss dpop --max-steps 100 --output-dir runs/dpop
    dpop sft --data pairs.jsonl --output-dir runs/sft      # then: dpop train --ref-model runs/sft/final ...
    dpop train --output-dir runs/dpop --resume             # continue from the last checkpoint

Stages: check the run dir -> load and validate data -> model, tokenizer, tokenise -> reference log-probs
-> optimizer and schedule -> steps (micro-batches, loss, clip, update, metrics, eval, checkpoints) -> final/.
Nothing is written to the run dir before the data has validated and the model has loaded.
The loop never branches on the loss name: losses are looked up in dpop.losses' registry.

Gradient accumulation is exact: each micro-batch's loss is its SUM of per-pair losses divided by the units
of the whole optimizer step (its pairs; for a per-token loss such as sft, its chosen tokens: LossSpec.units),
so batch 4 x 1 and batch 1 x 4 give the same gradient, and the logged loss is the one optimised. Resume is exact too: weights, optimizer, scheduler, RNG and the data position are restored and
the data order is a function of (seed, epoch) only. On several processes (accelerate launch, torchrun, or
--num-processes) batch_size is per process and the run takes the single-process run's steps: dpop.distributed.
A first SIGINT/SIGTERM ends the run after the step in progress with a checkpoint and the command that resumes
it; non-finite steps are skipped, and max_bad_steps of them in a row stop the run (dpop.training.stopping).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from dpop import distributed, precision
from dpop.config import TrainConfig, make_config
from dpop.config.flags import write_yaml
from dpop.data.order import micro_batches, optimizer_steps, pair_lengths
from dpop.scoring.batching import make_batch
from dpop.scoring.metrics import PRECISION_KEYS, PairStats, summarize_pairs
from dpop.scoring.pairs import pair_metrics, record_scored, score_pairs
from dpop.training.checkpoint import make_run_dir, resume_run, save_final, save_run_checkpoint
from dpop.training.monitor import DeadZoneWatch, FailureModeWatch, MetricsLog, tracker_values
from dpop.training.setup import Run, RunInputs, setup
from dpop.training.stopping import StopSignals, non_finite_error, run_stopped

logger = logging.getLogger(__name__)


# --- setup ----------------------------------------------------------------------------------------------


# --- one optimizer step ---------------------------------------------------------------------------------

def _micro_batch_loss(run: Run, micro, stats: PairStats, units_in_step: dict[str, float]) -> tuple:
    """(loss to backpropagate, input tokens) of this process's share of one micro-batch: chosen and rejected
    in one forward pass."""
    config, pairs, accelerator = run.config, run.data.train.pairs, run.accelerator
    indices, weight = distributed.process_share(micro.pair_indices, accelerator.process_index,
                                                accelerator.num_processes)
    batch = make_batch(pairs, indices, **run.layout(with_rejected=run.objective.uses_rejected))
    batch = batch.to(accelerator.device)
    needs_kl = run.objective.needs_kl  # TDPO: the reference first, its states for the token KLs
    ref = run.reference(batch, indices, keep_hidden=True) if needs_kl else None
    with accelerator.autocast():
        policy = run.scorer(batch, kl_target=ref) if needs_kl else run.scorer(batch)  # (P,) sums
    reduce = distributed.sum_over_processes(accelerator)  # KTO's reference point: sums over every process's rows
    if ref is None and run.reference is not None and (weight or run.objective.unpaired):
        ref = run.reference(batch, indices)
    if not weight:  # an empty share of a short batch: the forward and backward the collectives need, adding 0
        run.objective.reference_point(policy, ref, reduce=reduce, weight=0.0)  # KTO: joins the z0 sum
        return policy.chosen.sum() * 0.0, 0
    output = record_scored(stats, run.objective, policy, ref, beta=config.beta, reduce=reduce)
    # The engines AVERAGE gradients over processes; × num_processes turns that average into the sum over all
    # the step's pairs / units_in_step, the single-process gradient (dpop.distributed).
    return output.step_loss(units_in_step) * accelerator.num_processes, batch.num_input_tokens


def train_step(run: Run, step_batches) -> dict:
    """One optimizer step over `step_batches` (a list of MicroBatch). Returns the step's metrics row."""
    pairs = run.data.train.pairs
    started = time.perf_counter()
    stats = PairStats()
    pairs_in_step = sum(len(mb.pair_indices) for mb in step_batches)
    lengths = torch.tensor([len(pairs[i].chosen_ids) for mb in step_batches for i in mb.pair_indices])
    units_in_step = run.objective.units_in_step(lengths)
    tokens = 0
    accelerator = run.accelerator
    for position, micro in enumerate(step_batches):
        is_last = position == len(step_batches) - 1
        accelerator.sync_gradients = is_last  # DeepSpeed ends the step at the backward that syncs
        with contextlib.nullcontext() if is_last else distributed.no_sync(accelerator, run.scorer, run.config):
            loss, micro_tokens = _micro_batch_loss(run, micro, stats, units_in_step)
            accelerator.backward(loss)
        tokens += micro_tokens
    stats, tokens = distributed.gather_step(stats, tokens, accelerator)  # every process's pairs, on every process
    grad_norm = _clip(run)
    update = dict.fromkeys(PRECISION_KEYS, math.nan)
    if math.isfinite(grad_norm) and bool(torch.isfinite(stats.get("losses")).all()):
        before = run.weights.sample()
        run.optimizer.step()
        update = run.weights.update_metrics(before)
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
    row = summarize_pairs(stats)
    row.update({"lr": lr, "grad_norm": grad_norm, "throughput/pairs_per_s": pairs_in_step / elapsed,
                "throughput/tokens_per_s": tokens / elapsed, "memory/peak_gb": _peak_memory_gb(),
                "step": run.state.step, "epoch": run.state.pairs_seen / len(pairs),
                "pairs_seen": run.state.pairs_seen, "skipped_steps": run.state.skipped_steps, **update})
    return row


def _clip(run: Run) -> float:
    params = [p for p in run.model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return distributed.clip_gradients(run.accelerator, run.config, params, run.config.max_grad_norm)


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def evaluate(run: Run) -> dict:
    """Pair accuracy, implicit-reward accuracy, losses and log-probs on the eval data, keys prefixed `eval/`.
    No grad, in batches of eval_batch_size (larger than training's)."""
    if run.data.eval is None:
        return {}
    config = run.config
    stats = score_pairs(run.model, run.data.eval.pairs, batch_size=config.eval_batch_size, layout=run.layout(),
                        autocast=run.accelerator.autocast, reference=run.eval_reference,
                        objective=run.objective, beta=config.beta, chunk_tokens=config.chunk_tokens,
                        forward=run.scorer, processes=run.accelerator)  # each process scores its share
    return {f"eval/{key}": value for key, value in pair_metrics(stats).items()}


# --- the run --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainResult:
    """What `train` returns: the run's summary (RUN/summary.json), where its files are, and the trained model."""

    summary: dict
    run_dir: Path
    metrics_path: Path  # RUN/metrics.jsonl: one row per logged step (train and eval)
    final_model: Path  # RUN/final: a Hugging Face model dir (or a LoRA adapter dir with lora_save adapter)
    model: torch.nn.Module  # the trained policy in memory, master weights (a peft model under LoRA)
    tokenizer: object


def train(config: TrainConfig | Mapping | None = None, *, model=None, tokenizer=None, data=None, eval_data=None,
          **overrides) -> TrainResult:
    """Train end to end, from Python as `dpop train` does from the shell.

        from dpop import TrainConfig, train
        result = train(TrainConfig(loss="dpop", max_steps=100), data=[{"prompt": ..., "chosen": ..., "rejected": ...}])
        result.summary["train"]["logps/chosen_delta"], result.final_model

    Args:
        config: a TrainConfig, or a mapping of its keys (validated the same way); None: the defaults.
        model, tokenizer: a causal LM and its tokenizer to train in place, instead of loading config.model. The
            precomputed reference log-probs of a model in memory are not cached on disk (no file to key them by).
        data, eval_data: pairs in memory instead of config.data / config.eval_data: a list of row dicts (any
            shape `dpop data doctor` accepts), a datasets.Dataset, LoadedPairs or a list of PreferencePair.
        **overrides: config keys that replace the config's (train(config, max_steps=10)).
    Returns:
        TrainResult. The process is left as it was found: signal handlers and transformers' attention registry
        are restored; messages go to the `dpop` logger (configure logging to see them; warnings show anyway).
    Raises:
        ConfigError, DataError, ModelError (dpop.errors) before anything is written; RunStopped after a clean stop
        on SIGINT/SIGTERM (a checkpoint was written).
    """
    from dpop.speed import keep_freed_memory

    values = config.to_dict() if isinstance(config, TrainConfig) else dict(config or {})
    config = make_config({**values, **overrides})
    inputs = RunInputs(model, tokenizer, data, eval_data)
    if config.ref_strategy == "guided":  # Pre-DPO: the guide run first (dpop.training.guided)
        from dpop.training.guided import run_guide

        config = run_guide(config, inputs)
    keep_freed_memory()
    with precision.fp32_attention_scope():
        try:
            run = setup(config, inputs)
        except BaseException:
            if model is not None:  # a model handed over may already compute with the fp32 attention
                precision.restore_sdpa(model)
            raise
        try:
            summary = _run(run)
        finally:
            precision.restore_sdpa(run.accelerator.unwrap_model(run.model))
            run.weights.release()  # the model in memory holds the master weights, as final/ does
    return TrainResult(summary=summary, run_dir=run.run_dir, metrics_path=run.run_dir / "metrics.jsonl",
                       final_model=run.run_dir / "final", model=run.accelerator.unwrap_model(run.model),
                       tokenizer=run.tokenizer)


def _run(run: Run) -> dict:
    """The steps, the final evaluation and the final model of a set-up run; returns the summary."""
    config = run.config
    main = run.accelerator.is_main_process  # the only process that writes the run dir
    if main:
        make_run_dir(run.run_dir)
    if config.resume:
        resume_run(run)
    if main:
        write_yaml(config, run.run_dir / "config.yaml")
    log = (MetricsLog(run.run_dir / "metrics.jsonl", truncate_after_step=run.state.step if config.resume else None)
           if main else distributed.DiscardLog())
    if run.accelerator.log_with:
        run.accelerator.init_trackers(run.run_dir.name, config=config.to_dict())
    watch = FailureModeWatch(run.objective.names)
    precision_watch = DeadZoneWatch(config.precision)
    logger.info(f"dpop: loss {config.loss}, {len(run.data.train.pairs)} pairs "
          f"from {run.data.description}, {run.total_steps} steps, precision {config.precision}, "
          f"layout {config.layout}, output {run.run_dir}")
    try:
        with StopSignals() as stop:  # SIGINT/SIGTERM: finish the step, checkpoint, exit 0 (dpop.training.stopping)
            last_row = _loop(run, log, (watch, precision_watch), stop)
        if stop.received and run.state.step < run.total_steps:
            _stop(run, stop.received)
        final_eval = evaluate(run)
        if final_eval:
            _log(run, log, {**final_eval, "step": run.state.step, "split": "eval"})
    finally:
        log.close()
    saved = distributed.from_main((run.run_dir / "checkpoints" / f"step-{run.state.step}").exists(), run.accelerator)
    if config.save_every and not saved:
        save_run_checkpoint(run)
    final = run.run_dir / "final"
    precision.restore_sdpa(run.accelerator.unwrap_model(run.model))  # final/ names a standard attention
    with run.weights.masters():  # final/ holds the weights without bf16-sr's dither
        weights = distributed.gathered_weights(run.accelerator, config, run.scorer)  # FSDP / ZeRO-3 only; all processes
        if main:
            save_final(run.run_dir, run.accelerator.unwrap_model(run.model), run.tokenizer,
                       adapter_only=config.lora_save == "adapter", state_dict=weights)
    summary = {"steps": run.state.step, "pairs_seen": run.state.pairs_seen, "skipped_steps": run.state.skipped_steps,
               "final_model": str(final), "train_pairs": len(run.data.train.pairs),
               "dropped_pairs": run.data.train.dropped, "watch_fired_at": watch.fired_at,
               "precision_watch_fired_at": precision_watch.fired_at,
               "train": last_row, "eval": final_eval}
    if main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    logger.info(summary_line(run.state.step, last_row, final_eval, final))
    distributed.shut_down(run.accelerator, run.scorer)
    return summary


def _log(run: Run, log: MetricsLog, row: dict) -> None:
    log.write(row)
    if run.accelerator.trackers:
        run.accelerator.log(tracker_values(row), step=row["step"])


def _stop(run: Run, signal_name: str) -> None:
    """The run stopped on a signal after a whole step, which the loop has checkpointed: RunStopped."""
    checkpoint = run.run_dir / "checkpoints" / f"step-{run.state.step}"
    distributed.shut_down(run.accelerator, run.scorer)
    raise run_stopped(signal_name, run.state.step, run.total_steps, checkpoint, run.config)


def _loop(run: Run, log: MetricsLog, watches, stop: StopSignals | None = None) -> dict:
    from tqdm.auto import tqdm

    config = run.config
    stream = micro_batches(len(run.data.train.pairs), run.world_batch, config.seed,
                           start_epoch=run.state.epoch, start_index=run.state.micro_index,
                           lengths=pair_lengths(run.data.train.pairs, config),
                           group_size=run.world_batch * config.grad_accum)
    steps = optimizer_steps(stream, config.grad_accum)
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=config.loss, unit="step",
               disable=not run.accelerator.is_main_process)
    row, bad_streak = {}, 0  # bad_streak: steps in a row whose update was skipped (non-finite)
    while run.state.step < run.total_steps:
        skipped_before = run.state.skipped_steps
        row = train_step(run, next(steps))
        step = run.state.step
        if run.sync is not None:  # TR-DPO: the reference follows the policy
            run.sync.after_step(step)
        bad_streak = bad_streak + 1 if run.state.skipped_steps > skipped_before else 0
        if step % config.log_every == 0 or step == run.total_steps or bad_streak:
            _log(run, log, {**row, "split": "train"})
        if config.max_bad_steps and bad_streak >= config.max_bad_steps:
            bar.close()
            raise non_finite_error(step, bad_streak, config, run.run_dir)
        bar.set_postfix(_postfix(row), refresh=False)
        bar.update(1)
        failure_watch, precision_watch = watches
        for warning in (failure_watch.update(step, row.get("logps/chosen_delta", math.nan),
                                             row.get("rewards/margins", math.nan)),
                        precision_watch.update(step, row)):
            if warning:
                bar.write(f"WARNING: {warning}")
        if config.eval_every and step % config.eval_every == 0 and step < run.total_steps and run.data.eval:
            _log(run, log, {**evaluate(run), "step": step, "split": "eval"})
        # no checkpoint of a skipped step: the newest checkpoint stays the last good one
        saved = bool(config.save_every and step % config.save_every == 0 and not bad_streak)
        if saved:
            save_run_checkpoint(run)
        # all processes stop after the same step, whichever got the signal (one that lands while they agree
        # counts at the next step)
        stopping = stop is not None and distributed.agree_on_stop(stop.received, run.accelerator)
        if stopping and not stop.received:
            stop.received = stopping
        if stopping and step < run.total_steps:
            if not saved:
                save_run_checkpoint(run)
            break
    bar.close()
    return row


def _postfix(row: dict) -> dict:
    names = {"loss": "loss", "rewards/margins": "margin", "logps/chosen_delta": "chosen_delta"}
    return {short: f"{row[key]:.4f}" for key, short in names.items()
            if isinstance(row.get(key), float) and math.isfinite(row[key])}


def summary_line(steps: int, row: dict, final_eval: dict, final: Path) -> str:
    """The one line a run ends with."""
    parts = [f"{steps} steps", f"loss {row.get('loss', math.nan):.4f}"]
    for key, name in (("rewards/accuracies", "reward acc"), ("rewards/margins", "margin"),
                      ("logps/chosen_delta", "chosen_delta"), ("eval/pair_accuracy", "eval pair acc"),
                      ("eval/rewards/accuracies", "eval reward acc")):
        value = row.get(key, final_eval.get(key))
        if isinstance(value, float) and math.isfinite(value):
            parts.append(f"{name} {value:.4f}")
    return f"dpop: done: {', '.join(parts)}; final model in {final}"
