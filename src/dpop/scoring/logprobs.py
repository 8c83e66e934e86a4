"""The one forward pass and the one log-prob routine, shared by train, sft, eval and the reference pass.

The (tokens x vocab) logits never exist whole: the model's backbone gives hidden states, only the states
that predict response tokens are gathered, and the lm head + log_softmax run over them in chunks. For a plain
linear head a custom autograd function keeps only each chunk's log-sum-exp and recomputes the chunk's logits
in backward; other heads are checkpointed per chunk. Either way the bound holds in backward too. The
softmax always runs in fp32, also under bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from dpop.config import TrainConfig
from dpop.scoring.batching import PairBatch

DEFAULT_CHUNK_TOKENS = TrainConfig.chunk_tokens  # the config is its one home


@dataclass
class SequenceLogps:
    """Per-pair log-prob sums over response tokens, and the divergence-aware quantities (DPOP paper §3)."""

    chosen: torch.Tensor  # (P,) sum of log πθ(y_w | x) over chosen tokens
    rejected: torch.Tensor  # (P,)
    chosen_lengths: torch.Tensor  # (P,) token counts
    rejected_lengths: torch.Tensor  # (P,)
    divergent_chosen_sum: torch.Tensor  # (P,) sum of chosen token log-probs AFTER the first differing token
    divergent_chosen_count: torch.Tensor  # (P,) how many such tokens
    shared_prefix: torch.Tensor  # (P,) log-prob of the response prefix chosen and rejected share
    token_logps: torch.Tensor | None = None  # (M,) per token, ordered as the batch's target_ids
    chosen_weights: torch.Tensor | None = None  # (P,) WPO's weights (sequence_logps(wpo=True)), detached
    rejected_weights: torch.Tensor | None = None
    chosen_kl: torch.Tensor | None = None  # (P,) Σ_t KL(πref ‖ πθ) over y_w's tokens (sequence_logps(kl_target=...))
    rejected_kl: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # (M, H) the states that predict response tokens (keep_hidden), detached
    head: torch.nn.Module | None = None  # the lm head that reads them
    desirable: torch.Tensor | None = None  # (P,) bool: unpaired rows' labels (KTO; chosen = the completion)

    def divergent_chosen_mean(self) -> torch.Tensor:
        """Mean per-token log-prob of y_w after the first token where y_w and y_l differ (DPOP Fig. 4);
        NaN for a pair with no such token."""
        count = self.divergent_chosen_count.to(self.divergent_chosen_sum.dtype)
        return self.divergent_chosen_sum / count.where(count > 0, torch.nan)


def backbone_and_head(model):
    """(decoder stack that returns hidden states, lm head module) of a causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder(), inner.get_output_embeddings()


def _finish_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """Apply the output scaling some architectures do after the lm head (Cohere, Granite, Gemma 2/3)."""
    logits = logits.float()
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_token_logps(hidden: torch.Tensor, targets: torch.Tensor, head, config) -> torch.Tensor:
    logits = _finish_logits(head(hidden), config)  # (C, V) fp32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (C,)


# Rows of (rows x vocab) fp32 work the fused head does at a time: 8 MiB x (vocab / 16k) bytes, 24 MiB at
# SmolLM2's 49k vocab. glibc serves blocks under 32 MiB from its heap and reuses them; larger ones are mmapped
# and page-faulted in, zero-filled, on every use. With whole-chunk fp32 logits (1024 x 49k: 200 MB, several
# per step) that was a large part of a step's system time.
_SUB_ROWS = 128


class _LinearTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[target] for one chunk, with a hand-written backward.

    Forward keeps only the log-sum-exp (C,), never the (C, V) logits. Backward recomputes the logits once and
    uses d logp / d logits = onehot(target) - softmax(logits), so neither log_softmax's output, nor its
    backward, nor gather's (C, V) zero-filled gradient ever exists: on the builtin model that was ~15% of a
    training step (docs/performance.md). Matmuls run in the forward's autocast dtype (if any), softmax in fp32,
    _SUB_ROWS rows at a time; the weight is cast once per pass.

    Under bf16 the matmul's output is rounded to bf16 (CPU matmuls have no fp32-output form for bf16 inputs):
    at SmolLM2's logits (10–30) that is up to 1/16 nat per logit. The target's logit, the one term a
    log-prob takes whole, is therefore recomputed in fp32 from the same bf16 inputs (one dot product per
    token) and put in place of its rounded value, in forward and in backward's softmax alike. On the builtin
    model that cut the rms error of bf16's summed response log-probs against fp32's from 0.33 to 0.29 nats
    (0.26 with all logits in fp32, which would cost a matmul at a quarter of the bf16 rate; docs/performance.md).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        device = hidden.device.type
        ctx.compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        dtype = ctx.compute_dtype or hidden.dtype
        target_logits = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        log_normalizer = torch.empty_like(target_logits)
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], _SUB_ROWS):
                rows = slice(start, start + _SUB_ROWS)
                h = hidden[rows].to(dtype)
                logits = (h @ w.T).float()  # (S, V) fp32
                if dtype != torch.float32:
                    _exact_targets_(logits, h, w, targets[rows])
                log_normalizer[rows] = torch.logsumexp(logits, dim=-1)
                target_logits[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets, log_normalizer)
        return target_logits - log_normalizer

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, targets, log_normalizer = ctx.saved_tensors
        dtype = ctx.compute_dtype or hidden.dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w, h = weight.to(dtype), hidden.to(dtype)
            grad_logits = h.new_empty(h.shape[0], w.shape[0])  # (C, V) in the matmul dtype
            for start in range(0, h.shape[0], _SUB_ROWS):
                rows = slice(start, start + _SUB_ROWS)
                g = grad_output[rows, None].float()
                logits = (h[rows] @ w.T).float()
                if dtype != torch.float32:
                    _exact_targets_(logits, h[rows], w, targets[rows])
                logits.sub_(log_normalizer[rows, None]).exp_().mul_(-g)  # -g·softmax
                logits.scatter_add_(-1, targets[rows, None], g)  # + g·onehot
                grad_logits[rows] = logits
            grad_hidden = (grad_logits @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (grad_logits.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


def _exact_targets_(logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Overwrite each row's target logit in fp32 `logits` with hidden · weight[target] summed in fp32."""
    exact = (hidden.float() * weight[targets].float()).sum(-1, keepdim=True)
    logits.scatter_(-1, targets[:, None], exact)


def _fused_head(head, config) -> bool:
    """The fused path covers a bias-free nn.Linear head with no output transform (Llama, Qwen, Mistral...);
    anything else (LoRA on the head, logit scaling or soft-capping) takes the checkpointed generic path."""
    transforms = ("logit_scale", "logits_scaling", "final_logit_softcapping")
    return (type(head) is torch.nn.Linear and head.bias is None
            and not any(getattr(config, name, None) for name in transforms))


def token_logps_chunked(hidden: torch.Tensor, targets: torch.Tensor, head, config,
                        chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log p(target | hidden) for (M, H) states, chunk by chunk; (M,) fp32."""
    pieces = []
    fused = _fused_head(head, config)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if fused:
            pieces.append(_LinearTokenLogps.apply(h, head.weight, t))
        elif recompute:
            pieces.append(checkpoint(_chunk_token_logps, h, t, head, config, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logps(h, t, head, config))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def forward_hidden(model, batch: PairBatch) -> torch.Tensor:
    """Run the decoder stack on a batch in any layout; returns (R, T, H) hidden states."""
    backbone, _ = backbone_and_head(model)
    output = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False)
    return output.last_hidden_state


def sequence_logps(model, batch: PairBatch, *, per_token: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   ld_alpha: float | None = None, wpo: bool = False, keep_hidden: bool = False,
                   kl_target: SequenceLogps | None = None) -> SequenceLogps:
    """Sums of response-token log-probs per chosen/rejected sequence, token counts and the divergence
    quantities, from one forward pass over `batch`. `ld_alpha`: LD-DPO's weighting (reduce_token_logps);
    `wpo`: also WPO's per-sequence weights (wpo_weights); `keep_hidden`: keep the response states and the head
    (a reference's, for TDPO); `kl_target`: such a reference's SequenceLogps of the same batch, to sum the token
    KLs KL(πref ‖ πθ) over each response (sequence_kl)."""
    _, head = backbone_and_head(model)
    hidden = forward_hidden(model, batch)  # (R, T, H)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (R*T, H)
    selected = flat.index_select(0, batch.hidden_index)  # (M, H): only the states that predict responses
    token_logps = token_logps_chunked(selected, batch.target_ids, head, model.config, chunk_tokens)  # (M,)
    logps = reduce_token_logps(token_logps, batch, keep_tokens=per_token, ld_alpha=ld_alpha)
    if wpo:
        logps.chosen_weights, logps.rejected_weights = wpo_weights(
            token_logps, token_log_sum_sq(selected, head, model.config, chunk_tokens), batch)
    if keep_hidden:
        logps.hidden, logps.head = selected.detach(), head
    if kl_target is not None:
        token_kl = token_kl_chunked(selected, head, kl_target.hidden, kl_target.head, model.config, chunk_tokens)
        sums = token_kl.new_zeros(2 * batch.num_pairs).index_add(0, batch.sequence_index, token_kl)
        logps.chosen_kl, logps.rejected_kl = sums[:batch.num_pairs], sums[batch.num_pairs:]
    return logps


def _chunk_kl(hidden, ref_hidden, head, ref_head, config) -> torch.Tensor:
    log_p = torch.log_softmax(_finish_logits(head(hidden), config), dim=-1)  # (C, V) fp32, the policy's
    with torch.no_grad():
        log_q = torch.log_softmax(_finish_logits(ref_head(ref_hidden), config), dim=-1)  # the reference's
    return (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q ‖ p) per token


def token_kl_chunked(hidden, head, ref_hidden, ref_head, config, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """KL(πref(·|s) ‖ πθ(·|s)) over the full vocabulary for each of the (M, H) states, (M,) fp32, chunk by chunk;
    with a gradient the chunk is recomputed in backward (checkpoint), so no (M, V) tensor is kept."""
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        if recompute:
            pieces.append(checkpoint(_chunk_kl, hidden[rows], ref_hidden[rows], head, ref_head, config,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_kl(hidden[rows], ref_hidden[rows], head, ref_head, config))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@torch.no_grad()
def token_log_sum_sq(hidden: torch.Tensor, head, config, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """log Σ_v p(v | hidden)² per state, (M,) fp32, without a gradient: a second pass of the head over the
    states, _SUB_ROWS at a time (what WPO's calibration needs; only runs with use_weighting)."""
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], _SUB_ROWS):
        rows = slice(start, start + _SUB_ROWS)
        logits = _finish_logits(head(hidden[rows]), config)  # (S, V) fp32
        out[rows] = torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)
    return out


def wpo_weights(token_logps: torch.Tensor, log_sum_sq: torch.Tensor, batch: PairBatch) -> tuple:
    """WPO (Zhou et al. 2024, eq. 2, with TRL's calibration): a sequence's weight is exp of the mean over its tokens
    of log p(y_t) − log Σ_v p(v)², the probability of the response under the current policy relative to a
    token drawn from the policy itself; detached. (chosen weights (P,), rejected weights (P,))."""
    num_pairs = batch.num_pairs
    aligned = (token_logps.detach() - log_sum_sq).float()
    sums = aligned.new_zeros(2 * num_pairs).index_add(0, batch.sequence_index, aligned)
    lengths = torch.cat([batch.chosen_lengths, batch.rejected_lengths]).to(sums.device).clamp(min=1)
    weights = torch.exp(sums / lengths)
    return weights[:num_pairs], weights[num_pairs:]


def reduce_token_logps(token_logps: torch.Tensor, batch: PairBatch, *, keep_tokens: bool = False,
                       ld_alpha: float | None = None) -> SequenceLogps:
    """Per-token log-probs (ordered as batch.target_ids) -> per-sequence sums and divergence quantities.

    `ld_alpha` (LD-DPO, Liu et al. 2024, "Length Desensitization"): in the sums, the tokens of the longer
    response past the shorter one's length count α times, so both sums weigh the shared length fully and a
    long tail only by α (None = 1, plain sums). The divergence quantities stay unweighted."""
    num_pairs = batch.num_pairs
    is_chosen = batch.sequence_index < num_pairs
    pair = batch.sequence_index % num_pairs
    summed = token_logps
    if ld_alpha is not None and batch.with_rejected:
        shared = torch.minimum(batch.chosen_lengths, batch.rejected_lengths).to(batch.token_position.device)
        summed = token_logps * torch.where(batch.token_position >= shared[pair], ld_alpha, 1.0).to(token_logps.dtype)
    sums = token_logps.new_zeros(2 * num_pairs).index_add(0, batch.sequence_index, summed)
    # DPOP paper, Figure 4: the tokens after the first differing one (the differing token itself is neither)
    after_divergence = is_chosen & (batch.token_position > batch.divergence[pair])
    before_divergence = is_chosen & (batch.token_position < batch.divergence[pair])
    zeros = token_logps.new_zeros(num_pairs)
    divergent_sum = zeros.index_add(0, pair, token_logps * after_divergence)
    divergent_count = token_logps.new_zeros(num_pairs, dtype=torch.long).index_add(0, pair, after_divergence.long())
    shared_prefix = zeros.index_add(0, pair, token_logps * before_divergence)
    # a batch laid out without rejected responses (a loss that ignores them, sft) has no rejected log-prob
    rejected = sums[num_pairs:] if batch.with_rejected else torch.full_like(sums[num_pairs:], math.nan)
    return SequenceLogps(
        chosen=sums[:num_pairs], rejected=rejected,
        chosen_lengths=batch.chosen_lengths, rejected_lengths=batch.rejected_lengths,
        divergent_chosen_sum=divergent_sum, divergent_chosen_count=divergent_count,
        shared_prefix=shared_prefix, token_logps=token_logps if keep_tokens else None, desirable=batch.desirable,
    )


class PolicyScorer(torch.nn.Module):
    """dpop.scoring.logprobs.sequence_logps as a module's forward: what accelerate.prepare wraps. The log-prob routine
    calls the decoder stack and the lm head directly, so wrapping the causal LM itself would bypass the engine
    (DDP's gradient hooks, FSDP's parameter gathering); through this module's forward they see every call."""

    def __init__(self, model: torch.nn.Module, chunk_tokens: int, ld_alpha: float | None = None, wpo: bool = False):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.ld_alpha, self.wpo = ld_alpha, wpo
        # FSDP's transformer auto-wrap reads the wrapped module's _no_split_modules (the decoder layer class)
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch, kl_target=None):
        return sequence_logps(self.model, batch, chunk_tokens=self.chunk_tokens, ld_alpha=self.ld_alpha, wpo=self.wpo,
                              kl_target=kl_target)
