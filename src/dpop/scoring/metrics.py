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
On unpaired rows (KTO) rewards/margins is the desirable rows' mean reward minus the undesirable rows', there is
no rewards/accuracies or pair accuracy, and `kto/z0` is the mean reference point of the step's micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

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
                 beta: float = 0.0, dpop_lambda: float = 0.0, units=None, weights=None, reference_point=None) -> None:
    """Add one micro-batch to `stats`. `policy` is a SequenceLogps; ref_* are (P,) tensors or None; `losses`
    the per-pair losses (P,), or for a mixture a dict loss name -> (P,) with `units` and `weights` dicts keyed
    alike (dpop.losses.objective), or None (evaluation without a loss); `units` (P,) what each pair counts for
    in the logged loss (dpop.losses.LossSpec.units; None = 1 each, the mean over pairs).

    Unpaired rows (policy.desirable set, KTO) are logged as TRL's KTO trainer logs them: the "chosen" keys are
    the desirable rows' completions, the "rejected" keys the undesirable rows' (the mismatched completions y' only
    enter `reference_point`, KTO's z0, logged as kto/z0)."""
    nan = torch.full_like(policy.chosen, math.nan)
    if policy.desirable is not None:
        policy, ref_chosen, ref_rejected = _by_label(policy, ref_chosen)
        stats.add(desirable=policy.desirable.float(),
                  reference_point=(reference_point.expand(policy.chosen.shape) if reference_point is not None
                                   else nan))
    if losses is not None and not isinstance(losses, Mapping):
        losses, units, weights = {"": losses}, {"": units}, {"": 1.0}
    total = nan
    for name, part in (losses or {}).items():
        part_units = units.get(name) if units else None
        stats.add(**{f"losses:{name}": part,
                     f"units:{name}": part_units if part_units is not None else torch.ones_like(policy.chosen),
                     f"weight:{name}": torch.full_like(policy.chosen, weights[name])})
        total = part * weights[name] if total is nan else total + part * weights[name]
    stats.add(losses=total)
    chosen_delta = policy.chosen - ref_chosen if ref_chosen is not None else nan
    penalty = dpop_penalty(policy.chosen, ref_chosen) if ref_chosen is not None else torch.zeros_like(policy.chosen)
    stats.add(chosen_rewards=chosen_rewards if chosen_rewards is not None else nan,
              rejected_rewards=rejected_rewards if rejected_rewards is not None else nan,
              penalized_chosen_rewards=(chosen_rewards - beta * dpop_lambda * penalty
                                        if chosen_rewards is not None else nan),
              chosen=policy.chosen, rejected=policy.rejected, chosen_delta=chosen_delta,
              penalty=penalty if ref_chosen is not None else nan,
              ref_chosen=ref_chosen if ref_chosen is not None else nan,
              ref_rejected=ref_rejected if ref_rejected is not None else nan,
              divergent=policy.divergent_chosen_mean())


def _by_label(policy, ref_completion):
    """(policy-like view, ref chosen, ref rejected) of unpaired rows: each row's completion in the chosen slot if it
    is desirable, in the rejected slot if not, NaN in the other; no divergence quantities (no pair to diverge)."""
    from types import SimpleNamespace

    good = policy.desirable.to(policy.chosen.device)
    nan = torch.full_like(policy.chosen, math.nan)

    def split(values):
        return (torch.where(good, values, nan), torch.where(good, nan, values)) if values is not None else (None, None)

    chosen, rejected = split(policy.chosen)
    ref_chosen, ref_rejected = split(ref_completion.to(policy.chosen.device) if ref_completion is not None else None)
    view = SimpleNamespace(chosen=chosen, rejected=rejected, desirable=policy.desirable,
                           divergent_chosen_mean=lambda: nan)
    return view, ref_chosen, ref_rejected


def summarize_pairs(stats: PairStats) -> dict[str, float]:
    """Means over the step's pairs, named as DESIGN.md §6."""
    chosen_rewards, rejected_rewards = stats.get("chosen_rewards"), stats.get("rejected_rewards")
    penalty = stats.get("penalty")
    no_rewards = bool(torch.isnan(chosen_rewards).all())
    parts = {key.split(":", 1)[1]: _weighted_mean(stats.get(key), stats.get("units:" + key.split(":", 1)[1]))
             for key in stats.parts if key.startswith("losses:")}
    weights = {name: float(stats.get("weight:" + name)[0]) for name in parts}
    loss = sum(weights[name] * value for name, value in parts.items()) if parts else math.nan
    components = {f"loss/{name}": value for name, value in parts.items()} if len(parts) > 1 else {}
    unpaired = "desirable" in stats.parts  # KTO: no pairs; the margin is between the two labels' mean rewards
    if unpaired:
        components["kto/z0"] = _mean(stats.get("reference_point"))
    return {
        "loss": loss, **components,
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/margins": (_mean(chosen_rewards) - _mean(rejected_rewards) if unpaired
                            else _mean(chosen_rewards - rejected_rewards)),
        "rewards/accuracies": (math.nan if no_rewards or unpaired
                               else _mean((chosen_rewards > rejected_rewards).float())),
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
    """Fraction of pairs whose chosen response the policy finds more likely than the rejected one (NaN for
    unpaired rows)."""
    if "desirable" in stats.parts:
        return math.nan
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


