"""Pre-DPO (Pan et al. 2025, "Pre-DPO: Improving Data Utilization in Direct Preference Optimization Using a
Guiding Reference Model"): `--ref-strategy guided` first trains a guide from the initial policy on the same data
(`guide_loss`, default dpo; the paper uses DPO or SimPO), in RUN/guide, then trains RUN from the initial policy
again with the guide's final model as its precomputed reference. The guide is a whole run of its own (config,
metrics, checkpoints, final/); a finished guide (its summary.json) is reused, an interrupted one resumed, so
`dpop train --output-dir RUN --resume` continues wherever the two-stage run stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from dpop.errors import ConfigError
from dpop.scoring.reference import GUIDE_DIR
from dpop.training.checkpoint import check_run_dir, clear_run_dir, list_checkpoints

logger = logging.getLogger(__name__)


def run_guide(config, inputs):
    """Train (or finish, or reuse) the guide of a guided config; returns the config of the run proper."""
    from dpop.training.loop import train

    if inputs.model is not None:
        raise ConfigError("ref_strategy 'guided' trains the policy twice from its initial weights: give the model "
                          "as a path (config.model), not as an object that the guide run would train in place")
    run_dir = Path(config.output_dir)
    guide_dir = run_dir / GUIDE_DIR
    if config.overwrite:  # the whole two-stage run is replaced, guide included
        check_run_dir(config)
        clear_run_dir(run_dir)
    elif not config.resume:
        check_run_dir(config)  # an occupied run dir is refused before the guide starts
    if not (guide_dir / "summary.json").exists():
        resumable = (guide_dir / "config.yaml").exists() and bool(list_checkpoints(guide_dir / "checkpoints"))
        if guide_dir.exists() and not resumable:
            shutil.rmtree(guide_dir)  # a guide that left nothing to resume from starts again
        guide = dataclasses.replace(config, loss=config.guide_loss, loss_weights=None, ref_strategy="precompute",
                                    sync_ref_model=False, output_dir=str(guide_dir), resume=resumable,
                                    overwrite=False)
        logger.info("dpop: Pre-DPO: the guide run (loss %s) in %s", config.guide_loss, guide_dir)
        train(guide, data=inputs.data, eval_data=inputs.eval_data)
    logger.info("dpop: Pre-DPO: training from the initial policy with the guide %s/final as the reference", guide_dir)
    return dataclasses.replace(config, overwrite=False, resume=config.resume and (run_dir / "config.yaml").exists())
