"""Why a run stops before its last step, and what it tells the user then.

- A signal. The first SIGINT (Ctrl-C) or SIGTERM (`kill`, a job scheduler's stop) only asks the loop to stop:
  the step in progress finishes, a checkpoint is written, and `train` raises RunStopped, whose message is the
  command that resumes the run; the CLI prints it and exits 0. Stopping mid-step would throw away work and
  leave nothing to resume from; a checkpoint at the step boundary makes the resumed run bit-identical to one
  never stopped. A second signal stops at once (KeyboardInterrupt, exit 130), for a user who cannot wait.
- Non-finite steps. A step whose loss or gradient is not finite is not applied (counted in `skipped_steps`):
  one bad batch should not end a long run. `max_bad_steps` of them in a row mean the run has diverged, and it
  stops with an error naming the steps and the last checkpoint written before them.

    dpop train --output-dir runs/a ...     # Ctrl-C once: "dpop: stopped by SIGINT after step 7 ... Resume with:"
    dpop train --output-dir runs/a --resume
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from pathlib import Path

from dpop.errors import TrainingError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """Raised by `train` when a signal stopped the run cleanly, after a checkpoint. Not an error (the CLI prints
    the message, which says how to resume, and exits 0), but not a finished run either: an exception, so that
    a caller that goes on to use the run's final/ (the demo's SFT stage, a notebook) stops too."""

    def __init__(self, message: str, *, signal_name: str, step: int, checkpoint: Path):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopSignals:
    """While active (a `with` block), SIGINT and SIGTERM set `received` to the signal's name instead of
    stopping the process; a second signal raises KeyboardInterrupt. Outside the block the previous handlers
    are back, so a signal during the final evaluation or save behaves as it always did.

    Handlers can only be installed from the main thread; elsewhere (a notebook's worker thread) the block
    does nothing and signals keep their usual effect.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        # os.write, not print: the handler may interrupt a print to the same stream (tqdm's bar), and a
        # buffered stream re-entered from a handler raises RuntimeError.
        os.write(2, f"\ndpop: {self.received} received: stopping after the current step and writing a checkpoint "
                    "(send it again to stop at once, without one)\n".encode())


def resume_command(config) -> str:
    """The shell command that continues a run (`dpop sft`'s too): its config.yaml supplies every other option."""
    return f"dpop train --output-dir {shlex.quote(str(config.output_dir))} --resume"


def run_stopped(signal_name: str, step: int, total_steps: int, checkpoint: Path, config) -> RunStopped:
    return RunStopped(f"dpop: stopped by {signal_name} after step {step} of {total_steps}; checkpoint {checkpoint}. "
                      f"Resume with: {resume_command(config)}", signal_name=signal_name, step=step,
                      checkpoint=checkpoint)


def non_finite_error(step: int, streak: int, config, run_dir: Path) -> TrainingError:
    """The error that stops a run after `streak` non-finite steps in a row ending at `step`; the last good
    checkpoint is the newest written before the streak."""
    from dpop.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(Path(run_dir) / "checkpoints")
    first = step - streak + 1
    good = [path for path in checkpoints if int(path.name.split("-")[1]) < first]
    if good:
        later = checkpoints[len(good):]  # none unless left by an earlier session: the loop saves no bad step
        hint = f"delete {', '.join(map(str, later))}, then " if later else ""
        where = (f"The last good checkpoint is {good[-1]}; to resume from it (the same steps will be replayed), "
                 f"{hint}run: {resume_command(config)}, adding --max-bad-steps 0 to push through them")
    else:
        where = "No checkpoint was written before them (save_every keeps some)"
    return TrainingError(
        f"step {step}: the loss or gradient was not finite in {streak} steps in a row (steps {first}-{step}, "
        f"max_bad_steps {config.max_bad_steps}); their updates were skipped and the run stops here. {where}. "
        "Otherwise start a new run with a lower learning_rate or precision fp32, or check the data those steps read")
