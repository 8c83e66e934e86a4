"""Bradley–Terry strengths from a table of pairwise wins (`dpop bt fit TABLE.csv`).

The model (DESIGN.md §1, seed 004): player i has a strength r_i (alpha_i = exp(r_i)) and

    P(i beats j) = sigma(r_i - r_j) = alpha_i / (alpha_i + alpha_j).

The strengths are fitted by maximum likelihood with Newton's method on r (the log-likelihood is
concave, so Newton with step halving converges in a handful of iterations).

Gauge: only differences r_i - r_j are identified, so we fix r = 0 (alpha = 1) for the FIRST player in
the table (order of first appearance). Seed 004's answer is written the same way: alpha_B = alpha_A / 2,
alpha_C = 5 alpha_A / 3 with A the first player.

When the maximum-likelihood estimate does not exist: a finite MLE exists exactly when every split of
the players into two groups has a win in each direction across the split (the "beat" graph is
strongly connected; Zermelo 1929, Ford 1957). A player who never lost has MLE strength +infinity, one
who never won -infinity, and the same holds for groups. We detect this, name the players, and fit
the MAP estimate under a Gaussian prior r_i ~ N(0, prior_sd^2) instead (DEFAULT_PRIOR_SD = 3, i.e.
alpha within a factor ~e^6 ~ 400 of a typical player at two standard deviations). The result and the
printed table say so; their numbers for those players mean "much stronger / weaker", nothing finer.

Run:
    dpop bt fit wins.csv      # CSV header: winner,loser[,count]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpop.errors import DataError, DpopError

DEFAULT_PRIOR_SD = 3.0
MAX_NEWTON_STEPS = 200
GRADIENT_TOLERANCE = 1e-12

WinTable = dict[tuple[str, str], int]


@dataclass(frozen=True)
class BTResult:
    """Fitted Bradley–Terry strengths.

    players: names in table order (the first one is the gauge player, r = 0).
    strengths: r_i (log-strengths); alphas: exp(r_i).
    wins / losses: games won and lost by each player.
    prior_sd: None for a pure maximum-likelihood fit, else the sd of the Gaussian prior used.
    notes: plain-language warnings (why a prior was needed, groups that never met, ...).
    """

    players: tuple[str, ...]
    strengths: dict[str, float]
    alphas: dict[str, float]
    wins: dict[str, int]
    losses: dict[str, int]
    log_likelihood: float
    iterations: int
    prior_sd: float | None = None
    notes: tuple[str, ...] = field(default=())

    def win_probability(self, winner: str, loser: str) -> float:
        """P(winner beats loser) = alpha_w / (alpha_w + alpha_l) = sigma(r_w - r_l)."""
        for name in (winner, loser):
            if name not in self.strengths:
                raise KeyError(f"unknown player {name!r}; players are {', '.join(self.players)}")
        return _sigmoid(self.strengths[winner] - self.strengths[loser])

    @property
    def is_mle(self) -> bool:
        return self.prior_sd is None


def _sigmoid(z: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * z))  # = 1 / (1 + e^-z), without overflow


# ---------------------------------------------------------------------------------------------
# Reading the table


def read_win_table(path: str | Path) -> WinTable:
    """Read `winner,loser[,count]` rows into {(winner, loser): games}; repeated rows add up.

    count defaults to 1 when the column is absent. Every row is checked before anything is returned;
    problems name the file, the line and the field. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: file not found"], header="cannot read win table")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        columns = [cell.strip().lower() for cell in header] if header else []
        if columns not in (["winner", "loser"], ["winner", "loser", "count"]):
            shown = ",".join(header) if header else "(empty file)"
            raise DataError(
                [f"{path} line 1: header is {shown!r}; expected 'winner,loser,count' (count optional)"],
                header="invalid win table",
            )
        has_count = len(columns) == 3
        wins: WinTable = {}
        lines_of: dict[str, list[int]] = {}
        problems: list[str] = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            parsed = _parse_row(row, has_count, f"{path} line {line}")
            if isinstance(parsed, list):
                problems.extend(parsed)
                continue
            winner, loser, count = parsed
            wins[(winner, loser)] = wins.get((winner, loser), 0) + count
            for name in (winner, loser):
                lines_of.setdefault(name, []).append(line)
    if not problems and not wins:
        problems.append(f"{path}: no rows after the header; add 'winner,loser,count' rows")
    problems.extend(_players_without_games(path, wins, lines_of))
    if problems:
        raise DataError(problems, header="invalid win table")
    return wins


def _parse_row(row: list[str], has_count: bool, where: str) -> tuple[str, str, int] | list[str]:
    """One data row -> (winner, loser, count), or the list of its problems."""
    expected = 3 if has_count else 2
    if len(row) != expected:
        return [f"{where}: {len(row)} fields, expected {expected} (winner,loser{',count' if has_count else ''})"]
    winner, loser = row[0].strip(), row[1].strip()
    problems = []
    if not winner:
        problems.append(f"{where}, field 'winner': empty name")
    if not loser:
        problems.append(f"{where}, field 'loser': empty name")
    if winner and winner == loser:
        problems.append(f"{where}, field 'loser': {loser!r} cannot play against itself")
    count = 1
    if has_count:
        text = row[2].strip()
        try:
            count = int(text)
        except ValueError:
            problems.append(f"{where}, field 'count': {text!r} is not a whole number")
        else:
            if count < 0:
                problems.append(f"{where}, field 'count': {count} is negative")
    return problems or (winner, loser, count)


def _players_without_games(path: Path, wins: WinTable, lines_of: dict[str, list[int]]) -> list[str]:
    played = {name for pair, count in wins.items() if count > 0 for name in pair}
    return [
        f"{path} line {lines[0]}: player {name!r} has no games (all its rows have count 0); "
        "remove those rows or give them a count"
        for name, lines in lines_of.items()
        if name not in played
    ]


# ---------------------------------------------------------------------------------------------
# Fitting


def fit_bradley_terry(wins: Mapping[tuple[str, str], int], *, prior_sd: float | None = None) -> BTResult:
    """Fit Bradley–Terry strengths to {(winner, loser): games}.

    Args:
        wins: games won by `winner` against `loser`; pairs may appear in both orders.
        prior_sd: None (default) fits the pure MLE when it exists and falls back to a Gaussian prior
            N(0, DEFAULT_PRIOR_SD^2) on r when it does not (reported in `notes`). A number always uses
            that prior (MAP estimate).
    Returns:
        BTResult with r_first_player = 0.
    """
    players = _players_in_order(wins)
    if len(players) < 2:
        raise DpopError("a Bradley–Terry fit needs games between at least two players")
    index = {name: i for i, name in enumerate(players)}
    games = np.zeros((len(players), len(players)))  # games[i, j] = games i won against j
    for (winner, loser), count in wins.items():
        if count < 0:
            raise DpopError(f"negative game count {count} for {winner!r} beating {loser!r}")
        if count:
            games[index[winner], index[loser]] += count

    if prior_sd is not None and not prior_sd > 0:
        raise DpopError(f"prior_sd must be a positive number, got {prior_sd}")
    notes = _existence_problems(players, games)
    if notes:
        prior_sd = DEFAULT_PRIOR_SD if prior_sd is None else prior_sd
        notes.append(
            f"The strengths shown are MAP estimates under a Gaussian prior r ~ N(0, {prior_sd:g}^2) "
            "on every player; for the players named above read them as 'much stronger / weaker' only."
        )

    strengths, iterations = _newton(games, prior_sd)
    strengths = strengths - strengths[0]  # gauge: the first player has r = 0
    return BTResult(
        players=tuple(players),
        strengths={name: float(strengths[i]) for i, name in enumerate(players)},
        alphas={name: math.exp(strengths[i]) for i, name in enumerate(players)},
        wins={name: int(games[i].sum()) for i, name in enumerate(players)},
        losses={name: int(games[:, i].sum()) for i, name in enumerate(players)},
        log_likelihood=_log_posterior(games, strengths, None),
        iterations=iterations,
        prior_sd=prior_sd,
        notes=tuple(notes),
    )


def _players_in_order(wins: Mapping[tuple[str, str], int]) -> list[str]:
    players: dict[str, None] = {}
    for (winner, loser), count in wins.items():
        if count > 0:
            players.setdefault(winner)
            players.setdefault(loser)
    return list(players)


def _log_posterior(games: np.ndarray, strengths: np.ndarray, prior_sd: float | None) -> float:
    """sum_ij games_ij * log sigma(r_i - r_j), minus r.r / (2 prior_sd^2) with a prior."""
    differences = strengths[:, None] - strengths[None, :]  # (n, n) r_i - r_j
    value = -float((games * np.logaddexp(0.0, -differences)).sum())
    if prior_sd is not None:
        value -= float(strengths @ strengths) / (2 * prior_sd**2)
    return value


def _newton(games: np.ndarray, prior_sd: float | None) -> tuple[np.ndarray, int]:
    """Maximise the (penalised) log-likelihood over r with Newton + step halving.

    Without a prior the gauge is fixed by holding r_0 = 0 (the Hessian of the rest is negative
    definite when the MLE exists). With a prior every r is free: the prior fixes the gauge and its
    optimum has sum(r) = 0, because the likelihood's gradient always sums to zero.
    """
    n = len(games)
    meetings = games + games.T  # (n, n) games between i and j, either winner
    total_wins = games.sum(axis=1)
    free = slice(0, n) if prior_sd is not None else slice(1, n)
    tolerance = GRADIENT_TOLERANCE * max(1.0, float(meetings.sum()))
    strengths = np.zeros(n)
    for iteration in range(MAX_NEWTON_STEPS + 1):
        p = 1.0 / (1.0 + np.exp(-(strengths[:, None] - strengths[None, :])))  # (n, n) P(i beats j)
        gradient = total_wins - (meetings * p).sum(axis=1)  # observed - expected wins
        weights = meetings * p * (1.0 - p)
        hessian = weights - np.diag(weights.sum(axis=1))
        if prior_sd is not None:
            gradient -= strengths / prior_sd**2
            hessian -= np.eye(n) / prior_sd**2
        if np.max(np.abs(gradient[free])) < tolerance:
            return strengths, iteration
        step = np.zeros(n)
        step[free] = np.linalg.solve(hessian[free, free], -gradient[free])  # ascent: hessian < 0
        # Halve the step while it lowers the objective by more than rounding noise (near the
        # optimum the objective is flat to ~1e-16 relative and must not block the final steps).
        floor = _log_posterior(games, strengths, prior_sd) - 1e-12 * max(1.0, float(meetings.sum()))
        scale = 1.0
        while scale > 1e-10 and _log_posterior(games, strengths + scale * step, prior_sd) < floor:
            scale /= 2
        strengths = strengths + scale * step
    raise DpopError(
        f"the Bradley–Terry fit did not converge in {MAX_NEWTON_STEPS} Newton steps; "
        "try a prior (prior_sd) or check the table"
    )


def _existence_problems(players: list[str], won: np.ndarray) -> list[str]:
    """Plain-language reasons why the MLE does not exist (empty when it does)."""
    n = len(players)
    met = (won + won.T) > 0
    groups = _strongly_connected(n, met)  # on the symmetric "met" graph: connected components
    notes = []
    if len(groups) > 1:
        listed = " | ".join("{" + ", ".join(players[i] for i in g) + "}" for g in groups)
        notes.append(
            f"The players form {len(groups)} groups that never played each other: {listed}. "
            "Strengths across groups are not identified by the games."
        )
    strong = _strongly_connected(n, won > 0)
    if len(strong) == len(groups):
        return notes
    notes.append(
        "No finite maximum-likelihood fit exists: the players split into groups, each of which "
        "won every game it played against the groups ranked below it."
    )
    for group in strong:
        inside = set(group)
        beat_outsiders = any(won[i][j] for i in group for j in range(n) if j not in inside)
        lost_to_outsiders = any(won[j][i] for i in group for j in range(n) if j not in inside)
        names = ", ".join(players[i] for i in group)
        who = f"{names} never" if len(group) == 1 else f"The group {{{names}}} never"
        if beat_outsiders and not lost_to_outsiders:
            tail = "lost" if len(group) == 1 else "lost to a player outside it"
            notes.append(f"{who} {tail}: its maximum-likelihood strength is +infinity.")
        elif lost_to_outsiders and not beat_outsiders:
            tail = "won" if len(group) == 1 else "beat a player outside it"
            notes.append(f"{who} {tail}: its maximum-likelihood strength is -infinity.")
    return notes


def _strongly_connected(n: int, edges: np.ndarray) -> list[list[int]]:
    """Strongly connected components of the directed graph i -> j where edges[i, j] (e.g. i beat j).

    Two players are in one component when each reaches the other. On a symmetric graph these are
    the plain connected components.
    """
    groups: list[list[int]] = []
    assigned: set[int] = set()
    for i in range(n):  # n = players in a table, small: O(n^3) is fine and easy to check
        if i not in assigned:
            group = sorted(_reachable(i, edges) & _reachable(i, edges.T))
            assigned.update(group)
            groups.append(group)
    return groups


def _reachable(start: int, edges: np.ndarray) -> set[int]:
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        for other in np.flatnonzero(edges[node]):
            if int(other) not in seen:
                seen.add(int(other))
                stack.append(int(other))
    return seen


# ---------------------------------------------------------------------------------------------
# Output


def format_bt(result: BTResult) -> str:
    """Strengths (strongest first) and the full matrix of P(row player beats column player)."""
    order = sorted(result.players, key=lambda name: -result.strengths[name])
    fit = "maximum likelihood" if result.is_mle else f"MAP, Gaussian prior r ~ N(0, {result.prior_sd:g}^2)"
    games = sum(result.wins.values())
    lines = [
        f"Bradley–Terry fit: {len(result.players)} players, {games} games, {fit}, "
        f"log-likelihood {result.log_likelihood:.4f} ({result.iterations} Newton steps)",
        f"P(i beats j) = alpha_i / (alpha_i + alpha_j), alpha = exp(r); gauge: r({result.players[0]}) = 0",
        "",
    ]
    width = max(6, *(len(name) for name in result.players))
    lines.append(f"{'player':<{width}}  {'wins':>5}  {'losses':>6}  {'r':>9}  {'alpha':>10}")
    for name in order:
        lines.append(
            f"{name:<{width}}  {result.wins[name]:>5}  {result.losses[name]:>6}  "
            f"{result.strengths[name]:>9.4f}  {result.alphas[name]:>10.4g}"
        )
    lines += ["", "P(row beats column):"]
    cell = max(7, width)
    lines.append(" " * width + "".join(f"  {name:>{cell}}" for name in order))
    for row in order:
        cells = "".join(
            f"  {'-':>{cell}}" if row == col else f"  {result.win_probability(row, col):>{cell}.4f}"
            for col in order
        )
        lines.append(f"{row:<{width}}{cells}")
    if result.notes:
        lines += ["", "NOTE:"] + [f"  {note}" for note in result.notes]
    return "\n".join(lines)


def fit_table(path: str | Path, *, prior_sd: float | None = None) -> str:
    """What `dpop bt fit TABLE.csv` prints: read, fit, format."""
    return format_bt(fit_bradley_terry(read_win_table(path), prior_sd=prior_sd))
