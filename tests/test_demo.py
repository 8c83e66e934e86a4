"""The demo end to end on a tiny model (the real run uses the builtin model: see `make demo`)."""

import base64
import json
import re

import pytest

from dpop.demo import DemoPlan, format_table, run_demo

REQUIRED = ("answer_accuracy", "pair_accuracy", "chosen_delta", "margin", "divergent_chosen_logp")


@pytest.fixture
def tiny_model_dir(tmp_path):
    from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    path = tmp_path / "tiny"
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_demo_writes_summary_report_and_table(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("DPOP_CACHE", str(tmp_path / "cache"))
    plan = DemoPlan(cases=("low", "high"), sft_pairs=8, sft_steps=2, pairs=8, steps=2, eval_problems=4,
                    batch_size=2, max_new_tokens=4)
    out = tmp_path / "demo"
    summary = run_demo(out, model=tiny_model_dir, plan=plan, seed=3)
    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    for case in ("low_edit", "high_edit"):
        assert set(saved[case]) == {"sft", "dpo", "dpop"}
        for name, entry in saved[case].items():
            assert all(key in entry for key in REQUIRED), (case, name)
        sft = saved[case]["sft"]
        assert sft["chosen_delta"] == pytest.approx(0, abs=1e-6) and sft["margin"] == pytest.approx(0, abs=1e-6)
    page = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="data:image/png;base64,([^"]+)"', page)
    assert images and all(len(base64.b64decode(data)) > 1000 for data in images)
    assert "failure mode" in page and "Wilson" in page
    assert "low_edit" in format_table(summary) and "dpop" in capsys.readouterr().out
    strips = json.loads((out / "token_changes.json").read_text())
    assert set(strips) == {"low_edit", "high_edit"} and all(len(entries) == 3 for entries in strips.values())
    for entry in strips["low_edit"]:
        for side in ("chosen", "rejected"):
            lengths = {len(entry[side][key]) for key in ("tokens", "reference", "dpo", "dpop")}
            assert len(lengths) == 1 and lengths.pop() > 0
        assert entry["chosen"]["tokens"][:entry["divergence"]] == entry["rejected"]["tokens"][:entry["divergence"]]
        assert entry["chosen"]["tokens"][entry["divergence"]] != entry["rejected"]["tokens"][entry["divergence"]]
    assert "Tokens that lose" in page and page.count("(first differing token)") == 2 * 2 * 6  # 2 sides x 2 models


def test_the_edit_distance_contrast_is_stated_plainly_either_way():
    from dpop.reporting.demo_report import edit_contrast

    def summary(low, high):
        return {"low_edit": {"dpo": {"chosen_delta": low}}, "high_edit": {"dpo": {"chosen_delta": high}}}

    assert "contrast reproduced" in edit_contrast(summary(-3.0, -0.5))
    assert "did NOT reproduce" in edit_contrast(summary(-3.0, -9.0))

    def per_token(low, high, low_after, high_after):  # the summed change says the opposite of the per-token one
        both = summary(-3.0, -9.0)
        both["low_edit"]["dpo"]["chosen_change"] = {"per_token": low, "divergent_per_token": low_after}
        both["high_edit"]["dpo"]["chosen_change"] = {"per_token": high, "divergent_per_token": high_after}
        return edit_contrast(both)

    assert "contrast reproduced here by the per-token readings" in per_token(-0.3, -0.1, -0.4, -0.2)
    assert "did NOT reproduce here" in per_token(-0.1, -0.3, -0.2, -0.4)
    assert "disagree" in per_token(-0.3, -0.1, -0.2, -0.4)
    assert "per token -0.300 (low-edit) vs -0.100 (high-edit)" in per_token(-0.3, -0.1, -0.4, -0.2).replace("+", "")
    assert edit_contrast({"low_edit": {"dpo": {"chosen_delta": -1.0}}}) is None
