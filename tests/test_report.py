"""dpop report: plots and a self-contained HTML page from synthetic run directories."""

import base64
import json
import math
import re

import pytest

from dpop.errors import DpopError
from dpop.reporting.plots import PLOTS, smooth
from dpop.reporting.report import Section, build_report, load_metrics, wilson_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {spec.filename for spec in PLOTS}


def train_row(step, *, falling):
    chosen_delta = -0.05 * step if falling else 0.02 * step
    rejected_delta = -0.12 * step
    return {
        "split": "train", "step": step, "epoch": step / 40, "pairs_seen": 8 * step,
        "loss": 0.69 * math.exp(-step / 30),
        "rewards/chosen": 0.3 * chosen_delta, "rewards/rejected": 0.3 * rejected_delta,
        "rewards/margins": 0.3 * (chosen_delta - rejected_delta),
        "rewards/accuracies": min(1.0, 0.5 + step / 80),
        "logps/chosen": -40 + chosen_delta, "logps/rejected": -42 + rejected_delta,
        "logps/ref_chosen": -40.0, "logps/ref_rejected": -42.0, "logps/chosen_delta": chosen_delta,
        "dpop/penalty": max(0.0, -chosen_delta), "dpop/active_frac": float(falling),
        "tokens/divergent_chosen_logp": -2 - 0.01 * step, "lr": 1e-5, "grad_norm": 1.0,
        "throughput/pairs_per_s": 10.0, "throughput/tokens_per_s": 900.0, "memory/peak_gb": 0.5,
    }


def write_run(directory, rows, config=None, summary=None, raw_lines=()):
    directory.mkdir(parents=True)
    lines = [json.dumps(row) for row in rows] + list(raw_lines)
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if config is not None:
        (directory / "config.yaml").write_text(config)
    if summary is not None:
        (directory / "summary.json").write_text(json.dumps(summary))
    return directory


@pytest.fixture
def two_runs(tmp_path):
    dpo_rows = [train_row(step, falling=True) for step in range(1, 41)]
    dpo_rows += [{"split": "eval", "step": s, "eval/rewards/accuracies": 0.5 + s / 100, "eval/loss": 0.6}
                 for s in (10, 20, 30, 40)]
    dpo = write_run(tmp_path / "run-a", dpo_rows, config="loss: dpo\nbeta: 0.3\n", summary={"steps": 40})
    # The second run lacks several keys, has NaN / null values and no config: the legend uses its dir name.
    sparse_rows = [{k: v for k, v in train_row(step, falling=False).items()
                    if not k.startswith(("tokens/", "rewards/accuracies"))} for step in range(1, 21)]
    sparse_rows[3]["logps/chosen"] = None
    sparse_rows[4]["loss"] = float("nan")
    sparse = write_run(tmp_path / "run-b", sparse_rows, raw_lines=['{"split": "train", "step": 21, "loss": NaN}'])
    return dpo, sparse


def images(page: str) -> list[bytes]:
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    return [base64.b64decode(src.split(",", 1)[1], validate=True) for src in sources]


def test_report_from_two_runs(two_runs, tmp_path):
    out = tmp_path / "out"
    section = Section("Accuracy table", "<p>written <em>reading</em></p>",
                      [["loss", "acc", "95% CI"], ["dpo <b>", 0.61234, "0.5–0.7"]])
    html_path = build_report(list(two_runs), out, title="DPO vs <DPOP>", sections=[section])
    page = html_path.read_text()
    assert html_path == out / "report.html"
    decoded = images(page)
    assert all(data.startswith(PNG_MAGIC) and len(data) > 5000 for data in decoded)
    files = sorted((out / "plots").iterdir())
    assert {f.name for f in files} == ALL_PLOTS  # run-a logged every plotted key
    assert len(decoded) == len(files) and all(f.stat().st_size > 5000 for f in files)
    assert sorted(f.read_bytes() for f in files) == sorted(decoded)
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page
    # caller's section first (its html as given, its table escaped), then the final-value table
    assert page.index("Accuracy table") < page.index("Final values") < page.index("<img")
    assert "<em>reading</em>" in page and "dpo &lt;b&gt;" in page and "0.6123" in page
    assert "<title>DPO vs &lt;DPOP&gt;</title>" in page
    assert "<td>dpo</td>" in page and "<td>run-b</td>" in page  # config.yaml's loss, else the dir name
    assert "summary.json of dpo" in page
    assert "failure-mode watch" in page and "--loss dpop" in page  # run-a's chosen delta falls
    assert not list(out.rglob("*.tmp"))


def test_missing_keys_skip_plots_and_stale_files_go(tmp_path):
    only_loss = write_run(tmp_path / "run", [{"split": "train", "step": s, "loss": 1 / s} for s in range(1, 6)])
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "margins.png").write_bytes(b"stale")
    page = build_report([only_loss], out).read_text()
    assert [f.name for f in (out / "plots").iterdir()] == ["loss.png"]
    assert len(images(page)) == 1 and "Not drawn" in page and "margins.png" in page
    assert "—" in page  # missing final values print as a dash


def test_single_run_defaults_to_its_own_directory(tmp_path):
    run = write_run(tmp_path / "run", [train_row(s, falling=False) for s in range(1, 4)])
    assert build_report([run], None) == run / "report.html"
    assert (run / "plots" / "logps.png").stat().st_size > 0


def test_same_loss_twice_gets_directory_names(tmp_path):
    rows = [{"split": "train", "step": s, "loss": 1 / s} for s in range(1, 4)]
    first = write_run(tmp_path / "beta01", rows, config="loss: dpo\n")
    second = write_run(tmp_path / "beta03", rows, config="loss: dpo\n")
    page = build_report([first, second], tmp_path / "out").read_text()
    assert "<td>dpo (beta01)</td>" in page and "<td>dpo (beta03)</td>" in page


def test_load_metrics_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DpopError, match="no metrics.jsonl"):
        load_metrics(tmp_path)
    write_run(tmp_path / "bad", [{"step": 1}], raw_lines=["", '{"step": 2, "loss": 0.5', '{"step": 3}'])
    with pytest.raises(DpopError, match=r"metrics.jsonl line 3: not valid JSON"):
        load_metrics(tmp_path / "bad")
    write_run(tmp_path / "list", [], raw_lines=["[1, 2]"])
    with pytest.raises(DpopError, match="line 1: expected a JSON object, got list"):
        load_metrics(tmp_path / "list")
    with pytest.raises(DpopError, match="at least one run"):
        build_report([], tmp_path / "out")


def test_wilson_interval_hand_values():
    """z = 1.96, z^2 = 3.8416, n = 10: shrink = 1 + z^2/n = 1.38416.
    k = 5: centre 0.5, half = (1.96 / 1.38416) * sqrt(0.025 + 0.009604) = 1.4160217 * 0.1860216
    = 0.2634106 -> (0.2365894, 0.7634106).
    k = 0: the interval is [0, (z^2/n) / shrink] = [0, 0.277540]; k = 10 mirrors it."""
    assert wilson_interval(5, 10) == pytest.approx((0.2365894, 0.7634106), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277540), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((0.722460, 1.0), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(80, 100, z=2.5758)  # 99% is wider than 95%
    assert low < wilson_interval(80, 100)[0] < 0.8 < wilson_interval(80, 100)[1] < high
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_smoothing_is_a_centred_mean_that_keeps_constants_and_length():
    assert smooth([2.0] * 50) == [2.0] * 50
    values = [float(i) for i in range(100)]  # window 5: the interior of a line is unchanged
    smoothed = smooth(values)
    assert len(smoothed) == 100 and smoothed[10:90] == pytest.approx(values[10:90])
    assert smoothed[0] == pytest.approx(1.0)  # (0 + 1 + 2) / 3 at the edge
