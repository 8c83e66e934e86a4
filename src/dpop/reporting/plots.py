"""The report's training-curve figures (PNG bytes), drawn with matplotlib's Agg canvas.

One colour per run throughout; within a panel the line style says which metric it is (the seed's
figure: chosen solid, rejected dashed). Eval curves are dotted with markers.

Smoothing: a train series with more than SMOOTH_MIN_POINTS finite points is drawn faint as logged,
with a centred moving average over ~5% of its points (odd window >= 3, shrinking at the ends) drawn
bold on top. Shorter series and every eval series are drawn as logged.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from dpop.reporting.report import Run, run_series

DPI = 110
SMOOTH_MIN_POINTS = 30
SMOOTH_FRACTION = 0.05


@dataclass(frozen=True)
class Line:
    key: str  # metrics.jsonl key; eval keys carry their `eval/` prefix
    split: str  # "train" | "eval"
    style: str  # matplotlib line style
    name: str  # what the style means, for the legend


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    lines: tuple[Line, ...]
    zero_line: bool = False


@dataclass(frozen=True)
class PlotSpec:
    filename: str
    title: str
    caption: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class RenderedPlot:
    filename: str
    title: str
    caption: str
    png: bytes


def _train_and_eval(key: str, name: str) -> tuple[Line, ...]:
    return (Line(key, "train", "-", f"{name} (train)"), Line(f"eval/{key}", "eval", ":", f"{name} (eval)"))


PLOTS = (
    PlotSpec(
        "logps.png",
        "Chosen and rejected log-probs",
        "Left: summed response log-probs under the policy, chosen solid and rejected dashed, one colour "
        "per run. Right: logps/chosen_delta = log πθ(y_w|x) − log πref(y_w|x); below the zero line the "
        "chosen response has become less likely than under the reference (DPO's failure mode).",
        (
            Panel("log-probs over training", "log π(y | x) (sum over response tokens)",
                  (Line("logps/chosen", "train", "-", "chosen"), Line("logps/rejected", "train", "--", "rejected"))),
            Panel("chosen log-prob relative to the reference", "logps/chosen_delta",
                  (Line("logps/chosen_delta", "train", "-", "chosen delta"),), zero_line=True),
        ),
    ),
    PlotSpec("margins.png", "Reward margins",
             "rewards/margins = β·(chosen delta − rejected delta): the implicit reward gap the loss widens.",
             (Panel("reward margin", "rewards/margins", _train_and_eval("rewards/margins", "margin"), True),)),
    PlotSpec("accuracies.png", "Reward accuracies",
             "Fraction of pairs whose implicit chosen reward exceeds the rejected one; eval dotted with markers.",
             (Panel("reward accuracy", "rewards/accuracies", _train_and_eval("rewards/accuracies", "accuracy")),)),
    PlotSpec("loss.png", "Loss", "The training objective (eval dotted with markers where logged).",
             (Panel("loss", "loss", _train_and_eval("loss", "loss")),)),
    PlotSpec("divergent_logp.png", "Log-prob of the chosen tokens after the first divergent token",
             "tokens/divergent_chosen_logp: mean per-token log-prob of y_w after the first token where y_w "
             "and y_l differ (the DPOP paper's Figure 4 quantity).",
             (Panel("chosen tokens after the divergence", "tokens/divergent_chosen_logp",
                    _train_and_eval("tokens/divergent_chosen_logp", "divergent-token logp")),)),
)


def smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~SMOOTH_FRACTION of the points; the window shrinks at the ends."""
    half = max(1, int(len(values) * SMOOTH_FRACTION) // 2)
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    result = []
    for i in range(len(values)):
        low, high = max(0, i - half), min(len(values), i + half + 1)
        result.append((prefix[high] - prefix[low]) / (high - low))
    return result


def _has_data(runs: list[Run], panel: Panel) -> bool:
    return any(run_series(run, line.split, line.key)[1] for run in runs for line in panel.lines)


def render_plots(runs: list[Run]) -> tuple[list[RenderedPlot], list[str]]:
    """Draw every plot some run has data for. Returns (rendered plots, skipped file names)."""
    rendered, skipped = [], []
    for spec in PLOTS:
        panels = [panel for panel in spec.panels if _has_data(runs, panel)]
        if not panels:
            skipped.append(spec.filename)
            continue
        rendered.append(RenderedPlot(spec.filename, spec.title, spec.caption, _draw(runs, panels)))
    return rendered, skipped


def _draw(runs: list[Run], panels: list[Panel]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(6.2 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    colours = [f"C{index % 10}" for index in range(len(runs))]
    for axes, panel in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        drawn: dict[str, Line] = {}
        for run, colour in zip(runs, colours):
            for line in panel.lines:
                steps, values = run_series(run, line.split, line.key)
                if not values:
                    continue
                drawn[line.name] = line
                _draw_series(axes, steps, values, colour, line)
        if panel.zero_line:
            axes.axhline(0.0, color="k", linewidth=0.9)
        handles = [Line2D([], [], color=colour, linewidth=2, label=run.label) for run, colour in zip(runs, colours)]
        if len(drawn) > 1:  # the style key: which line style is which metric
            handles += [Line2D([], [], color="0.35", linestyle=line.style, label=name,
                               marker="o" if line.split == "eval" else None, markersize=3.5)
                        for name, line in drawn.items()]
        axes.legend(handles=handles, fontsize=8, loc="best")
        axes.set_title(panel.title, fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(panel.ylabel)
        axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _draw_series(axes, steps: list[float], values: list[float], colour: str, line: Line) -> None:
    if line.split == "eval":
        axes.plot(steps, values, color=colour, linestyle=line.style, marker="o", markersize=3.5, linewidth=1.2)
    elif len(values) > SMOOTH_MIN_POINTS:
        axes.plot(steps, values, color=colour, linestyle=line.style, linewidth=0.8, alpha=0.25)
        axes.plot(steps, smooth(values), color=colour, linestyle=line.style, linewidth=1.8)
    else:
        axes.plot(steps, values, color=colour, linestyle=line.style, linewidth=1.6,
                  marker="o" if len(values) == 1 else None)
