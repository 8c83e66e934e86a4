"""What a run optimises: one registered loss, or a weighted mixture (`loss: [dpop, sft]`, `loss_weights: [1, 1]`,
flags `--loss dpop,sft --loss-weights 1,1`, TRL's loss_type list and loss_weights).

Each component keeps its own normalisation over the optimizer step, so a mixture is the weighted sum of the
losses each component would log alone:

    L_step = Σ_k w_k · (Σ_i l_k(i) / Σ_i u_k(i))

with u_k a pair's units under component k (1, or its chosen tokens for sft: LossSpec.units). The training
loop and the evaluation see an Objective and never a loss name; a single loss is a mixture of one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dpop.errors import ConfigError
from dpop.losses._common import Tensor


@dataclass(frozen=True)
class ObjectiveOutput:
    """One batch: per-component per-pair losses, units and weights (dicts keyed by loss name), and the implicit
    rewards of the first component that has them (NaN for sft alone), each (B,)."""

    losses: dict[str, Tensor]
    units: dict[str, Tensor]
    weights: dict[str, float]
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    reference_point: Tensor | None = None  # KTO's z0 of this micro-batch (a scalar), None for pairs

    def step_loss(self, units_in_step: Mapping[str, float]) -> Tensor:
        """This batch's share of the step's loss: Σ_k w_k · Σ_i l_k(i) / (units of the whole step under k)."""
        return sum(self.weights[name] * losses.sum() / units_in_step[name] for name, losses in self.losses.items())


@dataclass(frozen=True)
class Objective:
    components: tuple  # ((LossSpec, weight), ...)
    options: Mapping[str, float]  # every component's options
    use_weighting: bool = False  # WPO: each pair's losses × its sequences' weights (policy.chosen_weights, ...)

    @property
    def name(self) -> str:
        return ",".join(spec.name for spec, _ in self.components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec, _ in self.components)

    @property
    def uses_rejected(self) -> bool:
        return any(spec.uses_rejected for spec, _ in self.components)

    @property
    def needs_kl(self) -> bool:
        """Whether a component needs the sequential token KLs, and so the live reference's distributions."""
        return any(spec.needs_kl for spec, _ in self.components)

    @property
    def reference_free(self) -> bool:
        return all(spec.reference_free for spec, _ in self.components)

    @property
    def unpaired(self) -> bool:
        """Whether it trains on unpaired rows (KTO): make_objective never mixes it with a pair loss."""
        return any(spec.unpaired for spec, _ in self.components)

    def reference_point(self, policy, ref, *, reduce=None, weight: float = 1.0) -> Tensor | None:
        """KTO's z0 for one micro-batch: max(0, Σ (log πθ(y'|x) − log πref(y'|x)) / rows), the sums and row counts
        added over processes by `reduce(tensor) -> tensor` (a collective every process calls; None: one process),
        detached. None for a pair objective (no collective). `weight` 0: a process whose share of the micro-batch
        is empty adds nothing but still joins the collective."""
        from dpop.losses import kto_reference_point

        if not self.unpaired:
            return None
        return kto_reference_point(policy.rejected, ref.rejected, reduce=reduce, weight=weight)

    def units_in_step(self, chosen_lengths: Tensor) -> dict[str, float]:
        """Σ units over all the step's pairs, per component (`chosen_lengths`: every pair of the step)."""
        return {spec.name: float(spec.units(chosen_lengths).sum()) for spec, _ in self.components}

    def __call__(self, policy, ref, *, beta: float, reduce=None) -> ObjectiveOutput:
        """Score one batch: `policy` a SequenceLogps, `ref` RefLogps or None (reference-free components); `reduce`:
        the sum over processes for KTO's reference point (see reference_point)."""
        from dpop.losses import sequence_loss

        losses, units, rewards = {}, {}, None
        point = self.reference_point(policy, ref, reduce=reduce)
        for spec, _ in self.components:
            options = {key: value for key, value in self.options.items() if key in spec.options}
            losses[spec.name], chosen, rejected = sequence_loss(spec.name, policy, ref, beta=beta, options=options,
                                                                reference_point=point)
            if self.use_weighting:  # WPO, eq. 2: the pair's loss × w(y_w) · w(y_l), both detached
                losses[spec.name] = losses[spec.name] * policy.chosen_weights * policy.rejected_weights
            units[spec.name] = spec.units(policy.chosen_lengths)
            if rewards is None and not bool(torch.isnan(chosen).all()):
                rewards = (chosen, rejected)
        if rewards is None:  # sft alone: no rewards
            rewards = (chosen, rejected)
        return ObjectiveOutput(losses, units, {spec.name: weight for spec, weight in self.components}, *rewards,
                               reference_point=point)


def make_objective(loss: str | Sequence[str], weights: str | Sequence[float] | None = None,
                   options: Mapping | None = None, *, use_weighting: bool = False) -> Objective:
    """An Objective from loss names ("dpop", "dpop,sft" or a list) and weights ("1,1", a list, or None = 1 each);
    `options` a config-like mapping the components' options are picked from (missing: their defaults)."""
    from dpop.losses import get_loss, loss_options

    names = [name.strip() for name in (loss.split(",") if isinstance(loss, str) else loss) if name.strip()]
    if not names:
        raise ConfigError("loss: no loss given")
    if len(set(names)) != len(names):
        raise ConfigError(f"loss: {','.join(names)} names a loss twice; give each once, with its weight")
    specs = [get_loss(name) for name in names]
    unpaired = [spec.name for spec in specs if spec.unpaired]
    if unpaired and len(specs) > 1:
        paired = ", ".join(spec.name for spec in specs if not spec.unpaired)
        raise ConfigError(f"loss: {unpaired[0]} trains on unpaired rows (prompt, completion, label) and cannot be "
                          f"mixed with losses on preference pairs ({paired})")
    if unpaired and use_weighting:
        raise ConfigError(f"use_weighting (WPO) weights a pair's two responses; {unpaired[0]} trains on unpaired rows")
    values = _weights(weights, len(names))
    picked = {}
    for spec in specs:
        picked.update(loss_options(spec.name, options or {}))
    return Objective(tuple(zip(specs, values)), picked, use_weighting)


def _weights(weights, count: int) -> list[float]:
    if weights is None or weights == "":
        return [1.0] * count
    items = weights.split(",") if isinstance(weights, str) else list(weights)
    try:
        values = [float(item) for item in items]
    except (TypeError, ValueError):
        raise ConfigError(f"loss_weights: expected numbers, got {weights!r}") from None
    if len(values) != count:
        raise ConfigError(f"loss_weights: {len(values)} weight(s) for {count} loss(es); give one weight per loss")
    if any(not value >= 0 for value in values) or not any(values):
        raise ConfigError(f"loss_weights: weights must be >= 0 and not all 0, got {weights!r}")
    return values


def objective_of(config) -> Objective:
    """The Objective a TrainConfig names (loss, loss_weights and the loss options)."""
    return make_objective(config.loss, config.loss_weights, config.to_dict(), use_weighting=config.use_weighting)
