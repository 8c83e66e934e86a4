"""LoRA through peft: DoRA, the reference as the policy with its adapters off (never a second copy), the
precomputed reference read with adapters off, final/ merged or adapter-only, and QLoRA refused without CUDA."""

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpop.training.loop
import dpop.training.setup
from dpop.cli import main
from dpop.errors import ConfigError
from dpop.models import load_model
from dpop.training.loop import train
from dpop.training.setup import setup


def metric_rows(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]


def logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.parametrize("ref_strategy, precision", [("lora", "bf16"), ("precompute", "fp32")])
def test_dora_trains_magnitudes_and_adapters_and_starts_at_zero_reward(tiny_config, ref_strategy, precision):
    config = tiny_config(ref_strategy, lora_r=4, lora_dora=True, ref_strategy=ref_strategy, precision=precision,
                         learning_rate=1e-2, save_every=3)
    train(config)
    rows = metric_rows(config)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen_delta"):
        assert abs(rows[0][key]) <= 1e-6, (key, rows[0][key])
    assert abs(rows[-1]["logps/chosen_delta"]) > 1e-3  # the adapters moved the policy away from the reference
    trained = load_file(str(Path(config.output_dir) / "checkpoints" / "step-3" / "weights.safetensors"))
    assert any("lora_magnitude_vector" in name for name in trained)  # DoRA is on, not plain LoRA
    assert all("lora_" in name for name in trained)


def test_the_lora_reference_is_the_policy_itself_not_a_copy(tiny_config, tiny_model_dir):
    run = setup(tiny_config(lora_r=4, ref_strategy="model"))  # "model" would mean a copy without LoRA
    policy = run.accelerator.unwrap_model(run.model)
    assert run.config.ref_strategy == "lora"  # what config.yaml records
    assert run.reference.model is policy and run.reference.disable_adapters

    full = setup(tiny_config("full", ref_strategy="model"))  # without LoRA a frozen copy is what was asked for
    assert full.config.ref_strategy == "model" and full.reference.model is not full.accelerator.unwrap_model(full.model)

    explicit = setup(tiny_config("explicit", lora_r=4, ref_strategy="model", ref_model=str(tiny_model_dir)))
    assert explicit.config.ref_strategy == "model"  # a ref_model given by name is loaded as asked
    assert explicit.reference.model is not explicit.accelerator.unwrap_model(explicit.model)


def test_precompute_reads_the_reference_with_the_adapters_off(tiny_config, tiny_model_dir, monkeypatch):
    """Adapters made non-zero before the reference pass: the cached reference must still be the base model's."""
    from dpop.scoring.batching import make_batch
    from dpop.scoring.reference import LiveReference

    add_lora = dpop.training.setup._add_lora

    def add_perturbed_lora(model, config):
        model = add_lora(model, config)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
        return model

    monkeypatch.setattr(dpop.training.setup, "_add_lora", add_perturbed_lora)
    run = setup(tiny_config(lora_r=4, ref_strategy="precompute"))
    indices = (~torch.isnan(run.reference.chosen)).nonzero().flatten()[:4].tolist()  # pairs the pass covered
    assert indices
    batch = make_batch(run.data.train.pairs, indices, **run.layout())
    expected = LiveReference(load_model(str(tiny_model_dir))[0], contextlib.nullcontext)(batch, indices)
    cached = run.reference(batch, indices)
    # computed in other batches than here: equal up to fp32 rounding (~1e-6), far below the adapters' effect
    torch.testing.assert_close(cached.chosen, expected.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.rejected, expected.rejected, atol=1e-4, rtol=0)
    with_adapters = LiveReference(run.accelerator.unwrap_model(run.model), contextlib.nullcontext)(batch, indices)
    assert (with_adapters.chosen - expected.chosen).abs().max() > 1e-2  # the perturbation is visible with adapters on


def test_adapter_only_final_loads_and_matches_the_merged_final(tiny_config, tiny_model_dir, monkeypatch, tmp_path,
                                                               capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tiny_model_dir.parent)  # the base given as a relative path: final/ must record it absolutely
    options = dict(model=tiny_model_dir.name, lora_r=4, lora_dora=True, learning_rate=1e-2)
    merged_run, adapter_run = tiny_config("merged", **options), tiny_config("adapter", lora_save="adapter", **options)
    train(merged_run)
    train(adapter_run)
    merged_dir, adapter_dir = Path(merged_run.output_dir) / "final", Path(adapter_run.output_dir) / "final"
    monkeypatch.chdir(tmp_path)

    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert not any(name.startswith("model") for name in names)
    recorded = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_model_dir.resolve())

    input_ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir), input_ids)
    from_adapter = logits(load_model(str(adapter_dir))[0], input_ids)
    base = logits(load_model(str(tiny_model_dir))[0], input_ids)
    torch.testing.assert_close(from_adapter, merged, atol=1e-5, rtol=0)
    assert (merged - base).abs().max() > 1e-3  # training changed the model, so the comparison means something

    capsys.readouterr()
    prompt = ["--prompt", "What is 2 + 3?", "--max-new-tokens", "4"]
    assert main(["generate", "--model", str(adapter_dir), *prompt]) == 0
    assert main(["generate", "--model", str(merged_dir), *prompt]) == 0
    from_adapter_text, merged_text = capsys.readouterr().out.splitlines()[-2:]
    assert from_adapter_text == merged_text


def test_an_adapter_whose_base_is_gone_names_the_path(tmp_path):
    from dpop.errors import ModelError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ModelError, match="base_model_name_or_path"):
        load_model(str(adapter))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: QLoRA is allowed here")
def test_qlora_without_cuda_is_a_clear_error_before_anything_is_written(tiny_config):
    config = tiny_config(lora_r=4, lora_4bit=True)
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*drop --lora-4bit"):
        train(config)
    assert not Path(config.output_dir).exists()


def test_qlora_without_bitsandbytes_says_how_to_install_it(monkeypatch):
    import importlib.util

    from dpop.config import check_4bit_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        check_4bit_available()


@pytest.mark.parametrize("option", [dict(lora_dora=True), dict(lora_4bit=True), dict(lora_save="adapter")])
def test_lora_options_without_lora_are_refused(tiny_config, option):
    with pytest.raises(ConfigError, match="lora_r > 0"):
        tiny_config(**option)
