"""Metric names (DESIGN.md §6), their computation from a step's log-probs, the JSONL log, the trackers and
the failure-mode watch.

Train rows of metrics.jsonl carry every key of ALL_KEYS (null where a value does not exist, e.g. reference
log-probs under a reference-free loss) plus `"split": "train"`; eval rows carry the same pair keys prefixed
`eval/`, plus `eval/pair_accuracy`, `step` and `"split": "eval"`. Beyond §6, `dpop/penalized_chosen_reward`
is DESIGN §1's penalised chosen reward β·(lw − rw − λ·max(0, rw − lw)), with λ = the loss's dpop_lambda
(0 for losses without one, where it equals rewards/chosen). `precision/updated_frac` (the fraction of
trainable elements whose compute-dtype value changed in the step) and `precision/update_ratio` (Σ|Δ compute
value| / Σ|Δ fp32 value|: ~1 where updates reach the model as it computes, ~0 in bf16's dead zone) are measured
on a fixed sample of 2^18 elements (dpop.precision.TrainedWeights); DeadZoneWatch warns on the second.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpop.errors import ConfigError
from dpop.losses import dpop_penalty

PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "logps/chosen_delta",
             "dpop/penalty", "dpop/active_frac", "tokens/divergent_chosen_logp")
STEP_KEYS = ("lr", "grad_norm", "throughput/pairs_per_s", "throughput/tokens_per_s", "memory/peak_gb",
             "step", "epoch", "pairs_seen")
PRECISION_KEYS = ("precision/updated_frac", "precision/update_ratio")  # dpop.precision.TrainedWeights
ALL_KEYS = PAIR_KEYS + STEP_KEYS + PRECISION_KEYS
EXTRA_PAIR_KEYS = ("dpop/penalized_chosen_reward",)


@dataclass
class PairStats:
    """Per-pair tensors of one step, detached, gathered over micro-batches."""

    parts: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            self.parts.setdefault(name, []).append(value.detach().float().cpu().reshape(-1))

    def get(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name]) if name in self.parts else torch.empty(0)

    def __len__(self) -> int:
        return len(self.get("losses"))


def record_pairs(stats: PairStats, *, losses, chosen_rewards, rejected_rewards, policy, ref_chosen, ref_rejected,
                 beta: float = 0.0, dpop_lambda: float = 0.0, units=None) -> None:
    """Add one micro-batch to `stats`. `policy` is a SequenceLogps; ref_* are (P,) tensors or None; `losses`
    may be None (evaluation without a loss); `units` (P,) what each pair counts for in the logged loss
    (dpop.losses.LossSpec.units; None = 1 each, the mean over pairs)."""
    nan = torch.full_like(policy.chosen, math.nan)
    stats.add(loss_units=units if units is not None else torch.ones_like(policy.chosen))
    chosen_delta = policy.chosen - ref_chosen if ref_chosen is not None else nan
    penalty = dpop_penalty(policy.chosen, ref_chosen) if ref_chosen is not None else torch.zeros_like(policy.chosen)
    stats.add(losses=losses if losses is not None else nan,
              chosen_rewards=chosen_rewards if chosen_rewards is not None else nan,
              rejected_rewards=rejected_rewards if rejected_rewards is not None else nan,
              penalized_chosen_rewards=(chosen_rewards - beta * dpop_lambda * penalty
                                        if chosen_rewards is not None else nan),
              chosen=policy.chosen, rejected=policy.rejected, chosen_delta=chosen_delta,
              penalty=penalty if ref_chosen is not None else nan,
              ref_chosen=ref_chosen if ref_chosen is not None else nan,
              ref_rejected=ref_rejected if ref_rejected is not None else nan,
              divergent=policy.divergent_chosen_mean())


def summarize_pairs(stats: PairStats) -> dict[str, float]:
    """Means over the step's pairs, named as DESIGN.md §6."""
    chosen_rewards, rejected_rewards = stats.get("chosen_rewards"), stats.get("rejected_rewards")
    penalty = stats.get("penalty")
    no_rewards = bool(torch.isnan(chosen_rewards).all())
    return {
        "loss": _weighted_mean(stats.get("losses"), stats.get("loss_units")),
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": math.nan if no_rewards else _mean((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": _mean(stats.get("chosen")),
        "logps/rejected": _mean(stats.get("rejected")),
        "logps/ref_chosen": _mean(stats.get("ref_chosen")),
        "logps/ref_rejected": _mean(stats.get("ref_rejected")),
        "logps/chosen_delta": _mean(stats.get("chosen_delta")),
        "dpop/penalty": _mean(penalty),
        "dpop/active_frac": _mean(torch.where(torch.isnan(penalty), penalty, (penalty > 0).float())),
        "tokens/divergent_chosen_logp": _mean(stats.get("divergent")),
        "dpop/penalized_chosen_reward": _mean(stats.get("penalized_chosen_rewards")),
    }


def pair_accuracy(stats: PairStats) -> float:
    """Fraction of pairs whose chosen response the policy finds more likely than the rejected one."""
    return _mean((stats.get("chosen") > stats.get("rejected")).float())


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)] if values.numel() else values
    return float(finite.mean()) if finite.numel() else math.nan


def _weighted_mean(values: torch.Tensor, units: torch.Tensor) -> float:
    """Σ values / Σ units over the finite values: a per-token loss's per-pair sums become its value per token."""
    finite = ~torch.isnan(values)
    if not bool(finite.any()):
        return math.nan
    return float(values[finite].sum() / units[finite].sum())


def _logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank line or one torn by a crash in the middle of a write."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step", 0) if isinstance(row, dict) else None


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed (a crash loses nothing logged)."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text(errors="replace").splitlines()
                    if (step := _logged_step(line)) is not None and step <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def check_trackers(names) -> None:
    """ConfigError naming the package to install for each tracker that is not importable (accelerate would
    silently skip it)."""
    from accelerate.utils import (is_mlflow_available, is_tensorboard_available, is_trackio_available,
                                  is_wandb_available)

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available, "trackio": is_trackio_available}
    missing = [name for name in names if not available[name]()]
    if missing:
        raise ConfigError(f"report_to: {', '.join(missing)} needs its package, which is not installed; "
                          f"`pip install {' '.join(missing)}`, or drop it from report_to")


def tracker_values(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, for accelerator.log (trackers take no strings or nulls)."""
    return {key: float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class FailureModeWatch:
    """Warn once when logps/chosen_delta keeps falling below 0 while rewards/margins keep rising: the DPO
    failure mode of Pal et al. 2024 (the preferred answer becomes LESS likely as the margin grows)."""

    def __init__(self, loss_name: str, window: int = 5):
        self.loss_name = loss_name
        self.window = window
        self.deltas: list[float] = []
        self.margins: list[float] = []
        self.fired_at: int | None = None

    def update(self, step: int, chosen_delta: float, margin: float) -> str | None:
        if self.fired_at is not None or not (math.isfinite(chosen_delta) and math.isfinite(margin)):
            return None
        self.deltas.append(chosen_delta)
        self.margins.append(margin)
        w = self.window
        if len(self.deltas) < 2 * w:
            return None
        old_delta, new_delta = sum(self.deltas[-2 * w:-w]) / w, sum(self.deltas[-w:]) / w
        old_margin, new_margin = sum(self.margins[-2 * w:-w]) / w, sum(self.margins[-w:]) / w
        if new_delta < 0 and new_delta < old_delta and new_margin > old_margin:
            self.fired_at = step
            fix = ("raise --dpop-lambda (λ) to hold the chosen log-prob at the reference"
                   if self.loss_name == "dpop" else "use --loss dpop (DPO-Positive, λ = 50 by default), which "
                   "penalises any fall of log πθ(y_w) below the reference")
            return (f"failure-mode watch (step {step}): logps/chosen_delta has fallen to {new_delta:.3f} nats while "
                    f"rewards/margins rose to {new_margin:.3f}: the chosen answers are becoming LESS likely even "
                    f"as the preference margin grows (Pal et al. 2024). To fix it, {fix}.")
        return None


class DeadZoneWatch:
    """Warn once when the optimizer's updates stop reaching the weights the model computes with: for `window`
    steps in a row at lr > 0, precision/update_ratio (Σ|Δ compute| / Σ|Δ master|) below `threshold`. That
    is bf16 autocast over weights on the bf16 grid at fine-tuning learning rates: each update is below half
    a bf16 step, so the rounded weights, and everything the model computes, stay where they were."""

    def __init__(self, precision: str, window: int = 5, threshold: float = 0.1):
        self.precision = precision
        self.window = window
        self.threshold = threshold
        self.streak = 0
        self.fired_at: int | None = None

    def update(self, step: int, row: dict) -> str | None:
        ratio, lr = row.get("precision/update_ratio", math.nan), row.get("lr", 0.0)
        if self.fired_at is not None:
            return None
        self.streak = self.streak + 1 if (lr > 0 and math.isfinite(ratio) and ratio < self.threshold) else 0
        if self.streak < self.window:
            return None
        self.fired_at = step
        fraction = row.get("precision/updated_frac", math.nan)
        return (f"precision watch (step {step}): for {self.window} steps only {ratio:.1%} of the optimizer's "
                f"updates reached the {self.precision} compute weights ({fraction:.2%} of them changed): the "
                f"updates are below half a bf16 step, so training is not moving the model (a dead zone). Use "
                f"--precision bf16-sr (stochastic rounding from fp32 master weights) or fp32.")
