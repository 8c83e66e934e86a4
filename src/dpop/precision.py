"""Precision: fp32, bf16 autocast over fp32 weights, or bf16-sr (the default where bf16 is fast).

- `fp32`: everything in fp32.
- `bf16`: autocast over fp32 weights. Each matmul rounds its fp32 weight to the nearest bf16 value; the
  optimizer updates the fp32 weights. An update smaller than half a bf16 step changes no rounded value, so
  on weights that lie on the bf16 grid (the builtin model, any model published in bf16) the first tens of
  steps at fine-tuning learning rates change nothing the model computes: a dead zone, which
  `precision/update_ratio` shows and a warning names (dpop.training.monitor.DeadZoneWatch).
- `bf16-sr`: bf16 autocast as above, over fp32 weights that each carry a fixed random offset d within ±½ of
  their bf16 step (added once, at the start of the run, as an integer on the weight's bits). Rounding
  w + d to the nearest bf16 value is rounding w up with probability (w − the bf16 value below) / step:
  stochastic rounding of the fp32 weight w, with a threshold drawn once per element. So every bf16 copy
  that autocast makes is a stochastic rounding of the weights the optimizer updates (the fp32 masters, up
  to the fixed d): a weight that moves by δ moves its bf16 value by a whole step with probability
  δ / step, and the bf16 weights follow the fp32 trajectory in expectation, with no dead zone and no
  amplification. It costs nothing per step and no memory: the rounding is the cast autocast makes anyway.
  Checkpoints and final/ hold the weights with d taken off again (`masters()`); resume adds it back.

Why fixed thresholds and not fresh ones each step (both are unbiased): a fresh draw re-rounds every weight
every step, so each step's log-probs carry new rounding noise; measured on the builtin model (dpo, lr 1e-6,
10 steps), the bf16 weights' total movement was 20x the fp32 weights' after 10 steps with fresh draws and
1.0x with fixed ones (`precision/update_ratio`; docs/performance.md). Fixed thresholds also make the
rounding a function of (seed, parameter name) alone: every process of a multi-process run rounds alike, and
a separately loaded reference model rounds exactly as the policy did (so step-0 rewards are 0).
Own lines rather than torchao's `bf16_stochastic_round` AdamW: that one keeps bf16 parameters (so the
residual stream and the gradients run in bf16 too), needs a second rounding pass after every step and
compiles its step with torch.compile (seconds to minutes on a CPU); this scheme needs none of that.

On CPU, attention runs in fp32 even under autocast (q, k, v are promoted, the output rounded back): PyTorch's
CPU flash-attention kernel is several times slower in bf16 than in fp32 at these sizes, most of all in the
backward pass (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import hashlib

import torch

FP32_ATTENTION = "dpop_sdpa_fp32"
PRECISIONS = ("fp32", "bf16", "bf16-sr")
UPDATE_SAMPLE = 1 << 18  # parameter elements sampled for the precision/* metrics (a few ms a step)
_DITHER_FLOOR = 0x01000000  # |value| bits below this (|value| < 2^-125, zeros) are never dithered
_DITHER_CEILING = 0x7F000000  # nor from this up (|value| >= 2^127, infinities, NaNs)


def uses_bf16(precision: str) -> bool:
    """Whether `precision` computes under bf16 autocast."""
    return precision in ("bf16", "bf16-sr")


def prepare_model(model, precision: str, device: torch.device | str | None = None):
    """Set `model` up for `precision`: bf16 on CPU routes attention through fp32. Returns the model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if uses_bf16(precision) and device.type == "cpu":
        use_fp32_attention(model)
    return model


def use_fp32_attention(model) -> None:
    """Route a model that uses PyTorch's sdpa attention through an fp32 wrapper of it, with sdpa's masks.

    The mask function must be registered under the wrapper's name too: transformers builds no mask at all for
    an attention name its mask registry lacks, so a 2-D padding mask was dropped. Right-padded batches hide
    that (causal attention never looks right), left-padded generation does not: greedy answers of the demo's
    SFT model went from 38/64 right to 22/64 (issue 14's notes)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", FP32_ATTENTION):
        return  # eager or a kernel the user chose: leave it alone

    def fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast(query.device.type, enabled=False):  # autocast would cast sdpa back to bf16
            output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                     attention_mask, **kwargs)
        return output.to(query.dtype), weights

    AttentionInterface.register(FP32_ATTENTION, fp32_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FP32_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FP32_ATTENTION)


@contextlib.contextmanager
def fp32_attention_scope():
    """A block after which transformers' attention and mask registries are as before it: the fp32 sdpa that
    use_fp32_attention registers is removed again if the block added it (models set to it inside the block
    must be restore_sdpa'd before it ends)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    # where each interface's register() puts its functions
    registries = (AttentionInterface._global_mapping, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)
    present = FP32_ATTENTION in registries[0]
    try:
        yield
    finally:
        if not present:
            for registry in registries:
                registry.pop(FP32_ATTENTION, None)


def restore_sdpa(model) -> None:
    """Undo use_fp32_attention before saving, so a saved model names a standard attention implementation."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == FP32_ATTENTION:
        model.set_attn_implementation("sdpa")


# --- rounding -------------------------------------------------------------------------------------------

@torch.no_grad()
def round_to_bf16_grid_(model) -> None:
    """Round every floating-point parameter of `model` to its nearest bf16 value, in place and kept in its
    dtype (buffers such as RoPE's frequencies are computed, not loaded: they stay as they are). Weights dequantised from a GGUF file land on bf16 rounding ties (Q4_1's scales make 8% of the
    builtin model's weights exact ties): under autocast a nudge of any size then flips a tie by a whole bf16
    step in the nudge's direction, and the first updates are amplified tens of times."""
    for tensor in model.parameters():
        if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
            tensor.copy_(tensor.to(torch.bfloat16))


def bf16_tie_fraction(tensor: torch.Tensor) -> float:
    """The fraction of an fp32 tensor's elements exactly halfway between two bf16 values."""
    low_bits = tensor.detach().float().contiguous().view(torch.int32) & 0xFFFF
    return float((low_bits == 0x8000).float().mean()) if tensor.numel() else 0.0


def _thresholds(name: str, numel: int, seed: int, device) -> torch.Tensor:
    """Element-wise offsets of parameter `name` in units of 2^-16 of a bf16 step, int32 in [-32767, 32767]
    (never -32768: an offset of exactly -½ step would make a grid value a rounding tie); a function of
    (seed, name)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2 ** 63), None, generator=generator)  # all 64 bits random (the default range leaves the top 0)
    return words.view(torch.int16)[:numel].to(torch.int32).clamp_(min=-32767)


@torch.no_grad()
def dither_bf16_(tensor: torch.Tensor, offsets: torch.Tensor, *, remove: bool = False) -> None:
    """Add (or, `remove`, take off) `offsets` (from _thresholds) to an fp32 tensor's bits, in place: each value
    moves by offset / 2^16 of its bf16 step, away from zero for a positive offset. Integer arithmetic, so
    removing after adding gives the same bits back. Zeros and values below 2^-125 are left alone (their
    bits have no room below them: an offset would turn them into another sign), and so are values of 2^127
    and more, infinities and NaNs (an offset would carry them into a NaN)."""
    bits = tensor.view(-1).view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    movable = (magnitude >= _DITHER_FLOOR) & (magnitude < _DITHER_CEILING)
    bits.add_(torch.where(movable, -offsets if remove else offsets, 0))


def stochastic_round_bf16(tensor: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`tensor` rounded to bf16 the way bf16-sr's autocast casts round it: dithered, then round to nearest."""
    dithered = tensor.detach().float().clone()
    dither_bf16_(dithered, offsets)
    return dithered.to(torch.bfloat16)


# --- the weights a run trains ---------------------------------------------------------------------------

class TrainedWeights:
    """The trainable parameters, and how much of each optimizer step reaches the weights the forward
    computes with (for fp32 the parameters themselves, under autocast their bf16 casts). `masters()` holds
    the fp32 weights the optimizer trains (for bf16-sr: without the dither) in the parameters for a block."""

    def __init__(self, named_parameters, compute_dtype: torch.dtype = torch.float32, reduce=None):
        # shards (FSDP2) come as their trainable parameters' local tensors, which carry no requires_grad
        self.named = [(name, p) for name, p in named_parameters if p.requires_grad or reduce is not None]
        self.compute_dtype = compute_dtype
        self._sample = _sample_indices([p for _, p in self.named])
        self.reduce = reduce  # sharded weights (FSDP2): the sums over every process's shard (a collective)

    def masters(self):
        return contextlib.nullcontext()

    def release(self) -> None:
        """Leave the master weights in the parameters for good (the run is over)."""

    @torch.no_grad()
    def sample(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(fp32 values, compute values as fp32) of the sampled elements."""
        masters = [_take(p.detach(), index) for (_, p), index in zip(self.named, self._sample)]
        return masters, [value.to(self.compute_dtype).float() for value in masters]

    def update_metrics(self, before) -> dict[str, float]:
        """precision/updated_frac: the sampled fraction of trainable elements whose compute value changed;
        precision/update_ratio: Σ|Δ compute| / Σ|Δ fp32| over the sample (1 where every update reaches the
        model as it computes, ~0 in a dead zone, > 1 where rounding amplifies updates)."""
        masters_before, computes_before = before
        masters_after, computes_after = self.sample()
        sums = torch.tensor([sum(int((a != b).sum()) for a, b in zip(computes_after, computes_before)),
                             sum(t.numel() for t in computes_after),
                             sum(float((a - b).abs().double().sum()) for a, b in zip(computes_after, computes_before)),
                             sum(float((a - b).abs().double().sum()) for a, b in zip(masters_after, masters_before))],
                            dtype=torch.float64)
        if self.reduce is not None:
            sums = self.reduce(sums)
        changed, total, compute_moved, master_moved = sums.tolist()
        return {"precision/updated_frac": changed / total if total else float("nan"),
                "precision/update_ratio": compute_moved / master_moved if master_moved else float("nan")}


class DitheredWeights(TrainedWeights):
    """bf16-sr: each trainable parameter carries its fixed dither from construction on (module docstring)."""

    def __init__(self, named_parameters, seed: int, *, reduce=None, ranges=None, dithered: bool = False):
        """`ranges`: name -> (offset, whole numel) of parameters that are one process's shard of a whole tensor
        (dpop.distributed.fsdp.flat_ranges), dithered as that part of the whole. `dithered`: the parameters
        already carry the dither (they were sharded from dithered whole ones)."""
        super().__init__(named_parameters, torch.bfloat16, reduce)
        self.seed, self.ranges = seed, ranges or {}
        self.dithered = [(name, p) for name, p in self.named if _ditherable(name, p)]
        self.released = False
        if not dithered:
            self._shift(remove=False)

    @contextlib.contextmanager
    def masters(self):
        if self.released:
            yield
            return
        self._shift(remove=True)
        try:
            yield
        finally:
            self._shift(remove=False)

    def release(self) -> None:
        if not self.released:
            self._shift(remove=True)
            self.released = True

    def _shift(self, *, remove: bool) -> None:
        _shift(self.dithered, self.seed, remove=remove, ranges=self.ranges)


def _shift(named, seed: int, *, remove: bool = False, ranges=None) -> None:
    """Add (or take off) each (name, parameter)'s dither, drawn from (seed, name); a shard in `ranges` gets its
    part of the whole tensor's offsets."""
    for name, parameter in named:
        start, whole = (ranges or {}).get(name, (0, parameter.numel()))
        offsets = _thresholds(name, whole, seed, parameter.device)[start:start + parameter.numel()]
        dither_bf16_(parameter.data, offsets, remove=remove)


@torch.no_grad()
def dither_like_policy(model, names, seed: int) -> None:
    """Give a separately loaded reference model the dither the policy's bf16-sr start gave the parameters in
    `names` (the policy's trainable ones), so the same weights compute the same values."""
    _shift(_dithered_like_policy(model, names), seed)


def _dithered_like_policy(model, names) -> list:
    """The (name, parameter)s of `model` that carry the policy's dither: those in `names` that are ditherable."""
    wanted = set(names)
    return [(name, p) for name, p in model.named_parameters() if name in wanted and _ditherable(name, p)]


@contextlib.contextmanager
def reference_masters(model, names, precision: str, seed: int):
    """A block in which a reference that carries the policy's bf16-sr dither (dither_like_policy, or a copy of
    the dithered policy) holds its master weights, to be changed or saved; the dither is put back after."""
    if precision != "bf16-sr":
        yield
        return
    named = _dithered_like_policy(model, names)
    _shift(named, seed, remove=True)
    try:
        yield
    finally:
        _shift(named, seed, remove=False)


@contextlib.contextmanager
def scoring_weights(models, precision: str, seed: int = 0):
    """For a block that scores fixed models under `precision`: with bf16-sr, every model's weights carry the
    dither (the same for the same weights, whichever model holds them) and lose it again afterwards, so each
    bf16 cast is a stochastic rounding of the weights, as in training. Plain round-to-nearest would not do:
    a model fine-tuned from bf16-grid weights moved most weights by less than half a bf16 step, and rounding
    them to nearest gives back the weights it started from (measured: an SFT model's held-out chosen log-prob
    -35.8 nats under plain bf16 scoring against -17.8 in fp32)."""
    if precision != "bf16-sr":
        yield
        return
    seen, dithered = set(), []
    for model in models:
        for name, parameter in model.named_parameters() if model is not None else ():
            if id(parameter) not in seen and _ditherable(name, parameter):
                seen.add(id(parameter))
                dithered.append((name, parameter))
    _shift(dithered, seed)
    try:
        yield
    finally:
        _shift(dithered, seed, remove=True)


def trained_weights(model, precision: str, seed: int) -> TrainedWeights:
    """The TrainedWeights of `model` under `precision`; for bf16-sr this dithers the trainable parameters now."""
    if precision == "bf16-sr":
        return DitheredWeights(model.named_parameters(), seed)
    return TrainedWeights(model.named_parameters(), torch.bfloat16 if precision == "bf16" else torch.float32)


def sharded_weights(named_shards, precision: str, seed: int, *, ranges, reduce) -> TrainedWeights:
    """The TrainedWeights of one process's shards (name, local tensor) of weights `trained_weights` set up
    whole before sharding (so bf16-sr's dither is already in them)."""
    if precision == "bf16-sr":
        return DitheredWeights(named_shards, seed, reduce=reduce, ranges=ranges, dithered=True)
    return TrainedWeights(named_shards, torch.bfloat16 if precision == "bf16" else torch.float32, reduce)


def _ditherable(name: str, parameter: torch.Tensor) -> bool:
    """fp32 parameters except DoRA's magnitudes: DoRA computes with them in fp32 (no bf16 cast to round), and
    at step 0 they must equal the weight norms exactly for the policy to compute what its reference does."""
    return parameter.dtype == torch.float32 and "lora_magnitude_vector" not in name


def _sample_indices(params) -> list[torch.Tensor | None]:
    """For each tensor, the flat indices it contributes to the sample (None: all of it), about UPDATE_SAMPLE in
    all, in proportion to size; fixed for the run (seeded)."""
    total = sum(p.numel() for p in params)
    if total <= UPDATE_SAMPLE:
        return [None] * len(params)
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, p.numel(), (max(1, p.numel() * UPDATE_SAMPLE // total),), generator=generator)
            .to(p.device) for p in params]


def _take(tensor: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return (flat.clone() if index is None else flat.index_select(0, index)).float()
