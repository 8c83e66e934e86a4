"""Training-curve plots and a self-contained HTML page from run directories (`dpop report`).

Each run directory holds `metrics.jsonl` (DESIGN.md §6: one JSON object per logged step, train rows
with `"split": "train"`, eval rows with `"split": "eval"` and keys prefixed `eval/`), and optionally
`config.yaml` (its `loss` names the run in legends; else the directory name) and `summary.json`.

Plots go to OUT/plots/*.png (see PLOTS in dpop.reporting.plots), the page to OUT/report.html with every
image embedded as a base64 data URI and inline CSS, so the file can be mailed or archived alone.
A plot whose keys no run logged is skipped (and listed as skipped); NaN, infinite, null and missing
values are dropped point by point, never fatal.

Run:
    dpop report runs/dpo runs/dpop --out runs/compare
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpop.errors import DpopError

METRICS_FILE = "metrics.jsonl"
DEFAULT_MULTI_RUN_OUT = "dpop-report"

# Final-value table: (column heading, split, key). Eval keys carry their `eval/` prefix.
FINAL_COLUMNS = (
    ("step", "train", "step"),
    ("pairs seen", "train", "pairs_seen"),
    ("loss", "train", "loss"),
    ("reward acc.", "train", "rewards/accuracies"),
    ("eval reward acc.", "eval", "eval/rewards/accuracies"),
    ("margin", "train", "rewards/margins"),
    ("logp chosen", "train", "logps/chosen"),
    ("logp rejected", "train", "logps/rejected"),
    ("chosen delta", "train", "logps/chosen_delta"),
    ("divergent-token logp", "train", "tokens/divergent_chosen_logp"),
)


@dataclass(frozen=True)
class Section:
    """A block the caller puts before the plots: trusted HTML and/or a table.

    table: rows of cells; the FIRST row is the header. Cells are escaped; floats print with 4
    significant digits. html is inserted as is (the caller writes it), before the table.
    """

    heading: str
    html: str = ""
    table: Sequence[Sequence[object]] = ()


@dataclass(frozen=True)
class Run:
    """One run directory, loaded."""

    path: Path
    label: str
    train: list[dict]
    eval: list[dict]
    summary: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    loss_name: str | None = None  # config.yaml's `loss`, when there is one


# ---------------------------------------------------------------------------------------------
# Loading


def load_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of RUN_DIR/metrics.jsonl, in file order; blank lines are skipped.

    Raises DpopError when the file is missing or a line is not a JSON object (naming the line).
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DpopError(f"{run_dir}: no {METRICS_FILE} (looked for {path}); is this a dpop run directory?")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DpopError(
                    f"{path} line {line_number}: not valid JSON ({error.msg}, column {error.colno}); "
                    "fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise DpopError(f"{path} line {line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def is_eval_row(row: dict) -> bool:
    if "split" in row:
        return row["split"] == "eval"
    return any(str(key).startswith("eval/") for key in row)


def load_run(run_dir: str | Path) -> Run:
    """metrics.jsonl split into train and eval rows, plus the legend label and summary.json."""
    path = Path(run_dir)
    rows = load_metrics(path)
    notes = []
    label = path.resolve().name or str(path)
    loss_name = None
    config_path = path / "config.yaml"
    if config_path.is_file():
        import yaml

        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            config = None
            notes.append(f"{config_path} is not valid YAML ({error.__class__.__name__}); labelled by directory")
        if isinstance(config, dict) and config.get("loss"):
            label = loss_name = str(config["loss"])
    summary: dict = {}
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            loaded = json.loads(summary_path.read_text(encoding="utf-8"))
            summary = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError:
            notes.append(f"{summary_path} is not valid JSON; summary not shown")
    if not rows:
        notes.append(f"{path / METRICS_FILE} has no rows yet")
    return Run(
        path=path,
        label=label,
        train=[row for row in rows if not is_eval_row(row)],
        eval=[row for row in rows if is_eval_row(row)],
        summary=summary,
        notes=tuple(notes),
        loss_name=loss_name,
    )


def _unique_labels(runs: list[Run]) -> list[Run]:
    """Runs sharing a label (two dpo runs) get their directory name appended, or their path."""
    labels = [run.label for run in runs]
    runs = [replace(run, label=f"{run.label} ({run.path.resolve().name})")
            if labels.count(run.label) > 1 and run.label != run.path.resolve().name else run
            for run in runs]
    if len({run.label for run in runs}) < len(runs):
        runs = [replace(run, label=str(run.path)) for run in runs]
    return runs


def number(value) -> float | None:
    """A finite float, or None for anything else (missing, null, NaN, inf, strings)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for the rows where `key` holds a finite number; step falls back to row index."""
    steps, values = [], []
    for index, row in enumerate(rows):
        value = number(row.get(key))
        if value is None:
            continue
        step = number(row.get("step"))
        steps.append(step if step is not None else float(index))
        values.append(value)
    return steps, values


def run_series(run: Run, split: str, key: str) -> tuple[list[float], list[float]]:
    """series() over a run's train or eval rows. Eval keys are `eval/...`; eval rows that carry the
    bare key instead are accepted too."""
    if split == "train":
        return series(run.train, key)
    steps, values = series(run.eval, key)
    if not values and key.startswith("eval/"):
        steps, values = series(run.eval, key.removeprefix("eval/"))
    return steps, values


def last_value(run: Run, split: str, key: str) -> float | None:
    values = run_series(run, split, key)[1]
    return values[-1] if values else None


# ---------------------------------------------------------------------------------------------
# Statistics and watches


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% for z = 1.96).

    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2).
    Unlike p +- z sqrt(p(1-p)/n) it stays inside [0, 1] and is not empty at k = 0 or k = n.
    n = 0 gives (0, 1): no information.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    shrink = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def failure_mode_note(run: Run) -> str | None:
    """DESIGN.md §6's failure-mode watch (dpop.training.monitor.FailureModeWatch), replayed over the logged
    train rows: chosen log-prob falling below the reference while margins rise. None when quiet."""
    from dpop.training.monitor import FailureModeWatch

    watch = FailureModeWatch(run.loss_name or "")
    for row in run.train:
        chosen_delta, margin = number(row.get("logps/chosen_delta")), number(row.get("rewards/margins"))
        step = number(row.get("step"))
        if chosen_delta is not None and margin is not None:
            message = watch.update(int(step) if step is not None else 0, chosen_delta, margin)
            if message:
                return f"{run.label}: {message}"
    return None


# ---------------------------------------------------------------------------------------------
# Writing


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write to a temporary file next to `path`, then rename over it: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with 0o666 honours the umask, so the result has the permissions of a plain open().
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    title: str = "dpop report",
    sections: Sequence[Section] = (),
) -> Path:
    """Plots into OUT/plots/ and OUT/report.html; returns the html path.

    out_dir None: the run directory itself for one run (DESIGN.md §2), else ./dpop-report.
    sections go before the final-value table and the plots, in order.
    """
    from dpop.reporting.plots import render_plots

    if not run_dirs:
        raise DpopError("dpop report needs at least one run directory")
    runs = _unique_labels([load_run(run_dir) for run_dir in run_dirs])
    if out_dir is None:
        out_dir = runs[0].path if len(runs) == 1 else Path(DEFAULT_MULTI_RUN_OUT)
    out_dir = Path(out_dir)
    plots_dir = out_dir / "plots"
    rendered, skipped = render_plots(runs)
    for plot in rendered:
        write_atomic(plots_dir / plot.filename, plot.png)
    for filename in skipped:  # a stale file from an earlier report would now be misleading
        (plots_dir / filename).unlink(missing_ok=True)
    notes = [note for run in runs for note in run.notes]
    notes += [note for run in runs if (note := failure_mode_note(run))]
    page = _render_html(title, runs, list(sections), rendered, skipped, notes)
    return write_atomic(out_dir / "report.html", page)


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.meta { color: #666; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; } .note { color: #8a4b00; }
details { margin: .4em 0; } code { background: #f5f5f5; padding: 0 .2em; }
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}" if math.isfinite(value) else str(value))
    return "—" if value is None else html.escape(str(value))


def html_table(rows: Sequence[Sequence[object]]) -> str:
    """An HTML table from rows of cells; the first row is the header. Cells are escaped."""
    if not rows:
        return ""
    head = "".join(f"<th>{_cell(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def final_values_rows(runs: list[Run]) -> list[list[object]]:
    rows: list[list[object]] = [["run", "directory", "train rows", "eval rows"] + [c[0] for c in FINAL_COLUMNS]]
    for run in runs:
        values = [last_value(run, split, key) for _, split, key in FINAL_COLUMNS]
        values = [int(v) if key in ("step", "pairs_seen") and v is not None else v
                  for v, (_, _, key) in zip(values, FINAL_COLUMNS)]
        rows.append([run.label, str(run.path), len(run.train), len(run.eval)] + values)
    return rows


def _summary_html(run: Run) -> str:
    if not run.summary:
        return ""
    flat: list[list[object]] = [["key", "value"]]
    for key, value in run.summary.items():
        if isinstance(value, dict):
            flat += [[f"{key}/{k}", v if isinstance(v, (int, float, str)) else json.dumps(v)[:200]]
                     for k, v in value.items()]
        else:
            flat.append([key, value if isinstance(value, (int, float, str)) else json.dumps(value)[:200]])
    return f"<details><summary>summary.json of {html.escape(run.label)}</summary>{html_table(flat)}</details>"


def _render_html(title, runs, sections, rendered, skipped, notes) -> str:
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s): '
        + ", ".join(f"<code>{html.escape(str(run.path))}</code>" for run in runs) + "</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>{section.html}{html_table(section.table)}")
    parts.append("<h2>Final values</h2>")
    parts.append("<p>Last logged finite value of each metric (train rows unless marked eval).</p>")
    parts.append(html_table(final_values_rows(runs)))
    parts += [_summary_html(run) for run in runs]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{html.escape(n)}</li>' for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for plot in rendered:
        data = base64.b64encode(plot.png).decode("ascii")
        parts.append(
            f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{html.escape(plot.title)}.</b> {html.escape(plot.caption)}</figcaption></figure>"
        )
    if skipped:
        parts.append("<p class=\"meta\">Not drawn (no run logged their metrics): "
                     + ", ".join(f"<code>{html.escape(name)}</code>" for name in skipped) + "</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
