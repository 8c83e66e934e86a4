"""One run on several processes: DDP (accelerate's), FSDP2 (dpop's own fully_shard, dpop.distributed.fsdp), and
DeepSpeed ZeRO by an accelerate config (unverified). This module: launching and which pairs a process takes;
dpop.distributed.engines: setting the engine up and taking it down.

    dpop train --num-processes 2 --batch-size 4 ...            # N local processes (torchrun underneath)
    dpop train --num-processes 2 --engine fsdp2 ...             # the same, sharded (dpop.distributed.fsdp)
    accelerate launch --config_file configs/accelerate/ddp.yaml -m dpop train --batch-size 4 ...
    torchrun --nproc-per-node 2 -m dpop train --batch-size 4 ...

The math is the single-process run's (docs/scaling.md):
- batch_size is per process. The run reads the single-process stream of micro-batches of
  num_processes × batch_size pairs, whose order depends only on (seed, epoch), and process r scores the r-th
  slice of each (`process_share`). So 2 processes × batch 2 take, step for step, the pairs 1 process × batch 4
  takes; a step consumes num_processes × batch_size × grad_accum pairs.
- Each process backpropagates the SUM of its pairs' losses × num_processes / (pairs in the whole step) (sft:
  chosen tokens in the step). Every engine averages gradients over processes, so the update is the
  single-process one: (1/N) Σ_r Σ_{i in r} N·∇l_i / P = Σ_i ∇l_i / P.
- An epoch's last micro-batch may hold fewer pairs: the slices then differ by at most one pair, nothing is
  padded or dropped, and the step's gradient is the mean over the pairs it has, as in one process. A process
  whose slice is empty (fewer pairs than processes) scores the batch's first pair with weight 0, because every
  process must run the same forwards and backwards: the engines' collectives are matched call by call.
- Per-pair statistics of a step are gathered from all processes before the metrics and the non-finite check,
  so every process takes the same skip decision and metrics.jsonl holds the single-process numbers (up to
  the order of summation).
- The reference pre-pass is split the same way (each process scores the slices it will train on, so step-0
  rewards stay exactly 0), gathered, written once by the main process, and broadcast from it; a later run
  reads the cache on the main process only and broadcasts it, so nodes need not share $DPOP_CACHE.
- Evaluation deals the single-process eval batches out in rounds (`batch_rounds`) and gathers the results
  back into batch order, so its metrics are one process's.
- Only the main process writes the run directory; the others' stdout is silenced by the CLI. Checkpoints hold
  every process's RNG state, and a run resumes only with the process count it started with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys

import torch

from dpop.distributed.engines import (
    check_engine,
    clip_gradients,
    engine_name,
    exit_worker,
    gathered_weights,
    no_sync,
    shut_down,
    splits_parameters,
    splits_state,
    uses_fsdp2,
)
from dpop.errors import ConfigError
from dpop.precision import uses_bf16

__all__ = ["check_engine", "clip_gradients", "engine_name", "exit_worker", "gathered_weights", "no_sync",
           "shut_down", "splits_parameters", "splits_state", "uses_fsdp2"]  # callers use dpop.distributed.NAME


@dataclasses.dataclass(frozen=True)
class SingleProcess:
    """What the helpers here need of an accelerator, for code that runs without one (tests, `dpop eval`)."""

    num_processes: int = 1
    process_index: int = 0
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


# --- launching ------------------------------------------------------------------------------------------

def launched_processes() -> int:
    """Processes in this run as the launcher (torchrun, accelerate launch) set them; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch_if_asked(config, argv: list[str]) -> int | None:
    """`dpop train --num-processes N` (N > 1) outside a launcher: run the same command line in N local processes
    under torchrun and return its exit code. None when this process should train itself.

    torchrun, not `accelerate launch`: on a CPU-only machine `accelerate launch --cpu --num_processes 2` starts
    ONE process (DESIGN §8), while torchrun gives accelerate a gloo group (MULTI_CPU) on CPU and NCCL on GPUs.

    Signals: torchrun, given a SIGINT/SIGTERM, passes it to its workers but then exits 1 with a traceback even
    when they stopped cleanly. So torchrun runs in its own session ignoring both, and this process passes each
    one it gets straight to the workers (torchrun's children): they finish the step, checkpoint and exit 0 (a
    second signal stops them at once), and torchrun exits 0 with them. Before the workers exist (or without
    Linux's /proc to find them) torchrun gets a SIGHUP instead, which ends it and them.
    """
    if config.num_processes == 1 or "WORLD_SIZE" in os.environ:
        return None
    if config.resume:
        check_resume_processes(config, config.num_processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--signals-to-handle=SIGHUP,SIGQUIT",
               f"--nproc-per-node={config.num_processes}", "-m", "dpop", *argv]
    env = dict(os.environ, DPOP_RELAUNCHED="1")
    if not torch.cuda.is_available():  # CPU: share the cores instead of N processes each using all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.num_processes)))
    child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_ignore_stop_signals)

    def forward(number, frame):
        workers = _children(child.pid)
        for worker in workers:
            os.kill(worker, number)
        if not workers:
            child.send_signal(signal.SIGHUP)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _children(pid: int) -> list[int]:
    """The live child processes of `pid`, from Linux's /proc (empty elsewhere)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _ignore_stop_signals() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


def prepare_worker() -> None:
    """In a process of a multi-process run: silence stdout on every process but the main one, so a run prints
    its progress once (errors and warnings still reach stderr from every process), and give a worker that
    `relaunch_if_asked` started the usual SIGINT/SIGTERM behaviour back."""
    if os.environ.pop("DPOP_RELAUNCHED", None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of this worker process


def check_launch(config):
    """The config with num_processes = the processes actually launched. Raises ConfigError when a config asks
    for another count, when a resumed run had another count, or when the launcher's mixed precision
    contradicts the config's `precision` (dpop's precision decides; the launcher's 'no' means 'as dpop says')."""
    launched = launched_processes()
    if config.resume:
        check_resume_processes(config, launched)
    elif config.num_processes not in (1, launched):
        raise ConfigError(f"num_processes {config.num_processes}, but this run was launched as {launched} "
                          "process(es); `dpop train --num-processes N` launches N processes itself, and under "
                          "torchrun or accelerate launch the launcher's count decides (drop num_processes)")
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    dpop_mixed = "bf16" if uses_bf16(config.precision) else "fp32"
    if launcher_precision != "no" and launcher_precision != dpop_mixed:
        raise ConfigError(f"the accelerate config asks for mixed_precision {launcher_precision} but precision is "
                          f"{config.precision}; dpop supports fp32, bf16 and bf16-sr: make them agree (--precision "
                          "bf16-sr, or mixed_precision 'no' in the accelerate config to let dpop's precision decide)")
    return _check_engine_launch(dataclasses.replace(config, num_processes=launched))


def _check_engine_launch(config):
    """engine fsdp2 under an accelerate config with FSDP2 (its settings are refused where dpop does not follow
    them); fsdp2 needs several processes."""
    from dpop.config.checks import check_fsdp2
    from dpop.distributed.fsdp import fsdp2_launched

    if fsdp2_launched() is not None and config.engine != "fsdp2":
        config = dataclasses.replace(config, engine="fsdp2")
        check_fsdp2(config)
    if config.engine == "fsdp2" and config.num_processes == 1:
        raise ConfigError("engine fsdp2 shards the model over processes, and this run has one; pass "
                          "--num-processes N (N > 1), or drop --engine fsdp2")
    return config


def check_resume_processes(config, processes: int) -> None:
    """A run resumes only with the process count it was trained with: which pairs each process takes and the
    checkpoint's per-process RNG states depend on it."""
    from pathlib import Path

    from dpop.config.flags import read_yaml

    saved_path = Path(config.output_dir) / "config.yaml"
    if not saved_path.is_file():
        return  # check_run_dir names the problem
    saved = int(read_yaml(saved_path).get("num_processes", 1))
    if saved != processes:
        raise ConfigError(f"--resume: the run in {config.output_dir} was trained on {saved} process(es) and this "
                          f"launch has {processes}; a resumed run must keep its process count (it decides which "
                          f"pairs each process takes and holds each process's RNG state). Resume with {saved}: "
                          f"`dpop train --output-dir {config.output_dir} --resume` relaunches with the recorded "
                          f"count, or pass --num_processes {saved} to accelerate launch / torchrun")


@contextlib.contextmanager
def signals_to_this_thread():
    """Threads started inside the block (gloo's, when accelerate creates the process group) block SIGINT and
    SIGTERM, so that a stop signal is delivered to the main thread, where dpop handles it, and never interrupts
    a socket call of theirs in the middle of a collective."""
    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# --- which pairs a process scores ----------------------------------------------------------------------

def process_slice(indices: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s contiguous slice of a micro-batch of `world` processes; slice sizes differ by at most
    one (the first ones are larger). [0..9] over 4 processes: [0 1 2] [3 4 5] [6 7] [8 9]."""
    base, extra = divmod(len(indices), world)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


def process_share(indices: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """(pairs to score, weight): the process's slice with weight 1, or, when the slice is empty but the batch
    is not, the batch's first pair with weight 0 (a forward and backward that keeps the processes' collectives
    in step and adds nothing)."""
    share = process_slice(indices, rank, world)
    if share or not indices:
        return share, 1.0
    return list(indices[:1]), 0.0


def batch_rounds(count: int, rank: int, world: int) -> list[int | None]:
    """The batches (0..count-1) process `rank` scores when `world` processes share `count` no-grad batches: in
    round k, process r takes batch k·world + r. Every process runs the same number of rounds, because each
    forward through the engine is a collective (FSDP2 gathers the weights, DDP syncs buffers); a process with no
    batch left in the last round gets None: it joins that round with a forward whose result is thrown away.
    5 batches over 2 processes: [0 2 4] and [1 3 None]."""
    rounds = -(-count // world)
    return [k * world + rank if k * world + rank < count else None for k in range(rounds)]


def all_slices(indices: list[int], world: int) -> list[list[int]]:
    """Every process's slice of one micro-batch, in process order."""
    return [process_slice(indices, rank, world) for rank in range(world)]


# --- collectives ----------------------------------------------------------------------------------------

def gather_step(stats, tokens: int, processes):
    """(every process's per-pair stats, total input tokens) of one step, on every process; processes in order."""
    from accelerate.utils import gather_object

    if processes.num_processes == 1:
        return stats, tokens
    merged = type(stats)()  # a dpop.scoring.metrics.PairStats
    everyone = gather_object([(stats.parts, tokens)])
    for parts, _ in everyone:
        for name, pieces in parts.items():
            merged.parts.setdefault(name, []).extend(pieces)
    return merged, sum(count for _, count in everyone)


def sum_over_processes(processes):
    """A function tensor -> its sum over every process (a collective each must call), or None on one process."""
    if processes.num_processes == 1:
        return None
    return lambda tensor: processes.reduce(tensor, reduction="sum")


def from_main(value, processes):
    """The main process's `value` on every process (a collective: every process calls it)."""
    from accelerate.utils import broadcast_object_list

    if processes.num_processes == 1:
        return value
    return broadcast_object_list([value], from_process=0)[0]


def gather_values(value, processes) -> list:
    """Every process's `value`, in process order, on every process."""
    from accelerate.utils import gather_object

    if processes.num_processes == 1:
        return [value]
    return gather_object([value])


def merge_computed(tensors: tuple[torch.Tensor, ...], processes) -> tuple[torch.Tensor, ...]:
    """Tensors in which each process filled some entries (NaN = not computed here), merged on every process."""
    if processes.num_processes == 1:
        return tensors
    merged = tuple(t.clone() for t in tensors)
    for theirs in gather_values(tensors, processes):
        for mine, other in zip(merged, theirs):
            missing = torch.isnan(mine) & ~torch.isnan(other)
            mine[missing] = other[missing]
    return merged


def agree_on_stop(received: str | None, processes) -> str | None:
    """A stop signal any process received, on every process: they must all stop after the same step."""
    if processes.num_processes == 1:
        return received
    return next((name for name in gather_values(received, processes) if name), None)


class DiscardLog:
    """metrics.jsonl on the processes that do not write it."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
