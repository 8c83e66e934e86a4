"""The demo's report: the accuracy table with 95% intervals, a reading written from the numbers, and the
training plots of every dpo/dpop run (dpop.reporting.report draws those)."""

from __future__ import annotations

import html
import math
from pathlib import Path

from dpop.reporting.report import Section, build_report, load_metrics, wilson_interval

NEAR_ZERO = -0.5  # nats: DPOP "holds" the chosen log-prob when its mean delta stays above this


def _train_trend(run_dir: Path) -> dict:
    rows = [r for r in load_metrics(run_dir) if r.get("split", "train") == "train"]
    def values(key):
        return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    tail = max(1, len(rows) // 5)  # mean of the last fifth of the steps, to smooth batch noise
    out = {}
    for key in ("rewards/margins", "logps/chosen_delta", "logps/rejected", "logps/ref_rejected"):
        series = values(key)
        out[key] = (series[0], sum(series[-tail:]) / len(series[-tail:])) if series else (math.nan, math.nan)
    return out


def _accuracy_table(summary: dict) -> list[list[object]]:
    rows = [["case", "model", "answer accuracy", "correct / n", "95% interval (Wilson)", "pair accuracy",
             "reward accuracy", "chosen Δ (nats)", "margin", "divergent-token logp"]]
    for case, models in summary.items():
        if case == "meta":
            continue
        for name, m in models.items():
            lo, hi = wilson_interval(m["answer_correct"] or 0, m["answer_total"] or 0)
            rows.append([case, name, _fmt(m["answer_accuracy"]), f"{m['answer_correct']} / {m['answer_total']}",
                         f"{lo:.3f} – {hi:.3f}", _fmt(m["pair_accuracy"]), _fmt(m["reward_accuracy"]),
                         _fmt(m["chosen_delta"]), _fmt(m["margin"]), _fmt(m["divergent_chosen_logp"])])
    return rows


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def reading(summary: dict, runs: dict) -> list[str]:
    """Plain sentences from the numbers; a finding that did not reproduce is said to have not reproduced."""
    sentences = []
    for case in ("low", "high"):
        key = f"{case}_edit"
        if key not in summary:
            continue
        dpo, dpop = _train_trend(runs[(case, "dpo")]), _train_trend(runs[(case, "dpop")])
        held_dpo, held_dpop = summary[key]["dpo"], summary[key]["dpop"]
        margin_grew = dpo["rewards/margins"][1] > dpo["rewards/margins"][0]
        fell = held_dpo["chosen_delta"] is not None and held_dpo["chosen_delta"] < 0
        verdict = ("the failure mode reproduced" if (fell and margin_grew) else "the failure mode did NOT reproduce")
        sentences.append(
            f"{case.capitalize()}-edit pairs, DPO: the training margin went from {dpo['rewards/margins'][0]:.3f} to "
            f"{dpo['rewards/margins'][1]:.3f} while the chosen log-prob moved {dpo['logps/chosen_delta'][1]:+.3f} nats "
            f"against the reference (end of training); on held-out pairs chosen Δ = {_fmt(held_dpo['chosen_delta'])} "
            f"nats: {verdict}" + (" (DPO made the preferred answers less likely while separating the pairs)."
                                  if fell and margin_grew else "."))
        held = held_dpop["chosen_delta"]
        kept = held is not None and held >= NEAR_ZERO
        sentences.append(
            f"{case.capitalize()}-edit pairs, DPOP: training margin {dpop['rewards/margins'][1]:.3f}, chosen Δ "
            f"{dpop['logps/chosen_delta'][1]:+.3f} nats at the end of training, {_fmt(held)} on held-out pairs: "
            + ("it kept the preferred answers' likelihood (Δ ≥ −0.5 nats)." if kept else
               "it did NOT keep the preferred answers' likelihood within 0.5 nats."))
        sft_acc = summary[key]["sft"]["answer_accuracy"]
        sentences.append(
            f"{case.capitalize()}-edit answer accuracy: SFT {_fmt(sft_acc)}, DPO {_fmt(held_dpo['answer_accuracy'])}, "
            f"DPOP {_fmt(held_dpop['answer_accuracy'])} (see the intervals: with these counts, differences inside "
            "overlapping intervals are not evidence of a difference).")
    contrast = edit_contrast(summary)
    if contrast:
        sentences.append(contrast)
    return sentences


def edit_contrast(summary: dict) -> str | None:
    """The paper's contrast (DPOP §3): DPO lowers the preferred answer's likelihood most when the two answers
    differ in few tokens. Said plainly either way, from the held-out chosen change of the two DPO runs, summed
    and per token: a summed log-prob grows with the number of differing tokens, which high-edit pairs have more
    of, so the per-token readings (all tokens; those after the first difference, the paper's Fig. 4) decide."""
    if "low_edit" not in summary or "high_edit" not in summary:
        return None
    low, high = summary["low_edit"]["dpo"], summary["high_edit"]["dpo"]
    if low["chosen_delta"] is None or high["chosen_delta"] is None:
        return None
    readings = [("summed", low["chosen_delta"], high["chosen_delta"])]
    for key, name in (("per_token", "per token"), ("divergent_per_token", "per token after the first difference")):
        lo, hi = (low.get("chosen_change") or {}).get(key), (high.get("chosen_change") or {}).get(key)
        if lo is not None and hi is not None:
            readings.append((name, lo, hi))
    said = "; ".join(f"{name} {lo:+.3f} (low-edit) vs {hi:+.3f} (high-edit)" for name, lo, hi in readings)
    deciding = readings[1:] or readings  # the per-token readings when there are any
    held = [lo < hi for _, lo, hi in deciding]
    verdict = ("that contrast reproduced here" if all(held) else
               "that contrast did NOT reproduce here: DPO lowered the preferred answers at least as much on "
               "high-edit pairs" if not any(held) else "the per-token readings disagree, so the contrast is not "
               "settled here")
    basis = " by the per-token readings" if len(readings) > 1 else ""
    return (f"Edit-distance contrast, DPO's held-out chosen log-prob change (nats): {said}. The paper predicts the "
            f"fall is worst at low edit distance; {verdict}{basis}.")


def write_demo_report(out: Path, summary: dict, runs: dict, strips: dict | None = None) -> Path:
    meta = summary.get("meta", {})
    intro = (f"<p>Builtin model smollm2-135m, builtin arithmetic task, seed {meta.get('seed')}, "
             f"{'quick' if meta.get('quick') else 'full'} mode. Policy and reference start from the same SFT "
             "model; dpo and dpop runs share data, seed, batch and learning rate. Held-out problems are never "
             "seen in training.</p>")
    sections = [
        Section("What happened", intro + "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in reading(summary, runs))
                + "</ul>"),
        Section("Held-out evaluation", table=_accuracy_table(summary)),
    ]
    if strips:
        from dpop.reporting.strips import strips_section_html

        sections.append(Section("Tokens that lose", strips_section_html(strips)))
    run_dirs = [runs[key] for key in sorted(runs)]
    return build_report(run_dirs, out, title="dpop demo: DPO vs DPOP on the builtin model", sections=sections)
