"""`dpop iterate` on the tiny model: pairs built as specified, the reference of iteration t+1 is M_t, and a loop
resumed after an iteration ends where an uninterrupted one does."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpop.config import make_config
from dpop.config.commands import IterateConfig
from dpop.errors import ConfigError
from dpop.improve.iterate import run_iterate
from dpop.improve.onpolicy import Samples, _spread, build_pairs

VERIFIER = '''
def even_length(completion, row):
    """Marks an answer right when its text has an even length: a mix of marks from a random model."""
    return len(completion) % 2 == 0
'''


@pytest.fixture
def verifier_module(tmp_path, monkeypatch):
    (tmp_path / "toy_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_verifier:even_length"


def test_pairs_are_correct_against_incorrect_and_skipped_prompts_are_counted():
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}, {"prompt": "c", "answer": 3},
            {"prompt": [{"role": "user", "content": "d"}], "answer": 4}]
    texts = [["1", "1", "5", "6"], ["2", "2"], ["7", "8"], ["4", "9", "0"]]
    pairs = build_pairs(rows, Samples(texts, 1.0, 10), lambda text, row: text == str(row["answer"]), per_prompt=0)
    assert (pairs.all_correct, pairs.all_wrong, pairs.skipped_prompts) == (1, 1, 2)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in pairs.rows[:2]] == [("a", "1", "5"), ("a", "1", "6")]
    assert pairs.rows[2]["chosen"] == [{"role": "assistant", "content": "4"}]  # messages: an assistant turn
    assert all(r["answer"] == 4 for r in pairs.rows[2:]) and len(pairs.rows) == 4
    assert pairs.judgements[0] == [True, True, False, False]  # every sample's mark, duplicates included
    limited = build_pairs(rows, Samples(texts, 1.0, 10), lambda t, r: t == str(r["answer"]), per_prompt=1)
    assert len(limited.rows) == 2


def test_pairs_spread_over_both_sides_and_scores_pair_best_with_worst():
    assert _spread(["c1", "c2"], ["w1", "w2", "w3"], 3) == [("c1", "w1"), ("c2", "w1"), ("c1", "w2")]
    scores = {"x": 2.0, "y": 0.5, "z": -1.0, "u": 0.5}
    pairs = build_pairs([{"prompt": "p"}], Samples([["x", "y", "z", "u"]], 1.0, 4), lambda t, r: scores[t],
                        per_prompt=0)
    assert [(r["chosen"], r["rejected"]) for r in pairs.rows] == [("x", "z")]  # y and u tie: no pair


def iterate_config(tmp_path, tiny_model_dir, verifier, name="run", **overrides):
    values = dict(model=str(tiny_model_dir), verifier=verifier, iterations=2, prompts=6, samples=3,
                  max_new_tokens=6, max_steps=2, batch_size=4, eval_problems=2, precision="fp32",
                  learning_rate=1e-3, output_dir=str(tmp_path / name), sft_steps=0)
    values.update(overrides)
    return make_config(values, base=IterateConfig)


def test_two_iterations_each_train_from_the_last_model_against_it(tmp_path, tiny_model_dir, verifier_module):
    config = iterate_config(tmp_path, tiny_model_dir, verifier_module)
    summary = run_iterate(config)
    out = Path(config.output_dir)
    assert [r["iteration"] for r in summary["iterations"]] == [1, 2]
    for record in summary["iterations"]:
        folder = out / f"iter-{record['iteration']}"
        samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == record["samples"] == 18
        assert record["pairs"] == len((folder / "pairs.jsonl").read_text().splitlines()) > 0
        by_prompt = {}
        for sample in samples:
            by_prompt.setdefault(sample["prompt_index"], set()).add(sample["mark"])
        assert record["skipped_prompts"] == sum(len(marks) == 1 for marks in by_prompt.values())
        assert record["answer_total"] == 2 and 0 <= record["answer_accuracy"] <= 1
    first, second = summary["iterations"]
    assert first["model"] == str(tiny_model_dir) and second["model"] == first["next_model"]
    trained = json.loads((out / "iter-2" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert trained["logps/ref_chosen"] == trained["logps/chosen"]  # the reference of iteration 2 is M_1 itself
    assert (out / "report.html").is_file() and (out / "summary.json").is_file()


def test_a_resumed_loop_ends_where_an_uninterrupted_one_does(tmp_path, tiny_model_dir, verifier_module):
    whole = run_iterate(iterate_config(tmp_path, tiny_model_dir, verifier_module, "whole"))
    run_iterate(iterate_config(tmp_path, tiny_model_dir, verifier_module, "parts", iterations=1))
    with pytest.raises(ConfigError, match="--resume continues it"):
        run_iterate(iterate_config(tmp_path, tiny_model_dir, verifier_module, "parts"))
    with pytest.raises(ConfigError, match="prompts: 6 -> 5"):
        run_iterate(iterate_config(tmp_path, tiny_model_dir, verifier_module, "parts", prompts=5, resume=True))
    resumed = run_iterate(iterate_config(tmp_path, tiny_model_dir, verifier_module, "parts", resume=True))
    timing = ("minutes", "sampling_seconds", "samples_per_s", "tokens_per_s", "model", "next_model")
    for a, b in zip(whole["iterations"], resumed["iterations"]):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    final = [load_file(str(Path(s["final_model"]) / "model.safetensors")) for s in (whole, resumed)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="verifier"):
        make_config({"verifier": "nonsense"}, base=IterateConfig)
    with pytest.raises(ConfigError, match="--sft-steps"):
        make_config({"data": "prompts.jsonl", "sft_steps": 4}, base=IterateConfig)


# --- the reward model -----------------------------------------------------------------------------------

def test_a_reward_model_learns_the_pairs_and_judges_the_loop(tmp_path, tiny_model_dir, pairs_file, capsys):
    """Bradley–Terry on the tiny model: a fresh head gives every answer reward 0; trained on 16 pairs it ranks
    them (train reward accuracy 1); `rm score` writes every row's rewards; `--verifier rm:PATH` pairs by score."""
    from dpop.cli import main
    from dpop.improve.reward import load_reward_model, rewards

    model, _ = load_reward_model(str(tiny_model_dir))
    assert torch.equal(rewards(model, [[1, 2, 3], [4, 5]], pad_id=0), torch.zeros(2))
    out = tmp_path / "rm"
    assert main(["rm", "train", "--model", str(tiny_model_dir), "--data", str(pairs_file), "--output-dir", str(out),
                 "--max-steps", "60", "--batch-size", "8", "--learning-rate", "2e-3", "--precision", "fp32",
                 "--eval-data", str(pairs_file)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["reward_accuracy"] == 1.0 and summary["eval"]["pairs"] == 16
    scores = tmp_path / "scores.jsonl"
    assert main(["rm", "score", "--model", str(out / "final"), "--data", str(pairs_file), "--out", str(scores)]) == 0
    assert "reward accuracy 1.000 (16/16 pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 16 and all(row["reward_chosen"] > row["reward_rejected"] for row in rows)
    config = iterate_config(tmp_path, tiny_model_dir, f"rm:{out / 'final'}", "judged", iterations=1)
    record = run_iterate(config)["iterations"][0]
    assert record["pairs"] > 0 and record["sample_accuracy"] is None  # scores, not marks
