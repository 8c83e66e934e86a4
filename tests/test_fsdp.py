"""dpop's FSDP2 engine (dpop.distributed.fsdp) on this CPU: 2 gloo processes, sharded, against one process.

Each 2-process run is `python -m dpop train --num-processes 2 --engine fsdp2 ...` in a subprocess (the CLI's
relaunch under torchrun); the 1-process twins run in this process. One launch checks several things at once to
keep the suite's time down: the equivalence, the reference pass, eval split across ranks, checkpoints, final/.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import NOT_COMPARED, assert_same_run, flags, moved, rows, run_cli, weights

from dpop.errors import ConfigError
from dpop.training.loop import train


def test_fsdp2_on_two_processes_takes_the_single_process_steps_and_resumes_exactly(tiny_config, eval_pairs_file):
    """3 steps of 2 x batch 2 sharded against 1 x batch 4: metrics (loss, grad_norm, eval on the final weights,
    evaluated across ranks) and final/ weights within fp32 tolerance; the precomputed reference (step-0
    rewards 0) and its cache (a second run reads it); sharded checkpoints (torch.distributed.checkpoint) and a
    run stopped at step 2 and resumed to 3 that is bit-identical to the uninterrupted one; final/ loads."""
    from dpop.models import load_model

    common = dict(loss="dpo", learning_rate=1e-4, scheduler="constant", max_steps=3, eval_data=str(eval_pairs_file),
                  eval_batch_size=2, save_every=2)  # 3 eval batches: [0 2] and [1, a joined round]
    one = tiny_config("one", batch_size=4, **common)
    sharded = tiny_config("sharded", batch_size=2, num_processes=2, engine="fsdp2", **common)
    train(one)
    done = run_cli("train", *flags(sharded))
    assert done.stdout.count("dpop: done:") == 1
    assert "reference pass (train): all" not in done.stderr + done.stdout  # the first run computes the reference
    first = rows(sharded)[0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 0: policy == reference
    largest = assert_same_run(one, sharded, tolerance=1e-5)
    assert moved(one) > 20 * largest
    checkpoint = Path(sharded.output_dir) / "checkpoints" / "step-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "weights.safetensors").exists()
    assert json.loads((checkpoint / "state.json").read_text())["num_processes"] == 2
    model, _ = load_model(Path(sharded.output_dir) / "final")  # consolidated: a plain HF model dir
    loaded, saved = model.state_dict(), weights(sharded)
    assert model.config.tie_word_embeddings
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())

    short = tiny_config("short", batch_size=2, num_processes=2, engine="fsdp2", **dict(common, max_steps=2))
    again = run_cli("train", *flags(short))
    assert "reference pass (train): all 8 pairs from cache" in again.stdout  # 2 steps x 4 pairs
    run_cli("train", "--output-dir", short.output_dir, "--resume", "--max-steps", "3")
    uninterrupted = [r for r in rows(sharded) if r["split"] == "train" or r["step"] == 3]
    resumed = [r for r in rows(short) if r["split"] == "train" or r["step"] == 3]  # short's own final eval: step 2
    assert [(r["split"], r["step"]) for r in resumed] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith(NOT_COMPARED)} == \
               {k: v for k, v in b.items() if not k.startswith(NOT_COMPARED)}
    whole_weights, short_weights = weights(sharded), weights(short)
    assert all(torch.equal(whole_weights[name], short_weights[name]) for name in whole_weights)


def test_fsdp2_refuses_what_it_does_not_do(tiny_config):
    with pytest.raises(ConfigError, match="engine fsdp2 with LoRA is not supported"):
        tiny_config(engine="fsdp2", num_processes=2, lora_r=4)
    with pytest.raises(ConfigError, match="engine fsdp2 with ref_strategy model"):
        tiny_config(engine="fsdp2", num_processes=2, ref_strategy="model")
    with pytest.raises(ConfigError, match="this run has one"):
        train(tiny_config(engine="fsdp2"))


def test_the_accelerate_fsdp2_config_runs_dpop_fsdp2_and_bf16_sr_dithers_each_shard_as_the_whole(tiny_config):
    """configs/accelerate/fsdp2.yaml through `accelerate launch` (2 CPU processes): the run records engine fsdp2,
    and bf16-sr (each process dithers its shards with their part of the whole tensor's thresholds) trains as
    2-process DDP bf16-sr does; with accumulation (FSDP2 reduce-scatters once per step)."""
    config_file = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp2.yaml"
    common = dict(loss="dpo", learning_rate=1e-4, max_steps=2, precision="bf16-sr", batch_size=2, grad_accum=2)
    ddp = tiny_config("ddp", num_processes=2, **common)
    sharded = tiny_config("sharded", **common)
    run_cli("train", *flags(ddp))
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                           "--num_processes", "2", "-m", "dpop", "train", *flags(sharded)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "engine: fsdp2" in (Path(sharded.output_dir) / "config.yaml").read_text()
    assert_same_run(ddp, sharded, tolerance=1e-5)


def test_accelerate_configs_dpop_cannot_follow_are_refused(tiny_config, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1; dpop runs FSDP2 only"):
        train(tiny_config())
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params: true"):
        train(tiny_config())
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    with pytest.raises(ConfigError, match="engine fsdp2 shards the model over processes, and this run has one"):
        train(tiny_config())
    with pytest.raises(ConfigError, match="engine fsdp2 with LoRA"):
        train(tiny_config(lora_r=4))
