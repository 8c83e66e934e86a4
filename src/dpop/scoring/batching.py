"""Tokenised pairs -> model-ready batches, in one of three layouts that give the same log-probs.

Every layout reduces to the same description of what to score, so a single log-prob routine serves all:
each response token is named by `hidden_index` (the flat row*T+t position whose hidden state predicts it),
`target_ids` (the token) and `sequence_index` (0..P-1 chosen of pair p, P..2P-1 rejected of pair p).

- "plain":  2P rows, [prompt | chosen] and [prompt | rejected], right-padded, a (R, T) padding mask.
- "shared": prefix sharing. One row per pair, [prompt | chosen | rejected]; the rejected block attends to
            the prompt and to itself but not to the chosen block, and its positions restart after the prompt,
            so it sees exactly what it would see in its own row. The prompt is encoded once. (R, 1, T, T) mask.
- "packed": "shared" blocks of several pairs laid end to end in a row up to `pack_length` tokens
            (padding-free packing); blocks never see each other.

Example, prompt [p0 p1], chosen [c0 c1], rejected [r0] in the shared layout:
    input_ids     p0 p1 c0 c1 r0          positions 0 1 2 3 2
    c0 is predicted by p1's hidden state, c1 by c0's, r0 by p1's (the prompt's last token serves both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpop.data.textdiff import first_difference
from dpop.data.tokenize import TokenizedPair

LAYOUTS = ("plain", "shared", "packed")


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T)
    attention_mask: torch.Tensor  # (R, T) padding mask, or (R, 1, T, T) bool: True = may attend
    hidden_index: torch.Tensor  # (M,) flat index into R*T of the state that predicts each response token
    target_ids: torch.Tensor  # (M,)
    sequence_index: torch.Tensor  # (M,) chosen p -> p, rejected p -> P + p
    token_position: torch.Tensor  # (M,) position of the token inside its response, from 0
    divergence: torch.Tensor  # (P,) first response position where chosen and rejected ids differ
    chosen_lengths: torch.Tensor  # (P,) response tokens scored
    rejected_lengths: torch.Tensor  # (P,)
    num_pairs: int
    num_input_tokens: int  # real (non-pad) tokens the model reads
    with_rejected: bool = True
    desirable: torch.Tensor | None = None  # (P,) bool: unpaired rows' labels (KTO); None for preference pairs

    def to(self, device) -> "PairBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return PairBatch(**moved)


def collate(pairs: list[TokenizedPair], *, layout: str = "plain", pad_id: int = 0, with_rejected: bool = True,
            pack_length: int | None = None) -> PairBatch:
    """Lay out `pairs` for one forward pass. `with_rejected=False` gives prompt+chosen only (SFT)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "plain":
        rows = [[_segment(p, "chosen", i)] for i, p in enumerate(pairs)]
        if with_rejected:
            rows += [[_segment(p, "rejected", i)] for i, p in enumerate(pairs)]
    else:
        blocks = [_segment(p, "both" if with_rejected else "chosen", i) for i, p in enumerate(pairs)]
        rows = [[b] for b in blocks] if layout == "shared" else _pack(blocks, pack_length)
    return _build(rows, pairs, pad_id=pad_id, four_d=layout != "plain", with_rejected=with_rejected)


@dataclass
class _Segment:
    """One pair's tokens in a row: prompt then one or two responses (branch 1 = chosen, 2 = rejected)."""

    pair: int
    ids: list[int]
    positions: list[int]
    branches: list[int]  # 0 prompt, 1 chosen, 2 rejected


def _segment(pair: TokenizedPair, which: str, index: int) -> _Segment:
    prompt = list(pair.prompt_ids)
    ids, positions, branches = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    responses = {"chosen": [(1, pair.chosen_ids)], "rejected": [(2, pair.rejected_ids)],
                 "both": [(1, pair.chosen_ids), (2, pair.rejected_ids)]}[which]
    for branch, response in responses:
        ids += response
        positions += range(len(prompt), len(prompt) + len(response))
        branches += [branch] * len(response)
    return _Segment(index, ids, positions, branches)


def _pack(blocks: list[_Segment], pack_length: int | None) -> list[list[_Segment]]:
    """First-fit-decreasing bin packing of blocks into rows of at most pack_length tokens."""
    limit = max(pack_length or 0, max(len(b.ids) for b in blocks))
    rows: list[list[_Segment]] = []
    room: list[int] = []
    for block in sorted(blocks, key=lambda b: -len(b.ids)):
        for r, free in enumerate(room):
            if len(block.ids) <= free:
                rows[r].append(block)
                room[r] -= len(block.ids)
                break
        else:
            rows.append([block])
            room.append(limit - len(block.ids))
    return rows


def _build(rows: list[list[_Segment]], pairs: list[TokenizedPair], *, pad_id: int, four_d: bool,
           with_rejected: bool) -> PairBatch:
    num_pairs = len(pairs)
    width = max(sum(len(s.ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    block_id = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 = padding
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    hidden_index, target_ids, sequence_index, token_position = [], [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for b, segment in enumerate(row):
            n = len(segment.ids)
            input_ids[r, offset:offset + n] = torch.tensor(segment.ids)
            position_ids[r, offset:offset + n] = torch.tensor(segment.positions)
            block_id[r, offset:offset + n] = b
            branch[r, offset:offset + n] = torch.tensor(segment.branches)
            prompt_len = segment.branches.count(0)
            row_start = r * width + offset  # flat index of the segment's first token
            start = prompt_len  # where the current response begins inside the segment
            for which in (1, 2):
                length = segment.branches.count(which)
                for k in range(length):
                    # token k of a response is predicted by the previous token of its own branch, or by
                    # the prompt's last token for k = 0
                    predictor = prompt_len - 1 if k == 0 else start + k - 1
                    hidden_index.append(row_start + predictor)
                    target_ids.append(segment.ids[start + k])
                    sequence_index.append(segment.pair + (num_pairs if which == 2 else 0))
                    token_position.append(k)
                start += length
            offset += n
    if four_d:
        attention_mask = _block_mask(block_id, branch, position_ids)
    else:
        attention_mask = (block_id >= 0).long()
        position_ids = torch.arange(width).expand(len(rows), width).clone()
    return PairBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
        hidden_index=torch.tensor(hidden_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        sequence_index=torch.tensor(sequence_index, dtype=torch.long),
        token_position=torch.tensor(token_position, dtype=torch.long),
        divergence=torch.tensor([first_difference(p.chosen_ids, p.rejected_ids) for p in pairs]),
        chosen_lengths=torch.tensor([len(p.chosen_ids) for p in pairs]),
        rejected_lengths=torch.tensor([len(p.rejected_ids) if with_rejected else 0 for p in pairs]),
        num_pairs=num_pairs, num_input_tokens=int((block_id >= 0).sum()), with_rejected=with_rejected,
        desirable=(torch.tensor([bool(p.desirable) for p in pairs]) if pairs and pairs[0].desirable is not None
                   else None),
    )


def _block_mask(block_id: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, T, T) bool: query i may attend key j iff same block, j not after i in the row, and j is prompt
    or on i's own branch. Padding attends to itself only, so no softmax row is empty."""
    width = block_id.shape[1]
    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]  # (1, T, T): key j <= query i
    same_block = (block_id[:, :, None] == block_id[:, None, :]) & (block_id[:, :, None] >= 0)
    key_branch, query_branch = branch[:, None, :], branch[:, :, None]
    visible = (key_branch == 0) | (key_branch == query_branch)
    mask = causal & same_block & visible
    mask |= torch.eye(width, dtype=torch.bool)[None]
    return mask[:, None]


def make_batch(pairs: list[TokenizedPair], indices, *, layout: str, pad_id: int, with_rejected: bool = True,
               pack_length: int | None = None) -> PairBatch:
    return collate([pairs[i] for i in indices], layout=layout, pad_id=pad_id, with_rejected=with_rejected,
                   pack_length=pack_length)


def ordered_batches(pairs: list[TokenizedPair], batch_size: int, **layout):
    """Batches in file order (evaluation, and the reference pass of eval data)."""
    for start in range(0, len(pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(pairs))))
        yield make_batch(pairs, indices, **layout), indices
