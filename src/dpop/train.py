"""The training loop for `dpop train` (preference losses) and `dpop sft` (loss "sft"), on accelerate.

    dpop train --loss dpop --max-steps 100 --output-dir runs/dpop
    dpop sft --data pairs.jsonl --output-dir runs/sft      # then: dpop train --ref-model runs/sft/final ...
    dpop train --output-dir runs/dpop --resume             # continue from the last checkpoint

Stages: check the run dir -> load and validate data -> model, tokenizer, tokenise -> reference log-probs
-> optimizer and schedule -> steps (micro-batches, loss, clip, update, metrics, eval, checkpoints) -> final/.
Nothing is written to the run dir before the data has validated and the model has loaded.
The loop never branches on the loss name: losses are looked up in dpop.losses' registry.

Gradient accumulation is exact: each micro-batch's loss is its SUM of per-pair losses divided by the pairs
in the whole optimizer step (sft: chosen tokens in the step), so batch 4 x 1 and batch 1 x 4 give the same
gradient. Resume is exact too: weights, optimizer, scheduler, RNG and the data position are restored and
the data order is a function of (seed, epoch) only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpop.checkpoint import (TrainState, check_run_dir, clear_run_dir, restore_latest, save_checkpoint,
                             save_final)
from dpop.config import TrainConfig, make_config, resolve, write_yaml
from dpop.errors import ConfigError
from dpop.evaluate import pair_losses, pair_metrics, score_pairs
from dpop.logprobs import backbone_and_head, sequence_logps
from dpop.losses import loss_options
from dpop.metrics import (FailureModeWatch, MetricsLog, PairStats, check_trackers, record_pairs,
                          summarize_pairs, tracker_values)
from dpop.pipeline import load_run_pairs, make_batch, micro_batches, steps_per_epoch, tokenize_run_pairs
from dpop.reference import build_reference


@dataclass
class Run:
    """Everything the steps need, built once by `setup`."""

    config: TrainConfig  # resolved: no "auto" or None left where a value is needed
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
    loss_options: dict  # the options the loss declares, from the config (dpop_lambda, ...)
    state: TrainState = field(default_factory=TrainState)

    @property
    def is_sft(self) -> bool:
        return self.config.loss == "sft"

    def layout(self, **extra) -> dict:
        return dict(layout=self.config.layout, pad_id=self.tokenizer.pad_token_id,
                    pack_length=self.config.max_length, **extra)


# --- setup ----------------------------------------------------------------------------------------------

def _disable_dropout(model) -> None:
    """Zero every dropout, also the attention dropout modules keep as a float (Llama's attention_dropout),
    so the policy in train mode computes exactly what the reference computes in eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _add_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if config.lora_target == "all-linear" else [
        name.strip() for name in config.lora_target.split(",") if name.strip()]
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise ConfigError(f"lora_target {config.lora_target!r}: {error}") from None


def _build_model(config: TrainConfig):
    from dpop.models import load_model

    model, tokenizer = load_model(config.model, trust_remote_code=config.trust_remote_code)
    if not config.dropout:
        _disable_dropout(model)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if config.lora_r > 0:
        model = _add_lora(model, config)
    if config.compile:
        backbone_and_head(model)[0].compile()
    return model, tokenizer


def _make_optimizer(config: TrainConfig, model, total_steps: int):
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_class = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[config.optimizer]
    optimizer = optimizer_class(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[config.scheduler]
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def _trackers(config: TrainConfig) -> list:
    """What accelerate's log_with gets: tracker names (tests substitute GeneralTracker instances)."""
    return list(config.trackers)


def _new_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps its settings in process-wide singletons and refuses a second Accelerator with another
    # precision; a second run in one process (sft then train, a notebook, the tests) drops the previous run's
    # settings. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trackers = _trackers(config)
    return Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no",
                       cpu=not torch.cuda.is_available(), log_with=trackers or None, project_dir=str(run_dir))


def setup(config: TrainConfig) -> Run:
    """Validate, load, tokenise and build the reference; write nothing to the run dir except deleting the
    old run on --overwrite once everything else has succeeded."""
    from accelerate.utils import set_seed

    config = resolve(make_config(config.to_dict()))  # a TrainConfig built in Python is validated too
    run_dir = check_run_dir(config)
    check_trackers(config.trackers)
    pairs = load_run_pairs(config)  # every row validated before a model is loaded or a file written
    accelerator = _new_accelerator(config, run_dir)
    if accelerator.num_processes > 1:
        raise ConfigError(f"{accelerator.num_processes} processes: multi-process training is not supported yet "
                          "(the loop does not shard the data); run one process")
    set_seed(config.seed)
    model, tokenizer = _build_model(config)
    model.to(accelerator.device)
    data = tokenize_run_pairs(pairs, tokenizer, config)
    if config.eval_every and data.eval is None:
        print(f"dpop: eval_every {config.eval_every} but no eval_data: no evaluation in this run")
    per_epoch = steps_per_epoch(len(data.train.pairs), config.batch_size, config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    reference, eval_reference = build_reference(config, model, tokenizer, accelerator.autocast, data,
                                                needed_micro_batches=total_steps * config.grad_accum)
    if config.overwrite:
        clear_run_dir(run_dir)
    model.train()
    optimizer, scheduler = _make_optimizer(config, model, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    options = {} if config.loss == "sft" else loss_options(config.loss, config.to_dict())
    return Run(config, run_dir, model, tokenizer, accelerator, data, reference, eval_reference, optimizer,
               scheduler, total_steps, options)


# --- one optimizer step ---------------------------------------------------------------------------------

def _micro_batch_loss(run: Run, micro, stats: PairStats, pairs_in_step: int, tokens_in_step: int) -> tuple:
    """(loss to backpropagate, input tokens) of one micro-batch: chosen and rejected in one forward pass."""
    config, pairs = run.config, run.data.train.pairs
    batch = make_batch(pairs, micro.pair_indices, **run.layout(with_rejected=not run.is_sft))
    batch = batch.to(run.accelerator.device)
    with run.accelerator.autocast():
        policy = sequence_logps(run.model, batch, chunk_tokens=config.chunk_tokens)  # (P,) sums
    ref = run.reference(batch, micro.pair_indices) if run.reference is not None else None
    options = run.loss_options
    losses, chosen_rewards, rejected_rewards = pair_losses(config.loss, policy, ref, beta=config.beta,
                                                           options=options)
    if run.is_sft:
        stats.add(losses=losses, chosen=policy.chosen)
        return -policy.chosen.sum() / tokens_in_step, batch.num_input_tokens  # NLL per chosen token of the step
    record_pairs(stats, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                 policy=policy, ref_chosen=ref.chosen if ref else None, ref_rejected=ref.rejected if ref else None,
                 beta=config.beta, dpop_lambda=options.get("dpop_lambda", 0.0))
    return losses.sum() / pairs_in_step, batch.num_input_tokens


def train_step(run: Run, step_batches) -> dict:
    """One optimizer step over `step_batches` (a list of MicroBatch). Returns the step's metrics row."""
    pairs = run.data.train.pairs
    started = time.perf_counter()
    stats = PairStats()
    pairs_in_step = sum(len(mb.pair_indices) for mb in step_batches)
    tokens_in_step = sum(len(pairs[i].chosen_ids) for mb in step_batches for i in mb.pair_indices)
    tokens = 0
    for micro in step_batches:
        loss, micro_tokens = _micro_batch_loss(run, micro, stats, pairs_in_step, tokens_in_step)
        run.accelerator.backward(loss)
        tokens += micro_tokens
    grad_norm = _clip(run)
    if math.isfinite(grad_norm) and bool(torch.isfinite(stats.get("losses")).all()):
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
    row = (summarize_pairs(stats) if not run.is_sft else
           {"loss": float(stats.get("losses").mean()), "logps/chosen": float(stats.get("chosen").mean())})
    row.update({"lr": lr, "grad_norm": grad_norm, "throughput/pairs_per_s": pairs_in_step / elapsed,
                "throughput/tokens_per_s": tokens / elapsed, "memory/peak_gb": _peak_memory_gb(),
                "step": run.state.step, "epoch": run.state.pairs_seen / len(pairs),
                "pairs_seen": run.state.pairs_seen, "skipped_steps": run.state.skipped_steps})
    return row


def _clip(run: Run) -> float:
    params = [p for p in run.model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if run.config.max_grad_norm > 0:
        return float(run.accelerator.clip_grad_norm_(params, run.config.max_grad_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))


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
                        autocast=run.accelerator.autocast, reference=run.eval_reference, loss=config.loss,
                        beta=config.beta, options=run.loss_options, chunk_tokens=config.chunk_tokens)
    return {f"eval/{key}": value for key, value in pair_metrics(stats).items()}


# --- the run --------------------------------------------------------------------------------------------

def train(config: TrainConfig) -> dict:
    """Run training end to end; returns the summary written to RUN/summary.json."""
    run = setup(config)
    config = run.config
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if config.resume:
        _resume(run)
    write_yaml(config, run.run_dir / "config.yaml")
    log = MetricsLog(run.run_dir / "metrics.jsonl", truncate_after_step=run.state.step if config.resume else None)
    if run.accelerator.log_with:
        run.accelerator.init_trackers(run.run_dir.name, config=config.to_dict())
    watch = FailureModeWatch(config.loss)
    print(f"dpop {'sft' if run.is_sft else 'train'}: loss {config.loss}, {len(run.data.train.pairs)} pairs "
          f"from {run.data.description}, {run.total_steps} steps, precision {config.precision}, "
          f"layout {config.layout}, output {run.run_dir}", flush=True)
    try:
        last_row = _loop(run, log, watch)
        final_eval = evaluate(run)
        if final_eval:
            _log(run, log, {**final_eval, "step": run.state.step, "split": "eval"})
    finally:
        log.close()
    if config.save_every and not (run.run_dir / "checkpoints" / f"step-{run.state.step}").exists():
        _save_checkpoint(run)
    final = save_final(run.run_dir, run.accelerator.unwrap_model(run.model), run.tokenizer)
    run.accelerator.end_training()
    summary = {"steps": run.state.step, "pairs_seen": run.state.pairs_seen, "skipped_steps": run.state.skipped_steps,
               "final_model": str(final), "train_pairs": len(run.data.train.pairs),
               "dropped_pairs": run.data.train.dropped, "watch_fired_at": watch.fired_at,
               "train": last_row, "eval": final_eval}
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(summary_line(run.state.step, last_row, final_eval, final), flush=True)
    return summary


def _resume(run: Run) -> None:
    restored = restore_latest(run.run_dir, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler)
    if restored is None:
        print(f"dpop: {run.run_dir} has no loadable checkpoint; starting from step 0")
        return
    run.state, path = restored
    print(f"dpop: resumed from {path} (step {run.state.step}, {run.state.pairs_seen} pairs seen)")


def _save_checkpoint(run: Run) -> None:
    save_checkpoint(run.run_dir, run.accelerator.unwrap_model(run.model), run.optimizer, run.scheduler, run.state,
                    keep=run.config.keep_checkpoints)


def _log(run: Run, log: MetricsLog, row: dict) -> None:
    log.write(row)
    if run.accelerator.trackers:
        run.accelerator.log(tracker_values(row), step=row["step"])


def _loop(run: Run, log: MetricsLog, watch: FailureModeWatch) -> dict:
    from tqdm.auto import tqdm

    config = run.config
    stream = micro_batches(len(run.data.train.pairs), config.batch_size, config.seed,
                           start_epoch=run.state.epoch, start_index=run.state.micro_index)
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc=config.loss, unit="step")
    row = {}
    while run.state.step < run.total_steps:
        row = train_step(run, [next(stream) for _ in range(config.grad_accum)])
        step = run.state.step
        if step % config.log_every == 0 or step == run.total_steps:
            _log(run, log, {**row, "split": "train"})
        bar.set_postfix(_postfix(row), refresh=False)
        bar.update(1)
        warning = watch.update(step, row.get("logps/chosen_delta", math.nan), row.get("rewards/margins", math.nan))
        if warning:
            bar.write(f"WARNING: {warning}")
        if config.eval_every and step % config.eval_every == 0 and step < run.total_steps and run.data.eval:
            _log(run, log, {**evaluate(run), "step": step, "split": "eval"})
        if config.save_every and step % config.save_every == 0:
            _save_checkpoint(run)
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
