"""TR-DPO's reference updates (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment"):
every `ref_model_sync_steps` optimizer steps the live reference becomes α·πθ + (1 − α)·πref, parameter by
parameter (α = `ref_model_mixup_alpha`; α = 1 is the paper's hard update). As in TRL's SyncRefModelCallback,
the update follows the optimizer step whose number is a multiple of the period.

Under bf16-sr both models are mixed in their master weights (the dither is taken off and put back), and a
checkpoint holds the reference's weights too, so a resumed run continues with the reference it had.
"""

from __future__ import annotations

import torch

from dpop import precision
from dpop.errors import ConfigError


class ReferenceSync:
    def __init__(self, run):
        from dpop.scoring.reference import LiveReference, trainable_names

        config = run.config
        if not isinstance(run.reference, LiveReference):
            raise ConfigError(f"sync_ref_model needs a live reference model; loss {config.loss} has none")
        self.run, self.reference = run, run.reference.model
        self.names = trainable_names(run.accelerator.unwrap_model(run.model))
        self.every, self.alpha = config.ref_model_sync_steps, config.ref_model_mixup_alpha

    def masters(self):
        """A block in which the reference holds its master weights (to save or load them)."""
        config = self.run.config
        return precision.reference_masters(self.reference, self.names, config.precision, config.seed)

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """Update the reference after optimizer step `step` when it is due; whether it was."""
        if step % self.every:
            return False
        policy = self.run.accelerator.unwrap_model(self.run.model)
        with self.run.weights.masters(), self.masters():
            for target, source in zip(self.reference.parameters(), policy.parameters(), strict=True):
                target.mul_(1.0 - self.alpha).add_(source.detach(), alpha=self.alpha)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.masters():
            return {name: p.detach().clone().contiguous() for name, p in self.reference.named_parameters()}

    @torch.no_grad()
    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        with self.masters():
            for name, p in self.reference.named_parameters():
                p.copy_(weights[name])
