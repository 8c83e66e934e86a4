"""`dpop eval` and evaluate_model on a tiny model: the metrics against a naive per-sequence computation, the
reference-dependent keys, answer accuracy, the table and the JSON file."""

import copy
import json
import math

import pytest
import torch

import dpop.evaluation.generate
from dpop.cli import main
from dpop.data import load_pairs
from dpop.data.tokenize import tokenize_pairs
from dpop.evaluation.evaluate import evaluate_model
from dpop.models import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def naive_logp(model, prompt_ids, response_ids) -> float:
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(logps[positions, torch.tensor(response_ids)].sum())


def test_metrics_match_a_naive_computation(tiny, eval_pairs_file):
    model, tokenizer = tiny
    pairs = load_pairs(eval_pairs_file).pairs
    results = evaluate_model(model, tokenizer, pairs, ref_model=model, batch_size=4, max_length=256,
                             generate=False)
    tokenized = tokenize_pairs(pairs, tokenizer, max_length=256, max_prompt_length=128).pairs
    chosen = [naive_logp(model, p.prompt_ids, p.chosen_ids) for p in tokenized]
    rejected = [naive_logp(model, p.prompt_ids, p.rejected_ids) for p in tokenized]
    assert results["num_pairs"] == len(tokenized) == 6
    assert results["pair_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 6)
    assert results["logps/chosen"] == pytest.approx(sum(chosen) / 6, abs=1e-3)
    assert results["logps/rejected"] == pytest.approx(sum(rejected) / 6, abs=1e-3)
    # the model is its own reference: every reward and delta is 0, reward accuracy (strict >) is 0
    assert results["rewards/chosen"] == results["logps/chosen_delta"] == 0.0
    assert results["rewards/accuracies"] == 0.0
    assert results["tokens/divergent_chosen_logp"] < 0
    assert results["answer_accuracy"] is None and results["num_answer_rows"] == 0


def test_without_a_reference_the_reward_keys_are_none(tiny, pairs_file):
    model, tokenizer = tiny
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()[:4]]  # row dicts are accepted
    results = evaluate_model(model, tokenizer, rows, batch_size=2, max_length=256, generate=False,
                             precision="auto")
    for key in ("rewards/accuracies", "rewards/chosen", "logps/ref_chosen", "logps/chosen_delta"):
        assert results[key] is None, key
    assert 0.0 <= results["pair_accuracy"] <= 1.0 and results["logps/chosen"] < 0


def test_answer_accuracy_scores_the_generations(tiny, eval_pairs_file, monkeypatch):
    model, tokenizer = tiny
    pairs = load_pairs(eval_pairs_file).pairs
    # the real generation path first: a random tiny model writes garbage, but the number is computed
    results = evaluate_model(model, tokenizer, pairs, batch_size=4, max_length=256, max_new_tokens=4)
    assert results["num_answer_rows"] == 6 and 0.0 <= results["answer_accuracy"] <= 1.0

    answers = {str(pair.prompt): pair.metadata["answer"] for pair in pairs}

    def half_right(model, tokenizer, prompts, **kwargs):
        return [f"So the answer is {answers[str(p)] + (i % 2)}." for i, p in enumerate(prompts)]

    monkeypatch.setattr(dpop.evaluation.generate, "generate_texts", half_right)
    results = evaluate_model(model, tokenizer, pairs, batch_size=4, max_length=256)
    assert results["answer_accuracy"] == 0.5


def test_dpop_eval_prints_a_table_and_writes_json(tiny_model_dir, eval_pairs_file, tmp_path, capsys):
    out = tmp_path / "eval" / "results.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir), "--data",
                 str(eval_pairs_file), "--max-new-tokens", "3", "--precision", "fp32", "--max-length", "256",
                 "--out", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "pair_accuracy" in table and "answer_accuracy" in table and "tokens/divergent_chosen_logp" in table
    results = json.loads(out.read_text())
    assert results["num_pairs"] == 6 and results["ref_model"] == str(tiny_model_dir)
    assert results["rewards/margins"] == 0.0 and math.isfinite(results["logps/chosen"])
    assert results["answer_accuracy"] is not None


@pytest.mark.parametrize("argv, message", [
    (["--beta", "0"], "beta: must be > 0.0"),
    (["--max-length", "1"], "max_length: must be >= 2"),
    (["--data", "missing.jsonl"], "missing.jsonl"),
])
def test_dpop_eval_errors_are_one_line_without_traceback(argv, message, tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _count_reference_calls(monkeypatch) -> list:
    import dpop.scoring.reference

    calls = []
    real_call = dpop.scoring.reference.LiveReference.__call__
    monkeypatch.setattr(dpop.scoring.reference.LiveReference, "__call__",
                        lambda self, batch, indices: calls.append(tuple(indices)) or real_call(self, batch, indices))
    return calls


def test_reference_memo_scores_the_reference_once_and_changes_nothing(tiny, eval_pairs_file, monkeypatch):
    model, tokenizer = tiny
    reference = copy.deepcopy(model)
    pairs = load_pairs(eval_pairs_file).pairs
    plain = evaluate_model(model, tokenizer, pairs, ref_model=reference, batch_size=4, max_length=256,
                           generate=False)
    calls = _count_reference_calls(monkeypatch)
    memo = {}
    first = evaluate_model(model, tokenizer, pairs, ref_model=reference, batch_size=4, max_length=256,
                           generate=False, ref_memo=memo)
    batches = len(calls)
    second = evaluate_model(model, tokenizer, pairs, ref_model=reference, batch_size=4, max_length=256,
                            generate=False, ref_memo=memo)
    assert batches == len(memo) == 2 and len(calls) == batches  # 6 pairs in batches of 4: scored once, reused
    assert first == second == plain


def test_a_model_scored_against_itself_runs_once_and_fills_the_memo(tiny, eval_pairs_file, monkeypatch):
    model, tokenizer = tiny
    pairs = load_pairs(eval_pairs_file).pairs
    against_copy = evaluate_model(model, tokenizer, pairs, ref_model=copy.deepcopy(model), batch_size=4,
                                  max_length=256, generate=False)
    calls = _count_reference_calls(monkeypatch)
    memo = {}
    itself = evaluate_model(model, tokenizer, pairs, ref_model=model, batch_size=4, max_length=256,
                            generate=False, ref_memo=memo)
    assert calls == [] and len(memo) == 2
    assert itself == against_copy and itself["rewards/margins"] == 0.0 and itself["logps/chosen_delta"] == 0.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # a different policy, scored against the first through the memo
    later = evaluate_model(other, tokenizer, pairs, ref_model=model, batch_size=4, max_length=256,
                           generate=False, ref_memo=memo)
    fresh = evaluate_model(other, tokenizer, pairs, ref_model=model, batch_size=4, max_length=256, generate=False)
    assert len(calls) == 2  # only the fresh evaluation ran the reference
    assert later == fresh and later["logps/chosen_delta"] != 0.0


def test_generation_stops_a_row_once_it_says_so(tiny):
    model, tokenizer = tiny
    prompts = ["What is 2 + 3?", "What is 7 × 6?"]
    seen = []

    def after_three_tokens(text):
        seen.append(text)
        return len(seen) > 2 * 2  # both rows done at the third new token

    dpop.evaluation.generate.generate_texts(model, tokenizer, prompts, max_new_tokens=12, progress=False,
                                 stop_when=after_three_tokens)
    assert len(seen) == 2 * 3  # asked after each of 3 tokens for each row, then generation ended


def _peaky(tiny):
    """The tiny model with larger random weights, so its next-token distributions are far from uniform."""
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5) if parameter.dim() > 1 else None
    return model, tokenizer


def test_greedy_decoding_drops_finished_rows_and_matches_generate(tiny):
    from transformers import StoppingCriteriaList

    model, tokenizer = _peaky(tiny)  # larger random weights: the greedy tokens then differ from row to row
    prompts = ["What is 2 + 3?", "Seven times six, please: what is it?", "1 + 1?", "Add 12 and 30 and 5, then say it."]
    encoded = [dpop.evaluation.generate.prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    done = lambda ids: len(ids) >= 2 + ids[0] % 7  # rows finish at different steps, set by their first token  # noqa: E731

    rows_per_call = []
    hook = model.register_forward_hook(lambda module, args, kwargs, out: rows_per_call.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    try:
        new = dpop.evaluation.generate.decode_ids(model, input_ids, attention_mask, max_new_tokens=10,
                                       eos_token_id=tokenizer.eos_token_id, done=done)
    finally:
        hook.remove()
    assert len({len(ids) for ids in new}) > 1  # the rows did finish at different steps
    assert rows_per_call[0] == len(prompts) and rows_per_call == sorted(rows_per_call, reverse=True)
    assert rows_per_call[-1] < len(prompts)  # finished rows left the batch

    class Done:  # the same rule as a generate() stopping criterion
        def __call__(self, ids, scores, **kwargs):
            return torch.tensor([done(row[width:].tolist()) for row in ids])

    for row in range(len(prompts)):  # HF's generate, one row at a time (no padding effects)
        generated = model.generate(input_ids=input_ids[row:row + 1], attention_mask=attention_mask[row:row + 1],
                                   do_sample=False, max_new_tokens=10, pad_token_id=pad,
                                   eos_token_id=tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([Done()]))
        expected = [t for t in generated[0, width:].tolist() if t != tokenizer.eos_token_id]
        assert new[row] == expected


def test_sampling_draws_from_the_tempered_softmax(tiny):
    model, tokenizer = _peaky(tiny)
    prompt = dpop.evaluation.generate.prompt_ids(tokenizer, "What is 2 + 3?")
    temperature, draws = 0.8, 4000
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float() / temperature, -1)
    input_ids = torch.tensor([prompt] * draws)
    first = dpop.evaluation.generate.decode_ids(model, input_ids, torch.ones_like(input_ids), max_new_tokens=1,
                                                eos_token_id=None, temperature=temperature,
                                                generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(torch.tensor([ids[0] for ids in first]), minlength=probs.numel()).double()
    likely = probs > 0.02
    assert likely.sum() >= 2  # more than one token is in play
    sigma = (draws * probs * (1 - probs)).sqrt()
    assert ((counts - draws * probs).abs()[likely] < 5 * sigma[likely]).all()
    rest = probs[~likely].sum().double()  # the unlikely tokens together, as one outcome
    assert abs(counts[~likely].sum() - draws * rest) < 5 * (draws * rest * (1 - rest)).sqrt() + 1


def test_sampling_is_seeded_and_tends_to_greedy_at_low_temperature(tiny):
    model, tokenizer = _peaky(tiny)
    prompts = ["What is 2 + 3?", "1 + 1?"] * 4
    sample = lambda temperature, seed: dpop.evaluation.generate.generate_texts(  # noqa: E731
        model, tokenizer, prompts, max_new_tokens=8, batch_size=3, temperature=temperature, seed=seed,
        progress=False)
    assert sample(1.0, 0) == sample(1.0, 0)
    assert sample(1.0, 0) != sample(1.0, 1)
    assert sample(1e-4, 5) == sample(0.0, 0)  # every draw is the argmax once T is small


def test_greedy_decoding_reports_each_finished_row_once(tiny):
    model, tokenizer = tiny
    input_ids = torch.tensor([dpop.evaluation.generate.prompt_ids(tokenizer, "What is 2 + 3?")] * 3)
    finished = []
    new = dpop.evaluation.generate.decode_ids(model, input_ids, torch.ones_like(input_ids), max_new_tokens=4,
                                   eos_token_id=None, done=lambda ids: len(ids) >= 2, on_finished=finished.append)
    assert [len(ids) for ids in new] == [2, 2, 2] and finished == [3]
    finished.clear()
    assert dpop.evaluation.generate.decode_ids(model, input_ids, torch.ones_like(input_ids), max_new_tokens=0,
                                    eos_token_id=None, on_finished=finished.append) == [[], [], []]
    assert finished == [3]


def test_generation_renders_a_plain_text_prompt_exactly_as_training_tokenized_it(tiny):
    """A plain-text pair prompt is trained on as raw text; answer accuracy and `dpop generate --data` must
    continue that same text, not the prompt wrapped in the chat template (which the model never saw)."""
    from dpop.data.pairs import PreferencePair
    from dpop.data.tokenize import tokenize_pair

    _, tokenizer = tiny
    assert tokenizer.chat_template  # the trap needs a tokenizer that has a template
    pair = PreferencePair(prompt="Tom has 12 apples. How many? ", chosen="12.", rejected="13.", source="t:1")
    trained = list(tokenize_pair(pair, tokenizer).prompt_ids)
    assert dpop.evaluation.generate.prompt_ids(tokenizer, pair.prompt) == trained
    typed = dpop.evaluation.generate.prompt_ids(tokenizer, pair.prompt, as_user_turn=True)  # `dpop generate --prompt TEXT`
    assert typed != trained and tokenizer.decode(typed).startswith("<|im_start|>user")


def test_dpop_eval_maps_columns(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "renamed.jsonl"
    data.write_text(json.dumps({"question": "2 + 3?", "good": "5", "bad": "6"}) + "\n")
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--no-generate", "--precision", "fp32",
                 "--columns", "prompt=question,chosen=good,rejected=bad"])
    assert code == 0 and "pair_accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--no-generate"]) != 0  # unmapped
