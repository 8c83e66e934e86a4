"""What a run reports as it goes: metrics.jsonl, the trackers, and the watches that warn (DPO's failure mode, bf16's dead zone)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from dpop.errors import ConfigError


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
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_trackio_available, is_wandb_available

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

    def __init__(self, loss_names, window: int = 5):
        self.loss_names = (loss_names,) if isinstance(loss_names, str) else tuple(loss_names)
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
                   if "dpop" in self.loss_names else "use --loss dpop (DPO-Positive, λ = 50 by default), which "
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
