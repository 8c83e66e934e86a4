"""bf16 on CPU (dpop.precision): autocast over fp32 weights, with attention routed through fp32."""

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dpop.precision import FP32_ATTENTION, prepare_model
from dpop.train import train


class AttentionDtypes(TorchDispatchMode):
    """Records the query dtype of every attention kernel call, as dispatched (after autocast)."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in str(func):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_bf16_on_cpu_runs_attention_in_fp32_with_the_same_logits(tiny_model_dir):
    from dpop.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    plain, _ = load_model(str(tiny_model_dir))
    prepare_model(model, "bf16", "cpu")
    assert model.config._attn_implementation == FP32_ATTENTION
    assert next(model.parameters()).dtype == torch.float32  # the weights stay fp32: autocast rounds copies
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with AttentionDtypes() as ours_seen:
            ours = model(ids).logits.float()
        with AttentionDtypes() as plain_seen:
            theirs = plain(ids).logits.float()
    assert ours_seen.dtypes == {torch.float32}  # the attention kernel itself, after autocast, ran in fp32
    assert plain_seen.dtypes == {torch.bfloat16}  # what autocast does to plain sdpa
    assert torch.allclose(ours, theirs, atol=0.05)  # the same model; only the attention arithmetic differs


def test_fp32_leaves_attention_alone(tiny_model_dir):
    from dpop.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    prepare_model(model, "fp32", "cpu")
    assert model.config._attn_implementation == "sdpa"


def test_a_bf16_run_saves_a_model_that_names_standard_attention(tiny_config):
    config = tiny_config("bf16", precision="bf16", max_steps=2, learning_rate=1e-3)
    train(config)
    saved = (Path(config.output_dir) / "final" / "config.json").read_text()
    assert FP32_ATTENTION not in saved
