"""DPO / DPOP loss surface and gradient field over the probability ratios (`dpop landscape`).

Seed 003 (after "Towards Analyzing and Understanding the Limitations of DPO") studies the per-pair
loss as a function of two numbers,

    x1 = pi_theta(y_w) / pi_ref(y_w),    x2 = pi_theta(y_l) / pi_ref(y_l),

so lw - rw = log x1 and ll - rl = log x2, and DESIGN.md §1's losses become

    dpo:   L = -log sigma(beta * (log x1 - log x2))                        = -log(x1^b / (x1^b + x2^b))
    dpop:  L = -log sigma(beta * (log x1 - log x2 - lambda * max(0, -log x1)))

With z the sigmoid's argument and s = sigma(-z) (the "how wrong" weight):

    dL/dx1 = -s * beta * (1 + lambda * [x1 < 1]) / x1        dL/dx2 = s * beta / x2

(for dpo lambda = 0, which is seed 003's eq. 16; their ratio |dL/dx1| / |dL/dx2| = x2 / x1 is eq. 17).
At x1 = 1 we take the one-sided derivative from above (the penalty is off), as torch's relu does.

Reading the figure: under DPO the descent direction -grad L points mostly down (shrink x2) wherever
x2 < x1, and the push grows without bound as x2 -> 0, while the push up in x1 stays weak. Under DPOP,
left of x1 = 1 the penalty multiplies the x1 component by (1 + lambda) and the field points right,
back over x1 = 1; right of the line DPOP and DPO coincide.

Run:
    dpop landscape --loss dpo --out dpo.png       # --loss dpop | both; .svg / .pdf by suffix
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpop.config import TrainConfig
from dpop.errors import ConfigError

LANDSCAPE_LOSSES = ("dpo", "dpop")
LANDSCAPE_CHOICES = LANDSCAPE_LOSSES + ("both",)
FIGURE_FORMATS = ("png", "svg", "pdf")
DPI = 110


@dataclass(frozen=True)
class LandscapeGrid:
    """The loss and its gradient on a square grid; every array is (points, points), indexed [x2, x1]."""

    loss_name: str
    beta: float
    dpop_lambda: float
    x1: np.ndarray
    x2: np.ndarray
    loss: np.ndarray
    grad_x1: np.ndarray  # dL/dx1
    grad_x2: np.ndarray  # dL/dx2

    @property
    def grad_norm(self) -> np.ndarray:
        return np.hypot(self.grad_x1, self.grad_x2)


def _check(loss: str, beta: float, dpop_lambda: float | None) -> float:
    """Validate the arguments; return the lambda actually used (0 for dpo; None: dpop's own default)."""
    from dpop.losses import check_option, loss_option_defaults

    if loss not in LANDSCAPE_LOSSES:
        raise ConfigError(f"landscape loss {loss!r} is not one of {', '.join(LANDSCAPE_LOSSES)}")
    if not beta > 0:
        raise ConfigError(f"beta must be positive, got {beta}")
    if dpop_lambda is None:
        dpop_lambda = loss_option_defaults()["dpop_lambda"]
    check_option("dpop_lambda", dpop_lambda)
    return dpop_lambda if loss == "dpop" else 0.0


def _logit(x1: np.ndarray, x2: np.ndarray, beta: float, penalty_weight: float) -> np.ndarray:
    """z = beta * (log x1 - log x2 - lambda * max(0, -log x1)): DESIGN.md §1 with rw = rl = 0."""
    log_x1, log_x2 = np.log(x1), np.log(x2)
    return beta * (log_x1 - log_x2 - penalty_weight * np.maximum(0.0, -log_x1))


def ratio_loss(loss: str, x1, x2, *, beta: float = TrainConfig.beta, dpop_lambda: float | None = None) -> np.ndarray:
    """Per-pair loss at ratios (x1, x2) > 0; dpop_lambda is ignored for dpo."""
    penalty_weight = _check(loss, beta, dpop_lambda)
    z = _logit(np.asarray(x1, float), np.asarray(x2, float), beta, penalty_weight)
    return np.logaddexp(0.0, -z)  # -log sigma(z), stable for large |z|


def ratio_loss_gradient(
    loss: str, x1, x2, *, beta: float = TrainConfig.beta, dpop_lambda: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dx1, dL/dx2) at ratios (x1, x2) > 0, in closed form (see the module docstring)."""
    penalty_weight = _check(loss, beta, dpop_lambda)
    x1, x2 = np.asarray(x1, float), np.asarray(x2, float)
    z = _logit(x1, x2, beta, penalty_weight)
    wrong_weight = 0.5 * (1.0 - np.tanh(0.5 * z))  # sigma(-z) = -dL/dz
    penalty_active = x1 < 1.0
    grad_x1 = -wrong_weight * beta * (1.0 + penalty_weight * penalty_active) / x1
    grad_x2 = wrong_weight * beta / x2
    return grad_x1, grad_x2


def landscape_grid(
    loss: str,
    beta: float = TrainConfig.beta,
    dpop_lambda: float | None = None,
    *,
    low: float = 0.02,
    high: float = 2.0,
    points: int = 200,
) -> LandscapeGrid:
    """Loss and gradient on [low, high]^2 (ratios must stay > 0: the gradient diverges at x2 -> 0)."""
    if not 0 < low < high:
        raise ConfigError(f"need 0 < low < high for the ratio grid, got low={low}, high={high}")
    axis = np.linspace(low, high, points)
    x1, x2 = np.meshgrid(axis, axis)  # (points, points): x1 varies along columns, x2 along rows
    penalty_weight = _check(loss, beta, dpop_lambda)  # the λ used: 0 for dpo
    grad_x1, grad_x2 = ratio_loss_gradient(loss, x1, x2, beta=beta, dpop_lambda=dpop_lambda)
    return LandscapeGrid(
        loss_name=loss,
        beta=beta,
        dpop_lambda=penalty_weight,
        x1=x1,
        x2=x2,
        loss=ratio_loss(loss, x1, x2, beta=beta, dpop_lambda=dpop_lambda),
        grad_x1=grad_x1,
        grad_x2=grad_x2,
    )


# ---------------------------------------------------------------------------------------------
# Drawing


def draw_landscape(loss: str, out_path: str | Path, *, beta: float = TrainConfig.beta, dpop_lambda: float | None = None) -> Path:
    """Draw the loss surface (filled log-scale contours) with the descent field -grad L on top.

    Arrows have unit length (direction only; with lambda = 50 the raw field spans four decades) and
    are coloured by |grad L| on a log scale, one colour bar per panel (a shared scale would flatten
    DPO's field to one colour next to DPOP's). loss: dpo | dpop | both (side by side).
    The format follows out_path's suffix (png, svg, pdf); the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dpop.reporting.report import write_atomic

    out_path = Path(out_path)
    suffix = out_path.suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise ConfigError(f"cannot tell the figure format of {out_path}: use a .png, .svg or .pdf name")
    if loss not in LANDSCAPE_CHOICES:
        raise ConfigError(f"landscape loss {loss!r} is not one of {', '.join(LANDSCAPE_CHOICES)}")
    names = LANDSCAPE_LOSSES if loss == "both" else (loss,)
    figure = Figure(figsize=(7.2 * len(names), 7.0), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, name in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        _draw_panel(figure, axes, landscape_grid(name, beta, dpop_lambda))
    buffer = io.BytesIO()
    figure.savefig(buffer, format=suffix, dpi=DPI)
    write_atomic(out_path, buffer.getvalue())
    return out_path


def _draw_panel(figure, axes, grid: LandscapeGrid) -> None:
    """One loss: filled contours of L, the x1 = 1 line, unit descent arrows, two colour bars."""
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import NullFormatter

    levels = np.geomspace(grid.loss.min(), grid.loss.max(), 24)
    filled = axes.contourf(grid.x1, grid.x2, grid.loss, levels=levels,
                           norm=LogNorm(levels[0], levels[-1]), cmap="Greys")
    lines = axes.contour(grid.x1, grid.x2, grid.loss, levels=levels[::3], colors="k",
                         linewidths=0.4, alpha=0.5)
    axes.clabel(lines, fmt="%.2g", fontsize=7)
    figure.colorbar(filled, ax=axes, shrink=0.8, label="loss L (log colour scale)", format="%.2g")

    every = max(1, len(grid.x1) // 16)  # ~16 x 16 arrows
    pick = (slice(every // 2, None, every), slice(every // 2, None, every))
    descent_x1, descent_x2 = -grid.grad_x1[pick], -grid.grad_x2[pick]
    length = np.hypot(descent_x1, descent_x2)
    spacing = grid.x1[0, every] - grid.x1[0, 0]
    magnitude = grid.grad_norm[pick]
    arrows = axes.quiver(
        grid.x1[pick], grid.x2[pick], descent_x1 / length, descent_x2 / length, magnitude,
        cmap="plasma", norm=LogNorm(magnitude.min(), magnitude.max()), angles="xy", scale_units="xy",
        scale=1 / (0.8 * spacing), width=0.005, headwidth=3.5, edgecolor="k", linewidth=0.3,
    )
    bar = figure.colorbar(arrows, ax=axes, location="bottom", shrink=0.8, aspect=35,
                          ticks=np.geomspace(magnitude.min(), magnitude.max(), 6), format="%.2g",
                          label=r"arrow colour: $|\nabla L|$ (log scale); arrows show direction only")
    bar.ax.xaxis.set_minor_formatter(NullFormatter())  # LogNorm labels minor ticks on short ranges

    low, high = grid.x1.min(), grid.x1.max()
    axes.plot([low, high], [low, high], color="tab:blue", linestyle=":", linewidth=1.2)
    axes.text(high * 0.97, high * 0.93, "$x_2 = x_1$", color="tab:blue", fontsize=8, ha="right",
              bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
    axes.axvline(1.0, color="tab:red", linestyle="--", linewidth=1.6)
    axes.text(1.02, high * 0.985, r"$x_1 = 1$: $\pi_\theta(y_w) = \pi_{ref}(y_w)$",
              color="tab:red", fontsize=8, va="top",
              bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
    if grid.loss_name == "dpop":
        axes.axvspan(low, 1.0, color="tab:red", alpha=0.06, linewidth=0)
        axes.text(0.5, low + 0.04, "penalty active", color="tab:red", fontsize=8, ha="center",
                  bbox=dict(facecolor="white", alpha=0.8, edgecolor="none", pad=1.5))
        title = (rf"DPOP ($\beta$ = {grid.beta:g}, $\lambda$ = {grid.dpop_lambda:g}): loss and descent $-\nabla L$"
                 "\n" rf"left of $x_1 = 1$ the $x_1$ push is $(1 + \lambda)\times$ DPO's: back over the line")
    else:
        title = (rf"DPO ($\beta$ = {grid.beta:g}): loss and descent direction $-\nabla L$"
                 "\n" r"$|\partial L / \partial x_1| : |\partial L / \partial x_2| = x_2 : x_1$"
                 " (below the diagonal it mostly lowers $x_2$)")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(r"$x_1 = \pi_\theta(y_w) / \pi_{ref}(y_w)$")
    axes.set_ylabel(r"$x_2 = \pi_\theta(y_l) / \pi_{ref}(y_l)$")
    axes.set_aspect("equal")  # equal axes, so arrow angles are the true gradient directions
    axes.set_xlim(low, high)
    axes.set_ylim(grid.x2.min(), grid.x2.max())
