"""The training loop end to end on a tiny model: the run directory, the metrics, step-0 invariants,
accumulation invariance, the optimizers and schedules, dropout, and the run-dir guard."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpop.config import make_config
from dpop.config.flags import read_yaml
from dpop.errors import ConfigError
from dpop.scoring.metrics import ALL_KEYS, EXTRA_PAIR_KEYS
from dpop.training.loop import train


def metrics_rows(run_dir, split="train"):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row["split"] == split]


def final_weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_three_steps_write_a_loadable_run_with_every_metric(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(learning_rate=1e-3)
    summary = train(config).summary
    run_dir = Path(config.output_dir)

    rows = metrics_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert set(ALL_KEYS) | set(EXTRA_PAIR_KEYS) <= set(row), set(ALL_KEYS) - set(row)
        assert all(row[key] is not None for key in ALL_KEYS), row
    first = rows[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen_delta", "dpop/penalty"):
        assert abs(first[key]) <= 1e-6, (key, first[key])
    assert first["logps/chosen"] == first["logps/ref_chosen"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # −log σ(0)
    assert rows[-1]["pairs_seen"] == 6 and rows[-1]["epoch"] == pytest.approx(6 / 16)
    assert rows[-1]["logps/chosen_delta"] != 0  # training moved the policy

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.vocab_size == len(tokenizer)
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = final_weights(run_dir)
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[name], initial[name]) for name in initial)

    written = json.loads((run_dir / "summary.json").read_text())
    assert written["steps"] == summary["steps"] == 3
    assert written["final_model"] == str(run_dir / "final")
    saved = make_config(read_yaml(run_dir / "config.yaml"))  # the resolved config loads back
    assert saved.precision == "fp32" and saved.eval_batch_size == 8 and saved.max_prompt_length == 128


def test_first_step_rewards_are_zero_in_bf16(tiny_config):
    config = tiny_config(precision="bf16", max_steps=1, layout="plain")
    train(config)
    first = metrics_rows(Path(config.output_dir))[0]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen_delta"):
        assert abs(first[key]) <= 1e-6, (key, first[key])


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_accumulation_invariance(tiny_config, layout):
    """Batch 4 x 1 micro-batch and batch 1 x 4 micro-batches take the same two optimizer steps."""
    common = dict(max_steps=2, layout=layout, learning_rate=1e-4, scheduler="constant")
    whole = tiny_config("whole", batch_size=4, grad_accum=1, **common)
    split = tiny_config("split", batch_size=1, grad_accum=4, **common)
    train(whole)
    train(split)
    whole_dir, split_dir = (Path(c.output_dir) for c in (whole, split))
    for a, b in zip(metrics_rows(whole_dir), metrics_rows(split_dir)):
        assert a["pairs_seen"] == b["pairs_seen"] == 4 * a["step"]
        for key in ("loss", "rewards/margins", "logps/chosen_delta"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    initial = load_file(str(Path(whole.model) / "model.safetensors"))
    whole_weights, split_weights = final_weights(whole_dir), final_weights(split_dir)
    moved = max(float((whole_weights[name] - initial[name]).abs().max()) for name in initial)
    assert moved > 1e-4  # the comparison below is far tighter than what the two steps changed
    # Adam divides by the gradient's own magnitude, so for a component whose gradient is ~0 the two runs'
    # different summation orders (~1e-7 relative) can move it differently by a visible fraction of lr: the
    # weights get 3e-5 where loss, margins and grad_norm above get 1e-5 (the weights moved up to 2e-4).
    for name in whole_weights:
        torch.testing.assert_close(whole_weights[name], split_weights[name], atol=3e-5, rtol=0)


def test_rmsprop_cosine_warmup_schedule(tiny_config):
    config = tiny_config(optimizer="rmsprop", scheduler="cosine", warmup_steps=2, max_steps=5, learning_rate=1e-3,
                         max_grad_norm=0.5)
    train(config)
    rows = metrics_rows(Path(config.output_dir))
    # warmup: lr·(s + 1)/3 for s = 0, 1; then lr·(1 + cos(π·p))/2 with p = (s − 2)/3 for s = 2, 3, 4
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 3)) for s in (2, 3, 4)]
    assert [row["lr"] for row in rows] == pytest.approx(expected)
    # the first step already moves the policy (no step at lr 0): its rewards are non-zero at step 2
    assert abs(rows[0]["rewards/chosen"]) <= 1e-6 and abs(rows[1]["rewards/chosen"]) > 1e-6


def test_lr_factor_schedules():
    from dpop.training.setup import lr_factor

    linear = [lr_factor(s, schedule="linear", warmup_steps=3, total_steps=7) for s in range(8)]
    assert linear == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [lr_factor(s, schedule="constant", warmup_steps=0, total_steps=3) for s in range(3)] == [1.0] * 3
    assert lr_factor(5, schedule="cosine", warmup_steps=0, total_steps=10) == pytest.approx(0.5)


def test_epochs_decide_the_steps_when_max_steps_is_unset(tiny_config):
    config = tiny_config(max_steps=None, epochs=1.0, batch_size=4, grad_accum=2, loss="simpo")
    summary = train(config).summary
    rows = metrics_rows(Path(config.output_dir))
    assert summary["steps"] == 2 and rows[-1]["epoch"] == 1.0
    assert rows[0]["logps/ref_chosen"] is None  # reference-free: no reference pass, no reference log-probs


def test_one_epoch_sees_each_pair_once_when_grad_accum_does_not_divide_it(tiny_config, monkeypatch):
    """16 pairs, batch 4 x grad_accum 3, epochs 1: steps of 3 and 1 micro-batches, 16 pairs seen (it used to
    take 2 full steps, 24 pairs, the second mixing two epochs)."""
    import dpop.training.loop

    seen, real_step = [], dpop.training.loop.train_step

    def recording(run, batches):
        seen.append([(micro.epoch, tuple(micro.pair_indices)) for micro in batches])
        return real_step(run, batches)

    monkeypatch.setattr(dpop.training.loop, "train_step", recording)
    summary = train(tiny_config(max_steps=None, epochs=1.0, batch_size=4, grad_accum=3)).summary
    assert summary["steps"] == 2 and summary["pairs_seen"] == 16
    assert [len(step) for step in seen] == [3, 1] and {epoch for step in seen for epoch, _ in step} == {0}
    assert sorted(i for step in seen for _, pairs in step for i in pairs) == list(range(16))


def test_dropout_is_off_unless_asked_for(tiny_config, tiny_model_saver, tmp_path):
    """A model whose config asks for attention dropout still starts with rewards 0: dropout is off by default."""
    dropping = tiny_model_saver(tmp_path / "dropping", attention_dropout=0.5)
    off = tiny_config("off", model=str(dropping), max_steps=1)
    on = tiny_config("on", model=str(dropping), max_steps=1, dropout=True)
    train(off)
    train(on)
    assert abs(metrics_rows(Path(off.output_dir))[0]["rewards/chosen"]) <= 1e-6
    assert abs(metrics_rows(Path(on.output_dir))[0]["rewards/chosen"]) > 1e-4


def test_an_existing_run_is_never_overwritten_without_overwrite(tiny_config):
    first = tiny_config("run", max_steps=1)
    train(first)
    run_dir = Path(first.output_dir)
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    with pytest.raises(ConfigError, match="--overwrite"):
        train(tiny_config("run", max_steps=2))
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before

    train(tiny_config("run", max_steps=2, overwrite=True))
    assert [row["step"] for row in metrics_rows(run_dir)] == [1, 2]


def test_overwrite_refuses_a_directory_that_is_not_a_run(tiny_config):
    config = tiny_config("notes", overwrite=True)
    notes = Path(config.output_dir)
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a dpop run"):
        train(config)
    assert (notes / "thesis.tex").read_text() == "precious"


def test_eval_rows_are_prefixed_and_use_a_larger_batch(tiny_config, eval_pairs_file, monkeypatch):
    import dpop.evaluation.evaluate

    sizes = []
    original = dpop.scoring.pairs.ordered_batches

    def spy(pairs, batch_size, **layout):
        sizes.append(batch_size)
        return original(pairs, batch_size, **layout)

    monkeypatch.setattr(dpop.scoring.pairs, "ordered_batches", spy)
    config = tiny_config(eval_data=str(eval_pairs_file), eval_every=2, max_steps=4)
    summary = train(config).summary
    rows = metrics_rows(Path(config.output_dir), split="eval")
    assert [row["step"] for row in rows] == [2, 4]
    assert sizes == [8, 8]  # 4 x the training batch of 2
    for row in rows:
        assert {f"eval/{key}" for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen_delta",
                                          "pair_accuracy")} <= set(row)
        assert all(key.startswith("eval/") for key in row if key not in ("step", "split"))
        assert 0.0 <= row["eval/pair_accuracy"] <= 1.0
    assert summary["eval"]["eval/pair_accuracy"] == rows[-1]["eval/pair_accuracy"]


def test_layouts_and_gradient_checkpointing_take_the_same_steps(tiny_config):
    """plain rows, prefix sharing, packing and recomputed activations are the same math: same losses and
    log-probs at step 1 (before any update) and at step 2 (after one)."""
    variants = {"plain": dict(layout="plain"), "shared": dict(layout="shared"), "packed": dict(layout="packed"),
                "checkpointed": dict(layout="shared", gradient_checkpointing=True)}
    rows = {}
    for name, options in variants.items():
        config = tiny_config(name, max_steps=2, batch_size=4, learning_rate=1e-4, **options)
        train(config)
        rows[name] = metrics_rows(Path(config.output_dir))
    for name in variants:
        for got, want in zip(rows[name], rows["plain"]):
            for key in ("loss", "rewards/margins", "logps/chosen_delta"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), (name, key)
            for key in ("logps/chosen", "logps/rejected"):
                assert got[key] == pytest.approx(want[key], rel=1e-6), (name, key)


@pytest.mark.slow
def test_builtin_model_starts_at_zero_reward(tmp_path, monkeypatch):
    """The real smollm2-135m on a few builtin-task pairs, at the machine's default precision."""
    from dpop.models.builtin import prepare_builtin

    model_dir = prepare_builtin()  # the cache `make` filled; then a private cache for the reference pass
    monkeypatch.setenv("DPOP_CACHE", str(tmp_path / "cache"))
    config = make_config(dict(model=str(model_dir), output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2,
                              task_pairs=8, max_length=384))
    summary = train(config).summary
    first = metrics_rows(Path(config.output_dir))[0]
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen_delta"):
        assert abs(first[key]) <= 1e-6, (key, first[key])
    assert summary["steps"] == 2 and 0.0 <= summary["eval"]["eval/pair_accuracy"] <= 1.0


def test_a_config_built_in_python_is_validated_too(tiny_config, tmp_path):
    import dataclasses

    config = dataclasses.replace(tiny_config(), beta=-1.0)  # dataclasses.replace skips make_config's checks
    with pytest.raises(ConfigError, match="beta: must be > 0"):
        train(config)
    assert not Path(config.output_dir).exists()
