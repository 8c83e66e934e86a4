"""Several processes (dpop.distributed) on this CPU: 2 gloo processes against one process.

Each 2-process run is a subprocess, `python -m dpop train --num-processes 2 ...`, which relaunches itself under
torchrun (so the CLI's relaunch is exercised too); the 1-process twins run in this process. The tiny model and
the `dpo` loss keep the comparisons tight: a batch of 4 and two batches of 2 differ by rounding (~1e-7
relative, as with single-process accumulation), which DPOP's λ·β = 15 would magnify past 1e-5.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpop.cli import main
from dpop.distributed import _children, all_slices, batch_rounds, process_share, process_slice
from dpop.errors import ConfigError
from dpop.training.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
NOT_COMPARED = ("throughput/", "memory/")  # timings and this process's memory
# Sums of ~300 token log-probs (~ -1 each) carry fp32 rounding of ~3e-5 between batchings; quantities made of
# them (logps/*, the penalty) are compared at that scale, everything else (loss, rewards, grad_norm) at 1e-5.
LOGP_SUM_KEYS = ("logps/", "eval/logps/", "dpop/penalty", "eval/dpop/penalty", "dpop/penalized_chosen_reward",
                 "eval/dpop/penalized_chosen_reward")


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    """`python -m dpop ARGV` in a subprocess ($DPOP_CACHE comes from the dpop_cache fixture); must succeed."""
    done = subprocess.run([sys.executable, "-m", "dpop", *argv], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def flags(config) -> list[str]:
    """The CLI flags of a TrainConfig built by the tiny_config fixture (its non-default values)."""
    from dataclasses import fields

    out = []
    for f in fields(config):
        value = getattr(config, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool) and value != f.default:
            out.append(flag if value else flag.replace("--", "--no-", 1))
        elif value != f.default:
            out += [flag, str(value)]
    return out


def rows(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(config) -> dict:
    return load_file(str(Path(config.output_dir) / "final" / "model.safetensors"))


def assert_same_run(one, two, *, tolerance: float) -> float:
    """Same logged rows (keys, steps, pairs, lr exactly; every number to `tolerance`, relative or absolute, the
    log-prob sums to 10 × tolerance) and final weights to `tolerance`; returns the largest weight difference."""
    one_rows, two_rows = rows(one), rows(two)
    assert [(r["split"], r["step"]) for r in one_rows] == [(r["split"], r["step"]) for r in two_rows]
    for a, b in zip(one_rows, two_rows):
        assert set(a) == set(b)
        for key in ("pairs_seen", "epoch", "lr"):
            assert a.get(key) == b.get(key), (a["step"], key)
        for key, value in a.items():
            if isinstance(value, float) and not key.startswith(NOT_COMPARED):
                allowed = 10 * tolerance if key.startswith(LOGP_SUM_KEYS) else tolerance
                assert b[key] == pytest.approx(value, rel=allowed, abs=allowed), (a["split"], a["step"], key)
    one_weights, two_weights = weights(one), weights(two)
    assert set(one_weights) == set(two_weights)
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=tolerance, rtol=0)
    return max(float((one_weights[n] - two_weights[n]).abs().max()) for n in one_weights)


def moved(config) -> float:
    initial = load_file(str(Path(config.model) / "model.safetensors"))
    trained = weights(config)
    return max(float((trained[name] - initial[name]).abs().max()) for name in initial)


# --- which pairs each process takes ---------------------------------------------------------------------

def test_slices_split_a_batch_in_order_and_differ_by_at_most_one_pair():
    assert all_slices(list(range(10)), 4) == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert all_slices([7, 3, 5, 1], 2) == [[7, 3], [5, 1]]  # 2 x batch 2 = the single-process batch of 4
    assert all_slices([4], 2) == [[4], []]
    for size in range(0, 9):
        for world in (1, 2, 3):
            pieces = all_slices(list(range(size)), world)
            assert sum(pieces, []) == list(range(size))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
    assert process_slice([4], 1, 2) == []
    assert process_share([4], 0, 2) == ([4], 1.0)
    assert process_share([4], 1, 2) == ([4], 0.0)  # an empty slice scores a pair with weight 0
    assert process_share([], 1, 2) == ([], 1.0)


def test_no_grad_batches_are_shared_in_rounds_that_every_process_joins():
    assert [batch_rounds(5, rank, 2) for rank in (0, 1)] == [[0, 2, 4], [1, 3, None]]
    assert [batch_rounds(1, rank, 3) for rank in (0, 1, 2)] == [[0], [None], [None]]
    assert batch_rounds(0, 0, 2) == [] and batch_rounds(4, 0, 1) == [0, 1, 2, 3]


# --- 2 processes against 1 ------------------------------------------------------------------------------

def test_two_processes_of_batch_2_take_the_steps_of_one_process_of_batch_4(tiny_config):
    """3 steps, linear decay (a scheduler stepped once per process would show in lr); grad_norm shows the loss
    scaling (Adam and clipping hide a wrong constant factor from the weights)."""
    common = dict(loss="dpo", learning_rate=1e-4, max_steps=3)
    one = tiny_config("one", batch_size=4, **common)
    two = tiny_config("two", batch_size=2, num_processes=2, **common)
    train(one)
    done = run_cli("train", *flags(two))
    assert done.stdout.count("dpop: done:") == 1  # the second process's stdout is silenced
    assert [r["pairs_seen"] for r in rows(two)] == [4, 8, 12]
    largest = assert_same_run(one, two, tolerance=1e-5)
    assert moved(one) > 20 * largest  # far tighter than what training changed
    saved = (Path(two.output_dir) / "config.yaml").read_text()
    assert "num_processes: 2" in saved and "batch_size: 2" in saved


def test_a_short_last_batch_accumulation_eval_and_checkpoints_keep_the_single_process_math(
        tiny_config, tmp_path, eval_pairs_file):
    """13 pairs, 2 micro-batches of 2 x 2 per step: step 2 ends the epoch with a micro-batch of ONE pair (the
    second process scores it with weight 0), step 3 starts epoch 1. Evaluation every step, checkpoints."""
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    data = write_jsonl(make_pairs(13, edit="low", seed=0), tmp_path / "pairs13.jsonl")
    common = dict(loss="dpo", learning_rate=1e-4, max_steps=3, grad_accum=2, data=str(data),
                  eval_data=str(eval_pairs_file), eval_every=1, save_every=2)
    one = tiny_config("one", batch_size=4, **common)
    two = tiny_config("two", batch_size=2, num_processes=2, **common)
    train(one)
    run_cli("train", *flags(two))
    assert [r["pairs_seen"] for r in rows(two) if r["split"] == "train"] == [8, 13, 21]
    assert [r["step"] for r in rows(two) if r["split"] == "eval"] == [1, 2, 3]
    assert_same_run(one, two, tolerance=1e-5)
    checkpoint = Path(two.output_dir) / "checkpoints" / "step-2"
    assert json.loads((checkpoint / "state.json").read_text())["num_processes"] == 2
    assert len(torch.load(checkpoint / "optimizer.pt", weights_only=True)["rng_by_process"]) == 2


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(tiny_config, tiny_model_saver, tmp_path, capsys):
    """With dropout on, so each process's RNG state must come back (a checkpoint with one process's RNG for
    both would change the second process's dropout masks). The resume gives no --num-processes: the run's
    config.yaml brings back its 2 processes. A different count is refused, clearly and before any work."""
    dropping = tiny_model_saver(tmp_path / "dropping", attention_dropout=0.2)
    common = dict(model=str(dropping), dropout=True, scheduler="constant", learning_rate=1e-3, batch_size=2,
                  num_processes=2, save_every=2)
    whole = tiny_config("whole", max_steps=4, **common)
    short = tiny_config("short", max_steps=2, **common)
    run_cli("train", *flags(whole))
    run_cli("train", *flags(short))
    run_cli("train", "--output-dir", short.output_dir, "--resume", "--max-steps", "4")
    assert [r["step"] for r in rows(short)] == [1, 2, 3, 4]
    for a, b in zip(rows(whole), rows(short)):
        assert {k: v for k, v in a.items() if not k.startswith(NOT_COMPARED)} == \
               {k: v for k, v in b.items() if not k.startswith(NOT_COMPARED)}
    whole_weights, short_weights = weights(whole), weights(short)
    assert all(torch.equal(whole_weights[name], short_weights[name]) for name in whole_weights)

    with pytest.raises(ConfigError, match=r"trained on 2 process\(es\) and this launch has 1"):
        train(tiny_config("short", max_steps=5, **dict(common, num_processes=1), resume=True))
    assert main(["train", "--output-dir", short.output_dir, "--resume", "--num-processes", "3"]) == 1
    assert "trained on 2 process(es) and this launch has 3" in capsys.readouterr().err


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tiny_config):
    """SIGTERM to the second process only: both finish the same step, the main one writes its checkpoint, and
    the command exits 0 (a process that went on alone would wait forever in the next step's collectives)."""
    config = tiny_config("run", loss="dpo", batch_size=2, num_processes=2, max_steps=100_000)
    metrics = Path(config.output_dir) / "metrics.jsonl"
    parent = subprocess.Popen([sys.executable, "-m", "dpop", "train", *flags(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 300  # a bound on startup, not a timing assertion
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[1][-3000:]
            time.sleep(0.2)
        workers = [worker for launcher in _children(parent.pid) for worker in _children(launcher)]
        second = [w for w in workers if "RANK=1" in Path(f"/proc/{w}/environ").read_bytes().decode().split("\0")]
        assert len(workers) == 2 and len(second) == 1
        os.kill(second[0], signal.SIGTERM)
        out, err = parent.communicate(timeout=300)
    finally:
        for pid in [*workers, parent.pid]:
            if parent.poll() is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert parent.returncode == 0, err[-3000:]
    assert out.count("dpop: stopped by SIGTERM after step") == 1
    step = int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1))
    assert (Path(config.output_dir) / "checkpoints" / f"step-{step}").is_dir()
    assert max(row["step"] for row in rows(config)) == step
    assert not (Path(config.output_dir) / "final").exists()


def test_a_process_count_the_launcher_did_not_start_is_refused(tiny_config, monkeypatch):
    with pytest.raises(ConfigError, match="num_processes 2, but this run was launched as 1"):
        train(tiny_config(num_processes=2))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="mixed_precision bf16 but precision is fp32"):
        train(tiny_config())


# --- configs/accelerate ---------------------------------------------------------------------------------

def launcher_plugin(config_file: Path):
    """What `accelerate launch --config_file F` would hand the training processes: the launcher's own argument
    checks and environment, then the plugin accelerate builds from that environment (no GPU, no deepspeed)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "dpop", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
        plugin = (FullyShardedDataParallelPlugin() if args.use_fsdp else
                  DeepSpeedPlugin() if args.use_deepspeed else None)
    return defaults, args, env, plugin


def test_each_accelerate_config_maps_to_its_engine():
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == [
        "ddp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml", "fsdp2.yaml"]

    defaults, args, env, plugin = launcher_plugin(CONFIGS / "ddp.yaml")
    assert defaults.distributed_type == DistributedType.MULTI_GPU and args.multi_gpu and plugin is None
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # dpop's precision decides
    assert not any(key.startswith(("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")) for key in env)

    defaults, args, env, plugin = launcher_plugin(CONFIGS / "fsdp2.yaml")
    assert defaults.distributed_type == DistributedType.FSDP and args.use_fsdp
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPUs
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    for stage in (2, 3):
        defaults, args, env, plugin = launcher_plugin(CONFIGS / f"deepspeed-zero{stage}.yaml")
        assert defaults.distributed_type == DistributedType.DEEPSPEED and args.use_deepspeed
        settings = plugin.deepspeed_config
        assert settings["zero_optimization"]["stage"] == stage
        assert settings["gradient_accumulation_steps"] == 1  # dpop accumulates itself
        assert settings["zero_optimization"]["offload_optimizer"]["device"] == "none"
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        # ZeRO-3 splits the weights: final/ needs them gathered in 16 bit on the main process
        assert settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


def test_a_worker_leaves_with_its_code_and_its_output_flushed():
    """exit_worker skips the interpreter's teardown (gloo's threads abort it): what the worker printed to a pipe
    (block-buffered) must still arrive, and torchrun must see the command's exit code."""
    script = ("import sys; from dpop.distributed import exit_worker; "
              "print('done'); print('warned', file=sys.stderr); exit_worker(3)")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (3, "done\n", "warned\n")


def test_two_processes_sum_kto_reference_point_over_their_rows(tiny_config, tiny_model_saver, tiny_model_dir,
                                                              tmp_path):
    """KTO's z0 is a mean over the micro-batch's rows on EVERY process: 25 unpaired rows against a different
    reference (z0 > 0 from the start), 2 micro-batches of 2 x 2 per step; the 7th micro-batch holds ONE row, so
    the second process joins the z0 sum with nothing (weight 0)."""
    from dpop.data import pairs_from_rows
    from dpop.data.unpaired import unpair
    from dpop.tasks.arithmetic import make_pairs

    unpaired = unpair(pairs_from_rows(make_pairs(13, edit="low", seed=0)).pairs, where="test")[:25]
    data = tmp_path / "kto.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": list(row.prompt), "completion": list(row.chosen),
                                          "label": row.desirable}) for row in unpaired))
    policy = tiny_model_saver(tmp_path / "policy", seed=5)  # y' likelier under it than under the reference
    common = dict(loss="kto", learning_rate=1e-4, max_steps=4, grad_accum=2, data=str(data), model=str(policy),
                  ref_model=str(tiny_model_dir))
    one = tiny_config("one", batch_size=4, **common)
    two = tiny_config("two", batch_size=2, num_processes=2, **common)
    train(one)
    run_cli("train", *flags(two))
    assert [r["pairs_seen"] for r in rows(two)] == [8, 16, 24, 25]
    assert all(r["kto/z0"] > 0 for r in rows(two))
    assert_same_run(one, two, tolerance=1e-5)
