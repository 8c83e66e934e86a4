"""`dpop iterate`'s report: answer accuracy per iteration with 95% intervals (a table and a plot), what each
iteration sampled and paired, and every iteration's training curves (chosen and rejected log-probs among them)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from dpop.reporting.report import Section, build_report, write_atomic


def _entries(summary: dict) -> list[tuple[str, dict]]:
    return [("M_0", summary["initial"])] + [(f"M_{r['iteration']}", r) for r in summary["iterations"]]


def _table(summary: dict) -> list[list[object]]:
    rows = [["model", "pairs", "prompts skipped (all right / all wrong)", "sample accuracy", "samples/s",
             "tokens/s", "answer accuracy", "correct / n", "95% interval (Wilson)"]]
    for name, record in _entries(summary):
        accuracy = record.get("answer_accuracy")
        interval = (f"{record['interval_95'][0]:.3f} – {record['interval_95'][1]:.3f}" if accuracy is not None
                    else "n/a")
        skipped = (f"{record['skipped_prompts']} ({record['all_correct_prompts']} / {record['all_wrong_prompts']})"
                   if "skipped_prompts" in record else "")
        rows.append([name, record.get("pairs", ""), skipped, record.get("sample_accuracy", ""),
                     record.get("samples_per_s", ""), record.get("tokens_per_s", ""),
                     accuracy if accuracy is not None else "n/a",
                     f"{record.get('answer_correct')} / {record.get('answer_total')}", interval])
    return rows


def _accuracy_plot(summary: dict) -> str:
    """An <img> of accuracy per iteration with its interval as error bars; "" when nothing was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(i, r) for i, (_, r) in enumerate(_entries(summary)) if r.get("answer_accuracy") is not None]
    if not points:
        return ""
    xs = [i for i, _ in points]
    ys = [r["answer_accuracy"] for _, r in points]
    errors = [[y - r["interval_95"][0] for y, (_, r) in zip(ys, points)],
              [r["interval_95"][1] - y for y, (_, r) in zip(ys, points)]]
    figure, axes = plt.subplots(figsize=(6, 3.4), dpi=110)
    axes.errorbar(xs, ys, yerr=errors, fmt="o-", capsize=4, color="#1f77b4")
    axes.set_xticks(xs, [f"M_{i}" for i in xs])
    axes.set_ylabel("held-out answer accuracy")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.set_title("answer accuracy per iteration (95% Wilson intervals)")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f'<figure><img alt="accuracy per iteration" src="data:image/png;base64,{encoded}"></figure>'


def write_iterate_report(out: Path, summary: dict) -> Path:
    """OUT/report.html; the training plots come from OUT/iter-t/train of every iteration that trained."""
    intro = (f"<p>M_0: <code>{html.escape(str(summary['initial'].get('model')))}</code>. Each iteration samples "
             "answers from the current model, marks them, trains the next model on (correct, incorrect) pairs "
             "with the current model as the reference, and scores greedy answers to held-out problems.</p>")
    sections = [Section("Answer accuracy per iteration", intro + _accuracy_plot(summary), table=_table(summary))]
    runs = [out / f"iter-{r['iteration']}" / "train" for r in summary["iterations"]
            if (out / f"iter-{r['iteration']}" / "train" / "metrics.jsonl").exists()]
    if runs:
        return build_report(runs, out, title="dpop iterate", sections=sections)
    table = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
                    for row in _table(summary))
    return write_atomic(out / "report.html", f"<!doctype html><meta charset='utf-8'><title>dpop iterate</title>"
                                             f"<h1>dpop iterate</h1>{sections[0].html}<table>{table}</table>"
                                             "<p>No iteration trained (no pairs).</p>")
