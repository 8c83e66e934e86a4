"""dpop: preference training for causal language models (DPO, DPO-Positive and their family).

    from dpop import LOSSES, TrainConfig, evaluate_model, load_pairs, preference_loss, train

    result = train(TrainConfig(loss="dpop", max_steps=20), data=load_pairs("pairs.jsonl"))
    result.summary["train"]["logps/chosen_delta"], result.metrics_path, result.final_model

The subpackages follow the data: dpop.data (files -> validated pairs -> tokens -> the order of batches),
dpop.losses (pure functions of log-probs, one registry), dpop.scoring (batch layouts, the one log-prob routine,
reference log-probs and their cache, per-pair metrics), dpop.training (setup, the loop, checkpoints, stopping,
monitors), dpop.evaluation (evaluate_model, generation), dpop.reporting (plots, HTML); dpop.analysis
(Bradley–Terry, the loss landscape) stands apart. Beneath them all: dpop.config, dpop.models, dpop.precision,
dpop.distributed and dpop.errors. Names here load their module on first use, so `import dpop` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "train": "dpop.training.loop",
    "TrainResult": "dpop.training.loop",
    "TrainConfig": "dpop.config",
    "evaluate_model": "dpop.evaluation.evaluate",
    "load_pairs": "dpop.data",
    "pairs_from_rows": "dpop.data",
    "PreferencePair": "dpop.data",
    "preference_loss": "dpop.losses",
    "LOSSES": "dpop.losses",
    "load_model": "dpop.models",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpop' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
