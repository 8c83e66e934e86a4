"""Every loss option, once: what it means and the values it accepts.

A loss function declares its options as keyword-only parameters with their defaults (dpop.losses reads them
from the signature) and checks each value here; the config's fields, `--help` and the docs' loss table take
the meaning and the bounds from OPTIONS too, so they are written in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpop.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One option's meaning and its interval of valid values (an open end excludes the bound)."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def interval(self) -> str:
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


OPTIONS: dict[str, Option] = {
    "dpop_lambda": Option("DPOP's λ ≥ 0: weight of the penalty max(0, log πref(y_w|x) − log πθ(y_w|x)), "
                          "subtracted from the margin inside the sigmoid (paper: 50)", low=0.0),
    "label_smoothing": Option("ε in [0, 0.5): the assumed label-flip rate (robust: unbiased correction; "
                              "cdpo and aot: smoothed label 1 − ε)", low=0.0, high=0.5, high_open=True),
    "rpo_alpha": Option("RPO's α ≥ 0: weight of y_w's mean per-token NLL added to the DPO loss", low=0.0),
    "simpo_gamma": Option("SimPO's γ ≥ 0: target margin between the β-scaled average log-probs", low=0.0),
    "cpo_alpha": Option("CPO's α ≥ 0: weight of y_w's mean per-token NLL added to the CPO preference loss",
                        low=0.0),
    "exo_epsilon": Option("EXO's ε in (0, 1): label smoothing of the target distribution (paper: 1e-3)",
                          low=0.0, high=1.0, low_open=True, high_open=True),
    "tdpo_alpha": Option("TDPO2's α ≥ 0: weight of the sequential-KL term D_SeqKL(y_l) − sg(D_SeqKL(y_w)) (paper: 0.5)",
                         low=0.0),
    "desirable_weight": Option("KTO's λ_D ≥ 0: weight of the desirable rows' losses (keep λ_D·n_D / (λ_U·n_U) in "
                               "[1, 4/3], paper §4.2)", low=0.0),
    "undesirable_weight": Option("KTO's λ_U ≥ 0: weight of the undesirable rows' losses", low=0.0),
    "discopop_tau": Option("DiscoPOP's τ > 0: temperature of the logistic/exponential mixing weight "
                           "(paper: 0.05)", low=0.0, low_open=True),
}


def check_option(name: str, value: float, *, loss: str | None = None) -> None:
    """ConfigError unless `value` lies in option `name`'s interval; `loss` names the loss in the message."""
    option = OPTIONS[name]
    if isinstance(value, (int, float)) and not math.isnan(value) and option.admits(value):
        return
    where = f"loss {loss!r}: option {name}" if loss else name
    raise ConfigError(f"{where} = {value} is outside {option.interval()}")
