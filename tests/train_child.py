"""A `dpop` CLI process for the crash and signal tests: it runs `dpop.cli.main(argv)`, logs the pairs each
completed step trained on, and can pause at a chosen point so the test can kill or signal it there.

    python tests/train_child.py '{"argv": ["train", ...], "pairs_log": "pairs.jsonl", "marker": "paused",
                                  "pause": {"phase": "checkpoint", "step": 3}, "release": null}'

Pause phases (at optimizer step `step`, counted from 1):
- "step": before the step's first forward pass;
- "accumulation": after the first micro-batch's backward, before the second (gradients half accumulated);
- "checkpoint": the step's checkpoint fully written into its staging dir, before the rename into place.
At the pause the child writes `marker` (its pid) and waits: for the file `release` to appear when given,
else for ever (the test sends SIGKILL). The pairs log has one JSON line per completed step:
{"step": n, "pairs": [[pair indices of micro-batch 1], ...]}.
"""

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    torch.set_num_threads(1)  # as in the tests' own process, so that both compute bit-identical sums

    import dpop.training.loop
    from dpop.cli import main as dpop_main

    spec = json.loads(sys.argv[1])
    pause = spec.get("pause") or {}
    log = open(spec["pairs_log"], "a", encoding="utf-8")
    current = {"step": 0, "micro": 0}

    def wait_here() -> None:
        Path(spec["marker"]).write_text(str(os.getpid()))
        release = Path(spec["release"]) if spec.get("release") else None
        while release is None or not release.exists():
            time.sleep(0.02)

    real_step, real_micro = dpop.training.loop.train_step, dpop.training.loop._micro_batch_loss

    def train_step(run, batches):
        current["step"], current["micro"] = run.state.step + 1, 0
        if pause.get("phase") == "step" and current["step"] == pause["step"]:
            wait_here()
        row = real_step(run, batches)
        log.write(json.dumps({"step": current["step"], "pairs": [list(mb.pair_indices) for mb in batches]}) + "\n")
        log.flush()
        return row

    def micro_batch_loss(run, *args, **kwargs):
        current["micro"] += 1
        if pause.get("phase") == "accumulation" and current["step"] == pause["step"] and current["micro"] == 2:
            wait_here()
        return real_micro(run, *args, **kwargs)

    real_replace = os.replace

    def replace(source, target, *args, **kwargs):
        if pause.get("phase") == "checkpoint" and Path(source).name == f".step-{pause['step']}.partial":
            wait_here()
        return real_replace(source, target, *args, **kwargs)

    dpop.training.loop.train_step, dpop.training.loop._micro_batch_loss, os.replace = train_step, micro_batch_loss, replace
    return dpop_main(spec["argv"])


if __name__ == "__main__":
    sys.exit(main())
