"""`dpop data doctor FILE`: validate every row, then describe the data and say what it means for training.

The headline number is the normalised character edit distance between chosen and rejected: when pairs
differ in a few characters (the DPOP paper's low-edit-distance regime), DPO tends to LOWER the chosen
answer's likelihood while the margin grows, and dpop is the loss to use. Unpaired rows (KTO) have no edit
distance: the report counts their labels and checks their balance against the KTO paper's recommendation.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

LOW_EDIT = 0.1  # median normalised edit distance below this: the regime where DPO's failure mode shows


@dataclass(frozen=True)
class DoctorReport:
    path: str
    rows_read: int
    pairs: int
    skipped: dict
    conversational: int
    duplicate_pairs: int
    duplicate_prompts: int
    edit_distances: list[float]
    token_lengths: dict  # "prompt"/"chosen"/"rejected" -> list[int]
    dropped_by_tokenizer: dict
    advice: list[str]
    labels: tuple[int, int] | None = None  # unpaired rows: (desirable, undesirable); None for pairs


def _response_text(value) -> str:
    return value if isinstance(value, str) else "".join(m["content"] for m in value)


def _key(value) -> str:
    return value if isinstance(value, str) else repr([(m["role"], m["content"]) for m in value])


def percentiles(values, points=(0, 50, 90, 99, 100)) -> dict[int, float]:
    ordered = sorted(values)
    if not ordered:
        return {}
    return {p: ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] for p in points}


def examine(path, *, tokenizer=None, columns=None, split=None, max_length: int = 1024,
            max_prompt_length: int = 512, loaded=None) -> DoctorReport:
    """Load and validate `path` (raises DataError listing bad rows) and measure it; `loaded`: its LoadedPairs,
    when the caller has read them already."""
    from dpop.data import load_pairs
    from dpop.data.textdiff import normalized_edit_distance
    from dpop.data.tokenize import tokenize_pair, truncate_pair
    from dpop.data.unpaired import label_counts

    loaded = loaded or load_pairs(path, columns=columns, split=split)
    pairs = loaded.pairs
    unpaired = bool(pairs) and pairs[0].unpaired  # a row's `rejected` is then its KL completion, not data
    triples = Counter((_key(p.prompt), _key(p.chosen), p.desirable if unpaired else _key(p.rejected)) for p in pairs)
    prompts = Counter(_key(p.prompt) for p in pairs)
    distances = [] if unpaired else [normalized_edit_distance(_response_text(p.chosen), _response_text(p.rejected))
                                     for p in pairs]
    lengths = {"prompt": [], "completion": []} if unpaired else {"prompt": [], "chosen": [], "rejected": []}
    dropped = Counter()
    if tokenizer is not None:
        for pair in pairs:
            tokenized = tokenize_pair(pair, tokenizer)
            lengths["prompt"].append(len(tokenized.prompt_ids))
            lengths["completion" if unpaired else "chosen"].append(len(tokenized.chosen_ids))
            if not unpaired:
                lengths["rejected"].append(len(tokenized.rejected_ids))
            _, _, reason = truncate_pair(tokenized, max_length=max_length, max_prompt_length=max_prompt_length,
                                         bos_id=tokenizer.bos_token_id)
            if reason:
                dropped[reason] += 1
    report = DoctorReport(
        path=str(path), rows_read=loaded.rows_read, pairs=len(pairs), skipped=dict(loaded.skipped),
        conversational=sum(p.conversational for p in pairs),
        duplicate_pairs=sum(n - 1 for n in triples.values() if n > 1),
        duplicate_prompts=sum(n - 1 for n in prompts.values() if n > 1),
        edit_distances=distances, token_lengths=lengths, dropped_by_tokenizer=dict(dropped), advice=[],
        labels=label_counts(pairs) if unpaired else None)
    return _with_advice(report, max_length)


def _with_advice(report: DoctorReport, max_length: int) -> DoctorReport:
    advice = []
    if report.labels:
        desirable, undesirable = report.labels
        ratio = desirable / undesirable if undesirable else float("inf")
        balance = ("within" if 1 <= ratio <= 4 / 3 else "outside") + " the KTO paper's [1, 4/3] at unit weights"
        advice.append(f"Unpaired rows ({desirable} desirable, {undesirable} undesirable; ratio {ratio:.3g}, "
                      f"{balance}): train them with --loss kto, balancing with --desirable-weight / "
                      "--undesirable-weight.")
    if report.edit_distances:
        median = statistics.median(report.edit_distances)
        low_share = sum(d < LOW_EDIT for d in report.edit_distances) / len(report.edit_distances)
        if median < LOW_EDIT:
            advice.append(f"Low edit distance (median {median:.3f}, {low_share:.0%} of pairs below {LOW_EDIT}): "
                          "DPO is likely to LOWER the chosen answers' likelihood while the margin grows "
                          "(Pal et al. 2024). Prefer --loss dpop (the default), and watch logps/chosen_delta.")
        else:
            advice.append(f"Edit distance median {median:.3f}: pairs differ substantially; dpo and dpop both "
                          f"apply ({low_share:.0%} of pairs are below {LOW_EDIT}).")
    if report.duplicate_pairs:
        advice.append(f"{report.duplicate_pairs} duplicated pair(s): they weigh more in training; deduplicate "
                      "unless that is intended.")
    if report.skipped:
        advice.append("Skipped rows: " + ", ".join(f"{n} {reason}" for reason, n in report.skipped.items())
                      + " (they carry no preference and are left out of training).")
    if report.dropped_by_tokenizer:
        advice.append("At max_length " + str(max_length) + ", training would drop: " + ", ".join(
            f"{n} ({reason})" for reason, n in report.dropped_by_tokenizer.items())
            + "; raise --max-length or shorten the prompts.")
    chosen = report.token_lengths.get("chosen") or report.token_lengths.get("completion") or []
    if chosen and percentiles(chosen)[99] > max_length // 2:
        advice.append(f"Long responses (p99 {percentiles(chosen)[99]} tokens): the shared/packed layouts "
                      "and bf16 keep memory in check.")
    return DoctorReport(**{**report.__dict__, "advice": advice})


def format_report(report: DoctorReport) -> str:
    kind = (f"unpaired rows ({report.labels[0]} desirable, {report.labels[1]} undesirable)" if report.labels
            else "pairs")
    lines = [f"{report.path}: {report.rows_read} rows read, {report.pairs} {kind} "
             f"({report.conversational} conversational), all rows valid"]
    if report.skipped:
        lines.append("skipped: " + ", ".join(f"{reason}: {n}" for reason, n in report.skipped.items()))
    else:
        lines.append("skipped: none" + ("" if report.labels else " (no chosen == rejected rows)"))
    lines.append(f"duplicates: {report.duplicate_pairs} identical {'rows' if report.labels else 'pairs'}, "
                 f"{report.duplicate_prompts} repeated prompts")
    if report.token_lengths.get("prompt"):
        lines.append("token lengths (p0 / p50 / p90 / p99 / max):")
        for part, values in report.token_lengths.items():
            lines.append(f"  {part:<11}" + " / ".join(str(v) for v in percentiles(values).values()))
    if report.edit_distances:
        points = percentiles(report.edit_distances, (0, 10, 50, 90, 100))
        lines.append("chosen vs rejected normalised edit distance (p0 / p10 / p50 / p90 / max): "
                     + " / ".join(f"{v:.3f}" for v in points.values()))
        lines.append("  histogram: " + _histogram(report.edit_distances))
    lines.append("advice:")
    lines += [f"  - {a}" for a in report.advice] or ["  - none"]
    return "\n".join(lines)


def _histogram(values, edges=(0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0001)) -> str:
    counts = [sum(lo <= v < hi for v in values) for lo, hi in zip(edges, edges[1:])]
    labels = [f"[{lo:.2f},{min(hi, 1.0):.2f}{']' if hi > 1 else ')'}" for lo, hi in zip(edges, edges[1:])]
    return "  ".join(f"{label} {count}" for label, count in zip(labels, counts))
