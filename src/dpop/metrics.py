"""Metric names (DESIGN.md §6), their computation from a step's log-probs, the JSONL log and the
failure-mode watch."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpop.losses import dpop_penalty

PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected", "logps/chosen_delta",
             "dpop/penalty", "dpop/active_frac", "tokens/divergent_chosen_logp")
STEP_KEYS = ("lr", "grad_norm", "throughput/pairs_per_s", "throughput/tokens_per_s", "memory/peak_gb",
             "step", "epoch", "pairs_seen")
ALL_KEYS = PAIR_KEYS + STEP_KEYS


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
                 ref_divergent_mean=None) -> None:
    """Add one micro-batch to `stats`. `policy` is a SequenceLogps; ref_* are (P,) tensors or None."""
    chosen_delta = policy.chosen - ref_chosen if ref_chosen is not None else torch.full_like(policy.chosen, math.nan)
    penalty = dpop_penalty(policy.chosen, ref_chosen) if ref_chosen is not None else torch.zeros_like(policy.chosen)
    stats.add(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
              chosen=policy.chosen, rejected=policy.rejected, chosen_delta=chosen_delta, penalty=penalty,
              ref_chosen=ref_chosen if ref_chosen is not None else torch.full_like(policy.chosen, math.nan),
              ref_rejected=ref_rejected if ref_rejected is not None else torch.full_like(policy.chosen, math.nan),
              divergent=policy.divergent_chosen_mean())


def summarize_pairs(stats: PairStats) -> dict[str, float]:
    """Means over the step's pairs, named as DESIGN.md §6."""
    chosen_rewards, rejected_rewards = stats.get("chosen_rewards"), stats.get("rejected_rewards")
    penalty = stats.get("penalty")
    return {
        "loss": _mean(stats.get("losses")),
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "logps/chosen": _mean(stats.get("chosen")),
        "logps/rejected": _mean(stats.get("rejected")),
        "logps/ref_chosen": _mean(stats.get("ref_chosen")),
        "logps/ref_rejected": _mean(stats.get("ref_rejected")),
        "logps/chosen_delta": _mean(stats.get("chosen_delta")),
        "dpop/penalty": _mean(penalty),
        "dpop/active_frac": _mean((penalty > 0).float()),
        "tokens/divergent_chosen_logp": _mean(stats.get("divergent")),
    }


def _mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)] if values.numel() else values
    return float(finite.mean()) if finite.numel() else math.nan


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, appended and flushed (a crash loses nothing logged)."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


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
