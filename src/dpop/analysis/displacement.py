"""`dpop data doctor FILE --model M`: the data report, and each pair's likelihood-displacement score (CHES) under
the model that is about to be trained, beside its edit distance; `--out scores.jsonl` keeps them per pair.

How well the scores predict which pairs DPO will push down was measured on the builtin task
(benchmarks/ches_study.py, docs/displacement.md); `dpop data doctor --help` repeats it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DOCTOR_DESCRIPTION = """\
Validate every row, then report counts, token lengths, duplicates, chosen == rejected rows, chosen/rejected
edit distances and advice. With --model M, also each pair's CHES score under M (Razin et al. 2024): from M's
last-layer hidden states over the two responses, <sum h_w, sum h_l> - |sum h_w|^2, raw and length-normalised
(means instead of sums). A high score marks a pair whose rejected answer drags the chosen one down under DPO;
`dpop train --filter-ches Q` drops the top fraction Q by the length-normalised score.

How well it predicts, measured on the builtin task (benchmarks/ches_study.py, docs/displacement.md; 256 pairs,
half low-edit, one DPO epoch from the SFT model, 2 seeds): Spearman rho of each pair's chosen log-prob change
with raw CHES -0.10 and +0.02, with normalised CHES -0.07 and -0.06, with edit distance +0.11 and -0.01. Here
none of them ranks the displaced pairs (DPO lowered nearly every chosen answer); a negative rho is the sign
the paper predicts.
"""


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            out[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson's of the ranks, ties averaged); pairs with a NaN are left out."""
    kept = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(kept) < 2:
        return math.nan
    rx, ry = ranks([a for a, _ in kept]), ranks([b for _, b in kept])
    mean = (len(kept) + 1) / 2
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    spread = math.sqrt(sum((a - mean) ** 2 for a in rx) * sum((b - mean) ** 2 for b in ry))
    return covariance / spread if spread else math.nan


def run_doctor(path, *, model=None, columns=None, split=None, out=None, batch_size: int = 16) -> int:
    """The data report; with `model`, also CHES per pair under it (and `out`, the per-pair scores as JSONL)."""
    from dpop.config import parse_columns
    from dpop.data import load_pairs
    from dpop.data.doctor import examine, format_report
    from dpop.models import load_tokenizer, resolve_model

    loaded = load_pairs(path, columns=parse_columns(columns), split=split)
    tokenizer = load_tokenizer(resolve_model(model))
    report = examine(path, tokenizer=tokenizer, loaded=loaded)
    print(format_report(report))
    if report.labels:
        if model is not None:
            print("CHES: not defined for unpaired rows (it compares a pair's two responses)")
        rows = [{"index": i} for i in range(report.pairs)]
    elif model is None:
        print("CHES: pass --model M (e.g. --model smollm2-135m) to score each pair's likelihood displacement "
              "under the model you will train")
        rows = [{"index": i, "edit_distance": d} for i, d in enumerate(report.edit_distances)]
    else:
        rows = _ches_rows(loaded.pairs, model, tokenizer, report.edit_distances, batch_size)
        print(format_ches(rows, model))
    if out:
        _write_jsonl(rows, Path(out))
        print(f"per-pair scores: {out} ({len(rows)} rows)")
    return 0


def _ches_rows(pairs, model_name, tokenizer, edit_distances, batch_size: int) -> list[dict]:
    import torch

    from dpop.config import TrainConfig
    from dpop.data.tokenize import tokenize_pair, truncate_pair
    from dpop.models import load_model
    from dpop.scoring.displacement import ches_scores

    model, _ = load_model(model_name)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    tokenized, kept = [], []
    for index, pair in enumerate(pairs):  # truncated as training truncates them; a pair training drops is left out
        cut = truncate_pair(tokenize_pair(pair, tokenizer), max_length=TrainConfig.max_length,
                            max_prompt_length=TrainConfig.max_prompt_length, bos_id=tokenizer.bos_token_id)
        if not cut[2]:
            tokenized.append(cut[0])
            kept.append(index)
    layout = {"layout": "shared", "pad_id": tokenizer.pad_token_id, "pack_length": None}
    scores = ches_scores(model, tokenized, layout=layout, batch_size=batch_size, progress=len(tokenized) > 64)
    return [{"index": index, "edit_distance": edit_distances[index], "ches": raw, "ches_normalized": normalized,
             "chosen_tokens": len(pair.chosen_ids), "rejected_tokens": len(pair.rejected_ids)}
            for index, pair, raw, normalized in zip(kept, tokenized, scores.raw, scores.normalized)]


def format_ches(rows: list[dict], model_name) -> str:
    from dpop.data.doctor import percentiles

    lines = [f"CHES under {model_name or 'the builtin model'} ({len(rows)} pairs; higher = the rejected answer's "
             "push-down drags the chosen one more, Razin et al. 2024):"]
    for key, name in (("ches", "raw"), ("ches_normalized", "length-normalised")):
        points = percentiles([r[key] for r in rows], (0, 10, 50, 90, 100))
        lines.append(f"  {name:<18} p0 / p10 / p50 / p90 / max: " + " / ".join(f"{v:.4g}" for v in points.values()))
    edit = [r["edit_distance"] for r in rows]
    lines.append(f"  rank correlation with edit distance: raw {spearman([r['ches'] for r in rows], edit):+.2f}, "
                 f"length-normalised {spearman([r['ches_normalized'] for r in rows], edit):+.2f}")
    top = sorted(rows, key=lambda r: -r["ches_normalized"])[:5]
    lines.append("  highest length-normalised: " + ", ".join(
        f"#{r['index']} ({r['ches_normalized']:.4g}, edit {r['edit_distance']:.2f})" for r in top))
    lines.append("  --filter-ches Q (dpop train) drops the fraction Q of pairs with the highest length-normalised "
                 "score before training")
    return "\n".join(lines)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def token_changes(reference, models: dict, tokenizer, pairs, *, max_length: int = 256,
                  max_prompt_length: int = 128) -> list[dict]:
    """For each PreferencePair: its response tokens, their log-probs under `reference` and each model's change
    against it (name -> per-token list), computed in fp32 (what dpop.reporting.strips draws)."""
    from dpop.data.tokenize import tokenize_pairs
    from dpop.scoring.displacement import response_tokens

    data = tokenize_pairs(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    kept = data.pairs
    layout = {"layout": "shared", "pad_id": tokenizer.pad_token_id, "pack_length": None}
    before = response_tokens(reference, kept, layout=layout)
    after = {name: response_tokens(model, kept, layout=layout) for name, model in models.items()}
    prompts = {pair.source: _prompt_text(pair.prompt) for pair in pairs}
    entries = []
    for index, pair in enumerate(kept):
        entry = {"prompt": prompts.get(pair.source, ""), "divergence": before[index].divergence}
        for side in ("chosen", "rejected"):
            reference_logps = getattr(before[index], f"{side}_logps")
            entry[side] = {"tokens": token_pieces(tokenizer, list(getattr(pair, f"{side}_ids"))),
                           "reference": reference_logps}
            for name in models:
                trained = getattr(after[name][index], f"{side}_logps")
                entry[side][name] = [new - old for new, old in zip(trained, reference_logps)]
        entries.append(entry)
    return entries


def _prompt_text(prompt) -> str:
    """What the user asked: a text prompt, or a conversation's last message."""
    return prompt if isinstance(prompt, str) else str(prompt[-1]["content"]) if prompt else ""


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of the decoded text. Byte-level tokenizers split some characters (×, ÷, accents) over
    tokens, and decoding such a token alone gives U+FFFD: a character is given whole to the token that completes
    it, and the tokens before it in the character get ''."""
    pieces, shown = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if text.endswith("\ufffd") and end < len(ids):
            pieces.append("")
        elif text.startswith(shown):
            pieces.append(text[len(shown):])
            shown = text
        else:  # a decoder that rewrites earlier text (cleanup of spaces): fall back to the token alone
            pieces.append(tokenizer.decode(ids[end - 1:end]))
            shown = text
    return pieces


def mean_chosen_changes(entries: list[dict], model: str) -> dict[str, float | None]:
    """Mean over pairs of each reading's change of the chosen response (scoring.displacement.READINGS) under
    `model` against the reference, from token_changes' entries; None where no pair has the tokens."""
    from dpop.scoring.displacement import READINGS, chosen_readings

    sums, counts = dict.fromkeys(READINGS, 0.0), dict.fromkeys(READINGS, 0)
    for entry in entries:
        reference = entry["chosen"]["reference"]
        trained = [old + change for old, change in zip(reference, entry["chosen"][model])]
        before, after = chosen_readings(reference, entry["divergence"]), chosen_readings(trained, entry["divergence"])
        for reading in READINGS:
            if not math.isnan(before[reading]):
                sums[reading] += after[reading] - before[reading]
                counts[reading] += 1
    return {reading: sums[reading] / counts[reading] if counts[reading] else None for reading in READINGS}
