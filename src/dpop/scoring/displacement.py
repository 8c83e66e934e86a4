"""Where DPO's failure mode comes from, per pair: CHES scores before training, per-token log-probs after.

CHES (Razin et al. 2024, "Unintentional Unalignment", arXiv 2410.08847, §4). With h_{x,y<k} the last layer's
hidden state at the position that predicts the k-th token of response y (the state the lm head reads),
    CHES(x, y_w, y_l) = ⟨Σ_k h_{x,y_w<k}, Σ_k h_{x,y_l<k}⟩ − ‖Σ_k h_{x,y_w<k}‖²
and the length-normalised score is the same with each sum divided by its response's length. Razin et al. relate the
first-order change of log πθ(y_w) under DPO to −CHES: a pair whose two responses have similar summed states
(high CHES) is one whose rejected answer drags the chosen one down with it. Razin et al. report
it ranks displacement-causing pairs better than edit distance; `dpop data doctor --model` prints it and
`--filter-ches q` drops the top q of a training set by it (docs/displacement.md has the measured predictiveness).

    chosen sums (P, H), rejected sums (P, H)  ->  CHES (P,) = (w · l) − (w · w)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dpop.data.tokenize import TokenizedPair
from dpop.scoring.batching import ordered_batches
from dpop.scoring.logprobs import forward_hidden, sequence_logps


def ches_from_states(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """⟨chosen, rejected⟩ − ‖chosen‖² row by row: (P, H), (P, H) -> (P,). Sums give CHES, means its
    length-normalised form."""
    return (chosen * rejected).sum(-1) - (chosen * chosen).sum(-1)


@dataclass(frozen=True)
class ChesScores:
    raw: list[float]  # per pair, in the pairs' order
    normalized: list[float]  # the length-normalised score


@torch.no_grad()
def ches_scores(model, pairs: list[TokenizedPair], *, layout: dict, batch_size: int = 16,
                progress: bool = False) -> ChesScores:
    """CHES and its length-normalised form for each tokenised pair, from the model's last-layer states,
    accumulated in float64. `layout`: collate's arguments (layout, pad_id, pack_length); every layout gives
    the same states for a response, so the default prefix-sharing one encodes each prompt once."""
    device = next(model.parameters()).device
    raw, normalized = [math.nan] * len(pairs), [math.nan] * len(pairs)
    was_training = model.training
    model.eval()
    batches = ordered_batches(pairs, batch_size, **layout)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=math.ceil(len(pairs) / batch_size), desc="CHES", unit="batch")
    try:
        for batch, indices in batches:
            batch = batch.to(device)
            hidden = forward_hidden(model, batch)  # (R, T, H)
            states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.hidden_index).double()  # (M, H)
            sums = states.new_zeros(2 * batch.num_pairs, states.shape[1]).index_add(0, batch.sequence_index, states)
            chosen, rejected = sums[:batch.num_pairs], sums[batch.num_pairs:]  # (P, H) each
            chosen_length = batch.chosen_lengths.to(device).clamp(min=1)[:, None].double()
            rejected_length = batch.rejected_lengths.to(device).clamp(min=1)[:, None].double()
            batch_raw = ches_from_states(chosen, rejected).tolist()
            batch_normalized = ches_from_states(chosen / chosen_length, rejected / rejected_length).tolist()
            for slot, index in enumerate(indices):
                raw[index], normalized[index] = batch_raw[slot], batch_normalized[slot]
    finally:
        model.train(was_training)
    return ChesScores(raw, normalized)


def top_fraction(scores: list[float], fraction: float) -> set[int]:
    """Indices of the round(fraction × n) highest scores (ties: the earlier pair is kept)."""
    count = round(fraction * len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
    return set(ranked[:count])


@dataclass(frozen=True)
class ResponseTokens:
    """One pair's response tokens with their log-probs under a model."""

    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_logps: list[float]  # per chosen token, in order
    rejected_logps: list[float]
    divergence: int  # first response position where chosen and rejected differ

    def chosen_parts(self) -> dict[str, float]:
        return chosen_readings(self.chosen_logps, self.divergence)


READINGS = ("sum", "per_token", "shared_per_token", "divergent_per_token")


def chosen_readings(logps: list[float], divergence: int) -> dict[str, float]:
    """A chosen response's token log-probs read four ways (READINGS): summed; per token; per token over the
    shared tokens before the first difference; per token over the tokens after it (DPOP paper, Fig. 4; the
    differing token itself is in neither). A reading with no token is NaN."""
    before, after = logps[:divergence], logps[divergence + 1:]
    return {"sum": sum(logps), "per_token": _mean(logps), "shared_per_token": _mean(before),
            "divergent_per_token": _mean(after)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


@torch.no_grad()
def response_tokens(model, pairs: list[TokenizedPair], *, layout: dict, batch_size: int = 16,
                    autocast=None) -> list[ResponseTokens]:
    """Every response token's log-prob under `model` (the one log-prob routine, per_token=True), pair by pair."""
    import contextlib

    device = next(model.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for batch, indices in ordered_batches(pairs, batch_size, **layout):
            batch = batch.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                token_logps = sequence_logps(model, batch, per_token=True).token_logps.float().cpu()
            order = torch.argsort(batch.sequence_index.cpu() * 1_000_000 + batch.token_position.cpu())
            sequence, values = batch.sequence_index.cpu()[order], token_logps[order]
            per_sequence = torch.split(values, torch.bincount(sequence, minlength=2 * batch.num_pairs).tolist())
            for slot, index in enumerate(indices):
                pair = pairs[index]
                out.append(ResponseTokens(pair.chosen_ids, pair.rejected_ids, per_sequence[slot].tolist(),
                                          per_sequence[batch.num_pairs + slot].tolist(),
                                          int(batch.divergence[slot])))
    finally:
        model.train(was_training)
    return out
