"""Pre-DPO (--ref-strategy guided): one command that is the two-run recipe, its guide kept in the run dir."""

import json
from pathlib import Path

import pytest
import torch

from dpop.config import make_config
from dpop.errors import ConfigError
from dpop.training.loop import train


def _rows(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]


def test_guided_is_a_guide_run_then_a_run_against_it(tiny_config):
    common = dict(loss="dpop", max_steps=2, batch_size=4, learning_rate=1e-3)
    guide = tiny_config("manual-guide", **dict(common, loss="dpo"))
    train(guide)
    manual = tiny_config("manual", ref_model=str(Path(guide.output_dir) / "final"), **common)
    manual_model = train(manual).model
    guided = tiny_config("guided", ref_strategy="guided", guide_loss="dpo", **common)
    result = train(guided)
    run_dir = Path(guided.output_dir)
    assert (run_dir / "guide" / "final").is_dir() and (run_dir / "guide" / "summary.json").is_file()
    assert [r["loss"] for r in _rows(tiny_config("guided/guide"))] == [r["loss"] for r in _rows(guide)]
    first, manual_first = _rows(guided)[0], _rows(manual)[0]
    assert first["logps/chosen_delta"] == manual_first["logps/chosen_delta"] != 0  # the guide is the reference
    for (name, ours), theirs in zip(result.model.named_parameters(), manual_model.parameters()):
        assert torch.equal(ours, theirs), name


def test_a_guided_run_resumes_without_training_its_guide_again(tiny_config):
    common = dict(ref_strategy="guided", batch_size=4, save_every=1, scheduler="constant")
    train(tiny_config("run", max_steps=2, **common))
    guide_metrics = (Path(tiny_config("run").output_dir) / "guide" / "metrics.jsonl").read_text()
    summary = train(tiny_config("run", max_steps=3, resume=True, **common)).summary
    assert summary["steps"] == 3
    assert (Path(tiny_config("run").output_dir) / "guide" / "metrics.jsonl").read_text() == guide_metrics


def test_guided_refuses_a_given_reference_and_a_model_object(tiny_config):
    with pytest.raises(ConfigError, match="drop ref_model"):
        make_config({"ref_strategy": "guided", "ref_model": "x"})
    from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    with pytest.raises(ConfigError, match="not as an object"):
        train(tiny_config("object", ref_strategy="guided"), model=make_tiny_model(tokenizer), tokenizer=tokenizer)
