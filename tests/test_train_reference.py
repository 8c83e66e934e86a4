"""Reference strategies (step-0 agreement under each, fp32 and bf16), the on-disk reference cache, LoRA,
sft -> train with --ref-model, and trackers."""

import json
import math
from pathlib import Path

import pytest
from accelerate.tracking import GeneralTracker

import dpop.training.loop
import dpop.training.setup
from dpop.errors import ConfigError
from dpop.scoring.reference import LiveReference
from dpop.training.loop import train


def first_row(config):
    line = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[0]
    return json.loads(line)


STRATEGIES = {
    "precompute": dict(ref_strategy="precompute"),
    "model": dict(ref_strategy="model"),
    "ref_model": dict(ref_strategy="precompute", ref_model="SAME"),
    "ref_model_live": dict(ref_strategy="model", ref_model="SAME"),
    "lora": dict(ref_strategy="lora", lora_r=4),
    "lora_precompute": dict(ref_strategy="precompute", lora_r=4),
}


def test_every_reference_strategy_starts_at_zero_reward_with_the_same_loss(tiny_config, tiny_model_dir):
    chosen_logps = {}
    for precision in ("fp32", "bf16", "bf16-sr"):  # the tiny model is off the bf16 grid: bf16-sr rounds it
        losses = {}
        for name, options in STRATEGIES.items():
            options = {key: str(tiny_model_dir) if value == "SAME" else value for key, value in options.items()}
            config = tiny_config(f"{name}-{precision}", precision=precision, max_steps=1, batch_size=4, **options)
            train(config)
            row = first_row(config)
            for key in ("rewards/chosen", "rewards/rejected", "logps/chosen_delta"):
                assert abs(row[key]) <= 1e-6, (precision, name, key, row[key])
            losses[name] = row["loss"]
            if name == "precompute":  # a full fine-tune: bf16-sr rounds every weight (a LoRA's base stays)
                chosen_logps[precision] = row["logps/chosen"]
        assert max(losses.values()) - min(losses.values()) <= 1e-6, (precision, losses)
    assert chosen_logps["fp32"] != chosen_logps["bf16"]  # bf16 autocast really ran
    assert chosen_logps["bf16-sr"] != chosen_logps["bf16"]  # and bf16-sr computed with its rounded weights


def test_a_second_identical_run_reads_the_reference_from_the_cache(tiny_config, eval_pairs_file, monkeypatch,
                                                                  capsys, dpop_cache):
    calls = []
    real_call = LiveReference.__call__

    def counting(self, batch, pair_indices):
        calls.append(len(pair_indices))
        return real_call(self, batch, pair_indices)

    monkeypatch.setattr(LiveReference, "__call__", counting)
    train(tiny_config("first", eval_data=str(eval_pairs_file)))
    assert sum(calls) == 6 + 6  # the 3 steps' train pairs and the eval pairs
    assert len(list((dpop_cache / "reference").glob("*.safetensors"))) == 2
    calls.clear()
    capsys.readouterr()

    train(tiny_config("second", eval_data=str(eval_pairs_file), loss="dpo"))  # another loss, same reference
    assert calls == []
    assert "all 6 pairs from cache" in capsys.readouterr().out

    train(tiny_config("third", max_steps=5))  # needs 4 more train pairs: only those are computed
    assert sum(calls) == 4


def test_the_reference_cache_key_holds_grad_accum_under_group_by_length(tiny_config, dpop_cache):
    """Length groups span an optimizer step (batch x grad_accum pairs), so the first epoch's micro-batches and
    their rounding differ with grad_accum: another grad_accum must not read the cached log-probs."""
    common = dict(group_by_length=True, batch_size=2, max_steps=2)
    train(tiny_config("accum-1", grad_accum=1, **common))
    train(tiny_config("accum-2", grad_accum=2, **common))
    assert len(list((dpop_cache / "reference").glob("*.safetensors"))) == 2
    train(tiny_config("plain-1", grad_accum=1, max_steps=2, batch_size=2))
    train(tiny_config("plain-2", grad_accum=2, max_steps=2, batch_size=2))  # ungrouped: the same schedule, reused
    assert len(list((dpop_cache / "reference").glob("*.safetensors"))) == 3


def test_lora_trains_adapters_only_and_final_is_a_plain_model(tiny_config, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = tiny_config(ref_strategy="lora", lora_r=4, lora_target="q_proj,v_proj", learning_rate=1e-2, save_every=3)
    train(config)
    run_dir = Path(config.output_dir)
    adapters = load_file(str(run_dir / "checkpoints" / "step-3" / "weights.safetensors"))
    assert adapters and all("lora_" in name for name in adapters)
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(final) == set(initial)  # merged: no adapter tensors left
    changed = {name for name in initial if not (final[name] == initial[name]).all()}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    with pytest.raises(ConfigError, match="lora_target"):
        train(tiny_config("bad", lora_r=4, lora_target="no_such_module"))


def test_sft_then_preference_training_against_the_sft_model(tiny_config):
    sft = tiny_config("sft", loss="sft", learning_rate=1e-3, max_steps=2)
    summary = train(sft).summary
    sft_final = Path(sft.output_dir) / "final"
    assert summary["train"]["loss"] > 0 and math.isnan(summary["train"]["rewards/chosen"])  # sft has no rewards

    # the SFT model as reference and as the starting policy: step-0 rewards are 0
    on_top = tiny_config("dpop", model=str(sft_final), ref_model=str(sft_final))
    train(on_top)
    assert abs(first_row(on_top)["rewards/chosen"]) <= 1e-6
    # as reference only (Pre-DPO style): the untrained policy starts away from it
    against = tiny_config("against", ref_model=str(sft_final))
    train(against)
    assert abs(first_row(against)["logps/chosen_delta"]) > 1e-3


def test_the_logged_sft_loss_is_the_one_optimised_the_nll_per_chosen_token_of_the_step(tiny_config):
    """Step 1 of sft over all 16 pairs (of unequal lengths) logs Σ −log πθ(y_w|x) / Σ |y_w| at the initial
    weights, the loss whose gradient the step takes; the mean of per-pair per-token NLLs would differ."""
    import torch

    from dpop.data.runs import load_run_pairs, tokenize_run_pairs
    from dpop.models import load_model
    from dpop.scoring.batching import make_batch
    from dpop.scoring.logprobs import sequence_logps

    config = tiny_config("sft-loss", loss="sft", max_steps=1, batch_size=16, grad_accum=1)
    train(config)
    logged = first_row(config)["loss"]
    model, tokenizer = load_model(config.model)
    data = tokenize_run_pairs(load_run_pairs(config), tokenizer, config)
    batch = make_batch(data.train.pairs, range(16), layout="plain", pad_id=tokenizer.pad_token_id,
                       with_rejected=False)
    with torch.no_grad():
        policy = sequence_logps(model, batch)
    per_token = float(-policy.chosen.sum() / policy.chosen_lengths.sum())
    mean_of_pairs = float((-policy.chosen / policy.chosen_lengths).mean())  # lengths differ: 5.9659 vs 5.9667
    assert abs(logged - per_token) < 1e-5 and 10 * abs(logged - per_token) < abs(logged - mean_of_pairs)
    assert torch.isnan(policy.rejected).all()


def test_a_reference_with_another_tokenizer_is_refused(tiny_config, tmp_path):
    from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(vocab_size=300)
    other = tmp_path / "other"
    make_tiny_model(tokenizer).save_pretrained(other)
    tokenizer.save_pretrained(other)
    config = tiny_config(ref_model=str(other))
    with pytest.raises(ConfigError, match="tokenizer differs"):
        train(config)
    assert not Path(config.output_dir).exists()


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged, self.config = [], None

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))


def test_trackers_get_the_metrics_rows(tiny_config, eval_pairs_file, monkeypatch):
    from dpop.scoring.metrics import ALL_KEYS

    tracker = RecordingTracker()
    monkeypatch.setattr(dpop.training.setup, "_trackers", lambda config: [tracker])
    config = tiny_config(max_steps=2, eval_data=str(eval_pairs_file))
    train(config)
    assert tracker.config["beta"] == 0.3
    assert [step for step, _ in tracker.logged] == [1, 2, 2]
    assert set(ALL_KEYS) <= set(tracker.logged[0][1])
    assert "eval/pair_accuracy" in tracker.logged[2][1]


def test_a_tracker_without_its_package_is_a_clear_error(tiny_config):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    config = tiny_config(report_to="tensorboard")
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(config)
    assert not Path(config.output_dir).exists()
