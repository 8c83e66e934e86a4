"""TDPO's sequential KL: the chunked full-vocabulary KL against a direct computation (value and gradient), and
training with a live reference (a frozen copy, or LoRA's own base) from ln 2; a precomputed reference is refused."""

import json
from pathlib import Path

import pytest
import torch

from dpop.config import make_config
from dpop.errors import ConfigError
from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer
from dpop.scoring.logprobs import backbone_and_head, token_kl_chunked
from dpop.training.loop import train


def test_the_chunked_kl_is_the_full_vocabulary_kl_with_its_gradient():
    tokenizer = make_tiny_tokenizer()
    policy, reference = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    head, ref_head = backbone_and_head(policy)[1], backbone_and_head(reference)[1]
    hidden = torch.randn(37, policy.config.hidden_size, requires_grad=True)
    ref_hidden = torch.randn(37, policy.config.hidden_size)
    ours = token_kl_chunked(hidden, head, ref_hidden, ref_head, policy.config, chunk_tokens=8)  # 5 chunks
    log_p = torch.log_softmax(head(hidden).float(), -1)
    with torch.no_grad():
        log_q = torch.log_softmax(ref_head(ref_hidden).float(), -1)
    direct = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=1e-5)
    assert (ours > 0).all()
    (grad_ours,) = torch.autograd.grad(ours.sum(), hidden)
    (grad_direct,) = torch.autograd.grad(direct.sum(), hidden)
    torch.testing.assert_close(grad_ours, grad_direct, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss, extra", [("tdpo2", dict(ref_strategy="model")), ("tdpo1", dict(ref_strategy="model")),
                                         ("tdpo2", dict(ref_strategy="lora", lora_r=4))])
def test_tdpo_trains_from_ln2_against_a_live_reference(tiny_config, loss, extra):
    config = tiny_config(f"{loss}-{extra['ref_strategy']}", loss=loss, max_steps=3, batch_size=4,
                         learning_rate=1e-3, **extra)
    summary = train(config).summary
    rows = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy = reference: KLs and Δ are 0
    assert rows[-1]["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)
    assert summary["steps"] == 3


def test_a_precomputed_reference_is_refused():
    for strategy in ("precompute", "guided"):
        with pytest.raises(ConfigError, match="full token distributions"):
            make_config({"loss": "tdpo2", "ref_strategy": strategy})
    make_config({"loss": "tdpo2", "ref_strategy": "model"})


def test_tdpo_accumulates_exactly(tiny_config):
    """Batch 4 × 1 and 2 × 2: the same first step (grad norm and logged loss)."""
    rows = {}
    for name, batch, accum in (("whole", 4, 1), ("split", 2, 2)):
        config = tiny_config(f"tdpo-{name}", loss="tdpo2", ref_strategy="model", max_steps=2, batch_size=batch,
                             grad_accum=accum, learning_rate=1e-3)
        train(config)
        rows[name] = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    for step in range(2):
        for key in ("grad_norm", "loss"):
            assert rows["split"][step][key] == pytest.approx(rows["whole"][step][key], rel=1e-4), (step, key)
