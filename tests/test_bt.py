"""Bradley–Terry: the seed's worked example, the score equations, and the no-MLE cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpop.analysis.bt import fit_bradley_terry, fit_table, format_bt, read_win_table
from dpop.errors import DataError

SEED_TABLE = "winner,loser,count\nA,B,8\nB,A,4\nA,C,3\nC,A,5\n"


def write(tmp_path, text, name="wins.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_seed_example_alphas_and_p_b_beats_c(tmp_path):
    """Seed 004: the likelihood (a1/(a1+a2))^8 (a2/(a1+a2))^4 (a1/(a1+a3))^3 (a3/(a1+a3))^5 is maximised
    at a2 = a1/2 (A won 8 of 12 against B) and a3 = 5 a1/3 (C won 5 of 8 against A), so
    P(B beats C) = (1/2) / (1/2 + 5/3) = 3/13."""
    result = fit_bradley_terry(read_win_table(write(tmp_path, SEED_TABLE)))
    assert result.is_mle and not result.notes
    assert result.alphas["A"] == pytest.approx(1.0, abs=1e-12)  # gauge: first player r = 0
    assert result.alphas["B"] == pytest.approx(0.5, abs=1e-6)
    assert result.alphas["C"] == pytest.approx(5 / 3, abs=1e-6)
    assert result.win_probability("B", "C") == pytest.approx(3 / 13, abs=1e-6)
    assert result.win_probability("A", "B") == pytest.approx(2 / 3, abs=1e-6)
    assert result.wins == {"A": 11, "B": 4, "C": 5} and result.losses == {"A": 9, "B": 8, "C": 3}


def test_format_prints_strengths_and_full_matrix(tmp_path):
    text = fit_table(write(tmp_path, SEED_TABLE))
    assert "gauge: r(A) = 0" in text and "maximum likelihood" in text
    matrix = text.split("P(row beats column):")[1].splitlines()
    header, rows = matrix[1].split(), {line.split()[0]: line.split()[1:] for line in matrix[2:5]}
    assert header == ["C", "A", "B"]  # strongest first
    assert rows["B"] == ["0.2308", "0.3333", "-"]
    assert rows["C"] == ["-", "0.6250", "0.7692"]
    assert "NOTE" not in text


def mm_zermelo(games: np.ndarray, sweeps: int = 20000) -> np.ndarray:
    """Independent check: Zermelo's / Hunter's MM update alpha_i <- W_i / sum_j n_ij / (alpha_i + alpha_j)."""
    meetings = games + games.T
    alphas = np.ones(len(games))
    for _ in range(sweeps):
        previous = alphas
        alphas = games.sum(1) / (meetings / (alphas[:, None] + alphas[None, :])).sum(1)
        alphas /= alphas[0]
        if np.max(np.abs(alphas - previous)) < 1e-13:
            break
    return np.log(alphas)


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 5).flatmap(
    lambda n: st.lists(st.integers(0, 6), min_size=n * n, max_size=n * n).map(
        lambda counts: np.array(counts, float).reshape(n, n))))
def test_mle_solves_score_equations_and_matches_mm(games):
    n = len(games)
    np.fill_diagonal(games, 0)
    for i in range(n):  # a cycle of wins makes the beat graph strongly connected: the MLE exists
        games[i, (i + 1) % n] += 1
    names = [f"p{i}" for i in range(n)]
    wins = {(names[i], names[j]): int(games[i, j]) for i in range(n) for j in range(n) if games[i, j]}
    result = fit_bradley_terry(wins)
    assert result.is_mle
    strengths = np.array([result.strengths[name] for name in names])
    p = 1 / (1 + np.exp(-(strengths[:, None] - strengths[None, :])))
    expected_wins = ((games + games.T) * p).sum(1)
    np.testing.assert_allclose(expected_wins, games.sum(1), atol=1e-8)  # the MLE's score equations
    np.testing.assert_allclose(strengths, mm_zermelo(games), atol=1e-5)


def test_gauge_moves_with_first_player_but_probabilities_do_not():
    wins = {("A", "B"): 8, ("B", "A"): 4, ("A", "C"): 3, ("C", "A"): 5}
    reordered = {("C", "A"): 5, ("A", "C"): 3, ("B", "A"): 4, ("A", "B"): 8}
    first, second = fit_bradley_terry(wins), fit_bradley_terry(reordered)
    assert second.strengths["C"] == 0.0 and first.strengths["A"] == 0.0
    for i in "ABC":
        for j in "ABC":
            if i != j:
                assert first.win_probability(i, j) == pytest.approx(second.win_probability(i, j), abs=1e-9)
                assert first.win_probability(i, j) + first.win_probability(j, i) == pytest.approx(1.0)
    with pytest.raises(KeyError, match="unknown player 'D'"):
        first.win_probability("A", "D")


def test_unbeaten_and_winless_players_are_reported_and_fitted_with_a_prior():
    wins = {("A", "B"): 3, ("A", "C"): 2, ("B", "C"): 2, ("C", "B"): 1}  # A never lost
    result = fit_bradley_terry(wins)
    assert not result.is_mle and result.prior_sd == 3.0
    assert any("A never lost" in note and "+infinity" in note for note in result.notes)
    assert all(math.isfinite(r) for r in result.strengths.values())
    assert result.win_probability("A", "B") > 0.9
    text = format_bt(result)
    assert "NOTE" in text and "A never lost" in text and "Gaussian prior" in text

    winless = fit_bradley_terry({("A", "B"): 1, ("B", "A"): 1, ("A", "C"): 2, ("B", "C"): 1})
    assert any("C never won" in note and "-infinity" in note for note in winless.notes)


def test_groups_that_never_met_are_reported():
    result = fit_bradley_terry({("A", "B"): 2, ("B", "A"): 1, ("C", "D"): 1, ("D", "C"): 3})
    assert "never played each other: {A, B} | {C, D}" in result.notes[0]
    assert result.prior_sd is not None


def test_explicit_prior_shrinks_towards_equal_strengths():
    wins = {("A", "B"): 8, ("B", "A"): 4, ("A", "C"): 3, ("C", "A"): 5}
    mle, map_fit = fit_bradley_terry(wins), fit_bradley_terry(wins, prior_sd=0.5)
    assert map_fit.prior_sd == 0.5 and not map_fit.notes
    assert abs(map_fit.strengths["B"]) < abs(mle.strengths["B"])


def test_count_column_is_optional_and_repeated_rows_add_up(tmp_path):
    path = write(tmp_path, "winner,loser\nA,B\nA,B\n\nB,A\n")
    assert read_win_table(path) == {("A", "B"): 2, ("B", "A"): 1}
    path = write(tmp_path, "Winner, Loser, Count\nA,B,2\nA,B,3\n", "counted.csv")
    assert read_win_table(path) == {("A", "B"): 5}


def test_errors_name_file_line_and_field(tmp_path):
    path = write(tmp_path, "winner,loser,count\nA,B,2\nB,A,two\nA,C,-1\nA,A,1\nD,B,0\nE,F\n")
    with pytest.raises(DataError) as caught:
        read_win_table(path)
    problems = caught.value.problems
    assert f"{path} line 3, field 'count': 'two' is not a whole number" in problems
    assert f"{path} line 4, field 'count': -1 is negative" in problems
    assert any(p.startswith(f"{path} line 5, field 'loser'") for p in problems)
    assert any(p.startswith(f"{path} line 6") and "'D' has no games" in p for p in problems)
    assert any(p.startswith(f"{path} line 7") and "2 fields, expected 3" in p for p in problems)


def test_missing_file_bad_header_and_empty_table(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_win_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="line 1: header is 'a,b,c'"):
        read_win_table(write(tmp_path, "a,b,c\nA,B,1\n"))
    with pytest.raises(DataError, match="no rows after the header"):
        read_win_table(write(tmp_path, "winner,loser,count\n", "empty.csv"))
