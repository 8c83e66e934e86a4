"""The Python API: `from dpop import ...`, train() on objects and in-memory pairs, and a process left as found."""

import json
import signal
import subprocess
import sys

import pytest
import torch

from dpop import TrainConfig, train
from dpop.tasks.arithmetic import make_pairs


def test_the_public_names_import_from_the_package():
    names = "train, TrainConfig, evaluate_model, load_pairs, preference_loss, LOSSES"
    done = subprocess.run([sys.executable, "-c", f"from dpop import {names}; print(len(LOSSES))"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 20


def test_import_dpop_stays_light():
    """The CLI imports the package for every command, `--help` included: no torch until a name is used."""
    done = subprocess.run([sys.executable, "-c", "import sys, dpop; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def _tiny():
    from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    return make_tiny_model(tokenizer, seed=0), tokenizer


def test_train_a_model_object_on_in_memory_pairs_and_read_the_result(tmp_path, dpop_cache):
    model, tokenizer = _tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = make_pairs(8, edit="low", seed=0)
    result = train(TrainConfig(output_dir=str(tmp_path / "run"), precision="fp32", max_length=256),
                   model=model, tokenizer=tokenizer, data=rows, eval_data=make_pairs(4, edit="low", seed=0, split="eval"),
                   loss="dpo", batch_size=4, max_steps=2, learning_rate=1e-3)
    assert result.summary["steps"] == 2 and result.summary["train_pairs"] == 8
    assert result.summary["eval"]["eval/pair_accuracy"] is not None
    rows_logged = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [row["step"] for row in rows_logged if row["split"] == "train"] == [1, 2]
    assert result.model is model  # trained in place
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(result.final_model)
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    # the precomputed reference of a model in memory is not written to (or read from) the disk cache
    assert not list((dpop_cache / "reference").glob("*.safetensors"))


def test_train_reads_a_datasets_dataset(tmp_path, tiny_model_dir, dpop_cache):
    from datasets import Dataset

    rows = make_pairs(6, edit="low", seed=1)
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows])
    result = train({"model": str(tiny_model_dir), "output_dir": str(tmp_path / "ds"), "precision": "fp32",
                    "max_length": 256, "batch_size": 3, "max_steps": 1}, data=data)
    assert result.summary["train_pairs"] == 6 and result.summary["steps"] == 1


def test_a_library_call_leaves_the_process_as_it_found_it(tmp_path, dpop_cache):
    """bf16 on CPU registers an fp32 sdpa with transformers and sets it on the model; a stop-signal handler
    is installed during the steps. After train(): the registry, the model's attention and the handlers are
    what they were, and the returned model holds master weights (no bf16-sr dither)."""
    from transformers import AttentionInterface

    from dpop.precision import FP32_ATTENTION

    model, tokenizer = _tiny()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    result = train(TrainConfig(output_dir=str(tmp_path / "bf16"), precision="bf16-sr", max_length=256, max_steps=1,
                               batch_size=4, data=None, task_pairs=8), model=model, tokenizer=tokenizer)
    assert FP32_ATTENTION not in AttentionInterface._global_mapping
    assert model.config._attn_implementation == "sdpa"
    assert {number: signal.getsignal(number) for number in handlers} == handlers
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(result.final_model)
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_a_model_without_its_tokenizer_is_refused(tmp_path):
    from dpop.errors import ConfigError

    model, _ = _tiny()
    with pytest.raises(ConfigError, match="give both the model and its tokenizer"):
        train(TrainConfig(output_dir=str(tmp_path / "x")), model=model)


def test_quiet_keeps_the_progress_messages_off_stdout(tmp_path, tiny_model_dir, pairs_file, dpop_cache, capsys):
    from dpop.cli import main

    common = ["--model", str(tiny_model_dir), "--data", str(pairs_file), "--precision", "fp32", "--max-steps", "1",
              "--batch-size", "4", "--max-length", "256"]
    assert main(["train", *common, "--output-dir", str(tmp_path / "loud")]) == 0
    assert "dpop: loss dpop, 16 pairs" in capsys.readouterr().out
    assert main(["train", *common, "--output-dir", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "dpop:" not in capsys.readouterr().out
    assert (tmp_path / "quiet" / "final").is_dir()
