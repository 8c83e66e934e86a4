"""Metrics from synthetic numbers: the per-step summary worked out by hand, the JSONL log, tracker values and
the failure-mode watch."""

import json
import math

import torch

from dpop.scoring.logprobs import SequenceLogps
from dpop.scoring.metrics import ALL_KEYS, PAIR_KEYS, PairStats, pair_accuracy, record_pairs, summarize_pairs
from dpop.training.monitor import FailureModeWatch, MetricsLog, tracker_values


def policy(chosen, rejected):
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    return SequenceLogps(chosen=chosen, rejected=rejected, chosen_lengths=torch.tensor([4, 4]),
                         rejected_lengths=torch.tensor([4, 4]), divergent_chosen_sum=torch.tensor([-3.0, -1.0]),
                         divergent_chosen_count=torch.tensor([3, 0]), shared_prefix=torch.tensor([-1.0, -2.0]))


def test_summary_worked_by_hand():
    """β = 0.5, λ = 10. Pair 0: lw −10 (rw −11), ll −14 (rl −12). Pair 1: lw −13 (rw −11), ll −15 (rl −12).
    chosen deltas 1, −2; rewards r_w = 0.5, −1; r_l = −1, −1.5; margins 1.5, 0.5; both pairs r_w > r_l.
    penalties 0, 2 -> mean 1, active 1/2; penalised r_w = 0.5 − 0.5·10·0 = 0.5 and −1 − 0.5·10·2 = −11.
    divergent: pair 0 has 3 tokens summing −3 (mean −1); pair 1 has none (NaN, left out)."""
    stats = PairStats()
    record_pairs(stats, losses=torch.tensor([0.2, 0.4]), chosen_rewards=torch.tensor([0.5, -1.0]),
                 rejected_rewards=torch.tensor([-1.0, -1.5]), policy=policy([-10.0, -13.0], [-14.0, -15.0]),
                 ref_chosen=torch.tensor([-11.0, -11.0]), ref_rejected=torch.tensor([-12.0, -12.0]),
                 beta=0.5, dpop_lambda=10.0)
    row = summarize_pairs(stats)
    assert set(PAIR_KEYS) <= set(row)
    expected = {"loss": 0.3, "rewards/chosen": -0.25, "rewards/rejected": -1.25, "rewards/margins": 1.0,
                "rewards/accuracies": 1.0, "logps/chosen": -11.5, "logps/rejected": -14.5, "logps/ref_chosen": -11.0,
                "logps/ref_rejected": -12.0, "logps/chosen_delta": -0.5, "dpop/penalty": 1.0,
                "dpop/active_frac": 0.5, "tokens/divergent_chosen_logp": -1.0,
                "dpop/penalized_chosen_reward": -5.25}
    for key, value in expected.items():
        assert math.isclose(row[key], value, abs_tol=1e-6), (key, row[key])
    assert pair_accuracy(stats) == 1.0  # −10 > −14 and −13 > −15


def test_reference_free_rows_have_null_reference_metrics(tmp_path):
    stats = PairStats()
    record_pairs(stats, losses=torch.tensor([0.2, 0.4]), chosen_rewards=torch.tensor([0.1, 0.2]),
                 rejected_rewards=torch.tensor([0.0, 0.3]), policy=policy([-10.0, -13.0], [-14.0, -15.0]),
                 ref_chosen=None, ref_rejected=None)
    row = summarize_pairs(stats)
    assert row["rewards/accuracies"] == 0.5
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({**row, "step": 1, "split": "train"})
    log.close()
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    for key in ("logps/ref_chosen", "logps/chosen_delta", "dpop/penalty", "dpop/active_frac"):
        assert written[key] is None, key  # NaN is written as null, valid JSON


def test_metrics_log_truncates_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2, 3):
        log.write({"step": step, "split": "train"})
    log.write({"step": 3, "split": "eval"})
    log.close()
    MetricsLog(path, truncate_after_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_tracker_values_keep_finite_numbers_only():
    row = {"loss": 0.5, "step": 3, "split": "train", "logps/ref_chosen": math.nan, "grad_norm": None, "flag": True}
    assert tracker_values(row) == {"loss": 0.5, "step": 3.0}
    assert "step" in ALL_KEYS


def test_failure_mode_watch_warns_once_with_advice():
    """Chosen delta falling below 0 while the margin rises, over two windows of 5 steps: the DPO failure mode."""
    watch = FailureModeWatch("dpo", window=5)
    messages = [watch.update(step, chosen_delta=-0.1 * step, margin=0.2 * step) for step in range(1, 16)]
    fired = [(step, m) for step, m in enumerate(messages, start=1) if m]
    assert [step for step, _ in fired] == [10]  # needs 2 windows, then stays quiet
    assert "--loss dpop" in fired[0][1] and "LESS likely" in fired[0][1]
    assert watch.fired_at == 10

    dpop_watch = FailureModeWatch("dpop", window=5)
    messages = [dpop_watch.update(step, -0.1 * step, 0.2 * step) for step in range(1, 11)]
    assert "--dpop-lambda" in messages[-1]


def test_failure_mode_watch_stays_quiet_when_training_is_healthy():
    rising = FailureModeWatch("dpo", window=5)
    assert not any(rising.update(s, 0.05 * s, 0.2 * s) for s in range(1, 30))  # chosen log-prob rises too
    flat_margin = FailureModeWatch("dpo", window=5)
    assert not any(flat_margin.update(s, -0.1 * s, 1.0) for s in range(1, 30))  # falls, but the margin does not grow
    missing = FailureModeWatch("simpo", window=5)
    assert not any(missing.update(s, math.nan, 0.2 * s) for s in range(1, 30))  # reference-free: no delta
