"""Model FLOPs of a training step, and the bf16 matmul rate they are compared with (MFU).

FLOPs of one optimizer step (forward + backward, model FLOPs: recomputation is not counted, so this is MFU,
not hardware FLOPs utilisation):

    flops = 6 · N_body · T_body  +  6 · N_head · T_head  +  12 · L · d_attn · A

- N_body: parameters of the decoder's Linear layers (attention q/k/v/o and MLP; no embeddings, no norms),
  T_body: real (non-padding) tokens the decoder reads. A token costs 2 FLOPs per weight forward and 4 backward.
- N_head: lm-head weights (vocab × hidden; tied to the embedding here, counted once as the matmul it is),
  T_head: tokens whose next-token log-prob is computed = response tokens (both engines project only those:
  dpop gathers the states that predict responses, TRL 1.16's fused head skips labels of -100).
- A: (query, key) pairs the attention mask allows, summed over the step; L layers, d_attn = heads × head_dim.
  QKᵀ and AV cost 2·d_attn each per pair forward, twice that backward: 12 · d_attn per pair and layer.
  Counted from the mask's meaning, not from what a dense-mask kernel touches: the FLOPs a step needs.

What is counted follows each engine's layout (`layout_work`): TRL and dpop's `plain` layout read the prompt
twice (one row per response); dpop's `shared` and `packed` layouts read it once, and the responses attend to
the prompt and to their own prefix only. So dpop's MFU counts the work it actually does, not the work a
plain layout would do for the same pairs.

The matmul rate is measured in the same run, in its own process, with the same threads: bf16 `torch.matmul`
at this model's shapes for `tokens` rows, each shape repeated and the median taken. MFU divides by the
rate of one decoder layer's matmul mix (q, k, v, o, gate, up, down: total FLOPs / total median time), the
shapes that carry most of a step's FLOPs; the lm-head shape (usually slower) is reported beside it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    attention_width: int  # heads × head_dim
    kv_width: int  # key/value heads × head_dim
    intermediate: int
    vocab: int
    body_params: int  # decoder Linear weights
    head_params: int  # lm head weights

    def to_dict(self) -> dict:
        return asdict(self)


def model_dims(model) -> ModelDims:
    """Dimensions of a Hugging Face causal LM (Llama-style config) and its matmul parameter counts."""
    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    decoder = model.get_decoder()
    body = sum(m.weight.numel() for m in decoder.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    return ModelDims(layers=config.num_hidden_layers, hidden=config.hidden_size,
                     attention_width=config.num_attention_heads * head_dim,
                     kv_width=getattr(config, "num_key_value_heads", config.num_attention_heads) * head_dim,
                     intermediate=config.intermediate_size, vocab=config.vocab_size, body_params=body,
                     head_params=head)


@dataclass
class Work:
    """What a step computes: decoder tokens, lm-head tokens and attended (query, key) pairs."""

    body_tokens: int = 0
    head_tokens: int = 0
    attention_pairs: int = 0

    def add(self, other: "Work") -> "Work":
        return Work(self.body_tokens + other.body_tokens, self.head_tokens + other.head_tokens,
                    self.attention_pairs + other.attention_pairs)


def _causal(n: int) -> int:
    return n * (n + 1) // 2  # token i attends to itself and the i tokens before it


def layout_work(prompt: int, chosen: int, rejected: int, layout: str) -> Work:
    """The work of one pair with these token counts. plain: [prompt|chosen] and [prompt|rejected] rows;
    shared/packed: prompt once, each response attends to the prompt and its own prefix."""
    if layout == "plain":
        return Work(2 * prompt + chosen + rejected, chosen + rejected,
                    _causal(prompt + chosen) + _causal(prompt + rejected))
    if layout in ("shared", "packed"):
        return Work(prompt + chosen + rejected, chosen + rejected,
                    _causal(prompt) + chosen * prompt + _causal(chosen) + rejected * prompt + _causal(rejected))
    raise ValueError(f"no FLOPs rule for layout {layout!r}")


def rows_work(row_lengths, response_tokens: int) -> Work:
    """The work of right-padded causal rows (TRL): real tokens, causal attention within each row."""
    lengths = [int(n) for n in row_lengths]
    return Work(sum(lengths), int(response_tokens), sum(_causal(n) for n in lengths))


def step_flops(dims: ModelDims, work: Work) -> float:
    """Training FLOPs (forward + backward) of `work` on a model of `dims` (the module docstring's formula)."""
    return (6.0 * dims.body_params * work.body_tokens + 6.0 * dims.head_params * work.head_tokens
            + 12.0 * dims.layers * dims.attention_width * work.attention_pairs)


# --- the matmul rate ------------------------------------------------------------------------------------

def layer_shapes(dims: ModelDims) -> dict[str, tuple[int, int]]:
    """(in, out) of each matmul of one decoder layer, and of the lm head."""
    d, a, kv, i = dims.hidden, dims.attention_width, dims.kv_width, dims.intermediate
    return {"q": (d, a), "k": (d, kv), "v": (d, kv), "o": (a, d), "gate": (d, i), "up": (d, i), "down": (i, d),
            "lm_head": (d, dims.vocab)}


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first call allocates and picks kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_matmul(dims: ModelDims, *, tokens: int, repeats: int = 7, dtypes=("bf16", "fp32"),
                   device: str = "cpu") -> dict:
    """Median GFLOP/s of (tokens × in) @ (in × out) for each shape and dtype; 'layer' is one decoder layer's
    mix (q, k, v, o, gate, up, down: their FLOPs over their summed median times). On a GPU each timed call
    waits for the kernel to finish."""
    import torch

    torch.manual_seed(0)
    result = {"tokens": tokens, "repeats": repeats, "device": device}
    wait = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        rates, layer_flops, layer_seconds = {}, 0.0, 0.0
        for shape, (inner, outer) in layer_shapes(dims).items():
            x = torch.randn(tokens, inner, dtype=dtype, device=device)
            w = torch.randn(inner, outer, dtype=dtype, device=device)
            seconds = _median_seconds(lambda: (torch.matmul(x, w), wait()), repeats)
            flops = 2.0 * tokens * inner * outer
            rates[shape] = flops / seconds / 1e9
            if shape != "lm_head":
                layer_flops, layer_seconds = layer_flops + flops, layer_seconds + seconds
        rates["layer"] = layer_flops / layer_seconds / 1e9
        result[name] = rates
    return result
