"""KTO on unpaired rows: the row shape and its mismatched completions, the loss against hand-worked values and TRL's
KTO trainer, its reference point z0 (per micro-batch, detached, summed over processes), and training from the CLI."""

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpop.config import make_config
from dpop.data import load_pairs, pairs_from_rows
from dpop.data.order import micro_batches, optimizer_steps, pair_lengths
from dpop.data.unpaired import unpair
from dpop.errors import ConfigError, DataError
from dpop.losses import kto_reference_point, make_objective, preference_loss
from dpop.scoring.batching import make_batch
from dpop.scoring.logprobs import sequence_logps
from dpop.training.loop import train, train_step
from dpop.training.setup import setup


def rows_of(config) -> list[dict]:
    return [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- the rows -------------------------------------------------------------------------------------------

def test_unpaired_rows_load_as_text_and_as_messages(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "2 + 3 =", "completion": " 5", "label": True, "id": 1},
        {"prompt": "2 + 3 =", "completion": " 6", "label": False},
        {"prompt": "4 + 4 =", "completion": " 8", "label": True}]))
    loaded = load_pairs(path).pairs
    assert [(row.chosen, row.desirable) for row in loaded] == [(" 5", True), (" 6", False), (" 8", True)]
    assert loaded[0].metadata == {"id": 1}
    # each row's y' is the completion of a row with ANOTHER prompt
    assert loaded[0].rejected == " 8" and loaded[1].rejected == " 8"
    assert loaded[2].rejected in (" 5", " 6")
    chat = pairs_from_rows([{"prompt": [{"role": "user", "content": "a"}],
                             "completion": [{"role": "assistant", "content": "x"}], "label": False},
                            {"prompt": [{"role": "user", "content": "b"}],
                             "completion": {"role": "assistant", "content": "y"}, "label": True}]).pairs
    assert chat[0].rejected == ({"role": "assistant", "content": "y"},) and chat[0].desirable is False


def test_a_csv_label_reads_true_or_false(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\na,x,True\nb,y,false\n")
    assert [row.desirable for row in load_pairs(path).pairs] == [True, False]


def test_bad_unpaired_rows_are_named():
    with pytest.raises(DataError) as caught:
        pairs_from_rows([{"prompt": "a", "completion": "x", "label": 1},
                         {"prompt": "b", "completion": "y"},
                         {"prompt": [{"role": "user", "content": "c"}], "completion": "z", "label": True},
                         {"prompt": "d", "chosen": "p", "rejected": "q"}])
    text = str(caught.value)
    assert "row 1: field 'label': expected true (desirable) or false (undesirable), got int 1" in text
    assert "row 2: field 'label': missing" in text
    assert "row 3: field 'completion': is not of the same kind" in text
    assert "row 4: row shape 'explicit' differs from the file's shape 'unpaired'" in text


def test_rows_of_one_prompt_cannot_estimate_the_reference_point():
    with pytest.raises(DataError, match="at least 2 different prompts"):
        pairs_from_rows([{"prompt": "a", "completion": "x", "label": True},
                         {"prompt": "a", "completion": "y", "label": False}])


@pytest.mark.parametrize("size", [3, 5, 7, 16, 33])
def test_no_row_is_matched_with_its_own_prompt_whatever_the_count(size):
    """TRL pairs neighbours inside a batch: a batch of one matches a row with itself. Ours never does, and the
    choice is a function of the data alone."""
    rows = [{"prompt": f"p{i // 2}", "completion": f"c{i}", "label": i % 2 == 0} for i in range(size)]
    loaded = pairs_from_rows(rows).pairs
    by_completion = {row["completion"]: row["prompt"] for row in rows}
    assert all(by_completion[row.rejected] != row.prompt for row in loaded)
    assert [row.rejected for row in pairs_from_rows(rows).pairs] == [row.rejected for row in loaded]
    used = [row.rejected for row in loaded]  # each completion serves as a y' about once
    assert max(used.count(c) for c in set(used)) <= 3


def test_unpair_splits_each_pair_into_a_desirable_and_an_undesirable_row():
    pairs = pairs_from_rows([{"prompt": "a", "chosen": "x", "rejected": "y"},
                             {"prompt": "b", "chosen": "z", "rejected": "w"}]).pairs
    rows = unpair(pairs, where="test")
    assert [(row.prompt, row.chosen, row.desirable) for row in rows] == [
        ("a", "x", True), ("a", "y", False), ("b", "z", True), ("b", "w", False)]
    assert [row.source for row in rows[:2]] == ["rows row 1 (chosen)", "rows row 1 (rejected)"]
    assert all(row.rejected in ("z", "w") for row in rows[:2]) and all(row.rejected in ("x", "y") for row in rows[2:])


def test_the_loss_and_the_data_must_agree(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="add --unpair"):
        train(tiny_config("pairs", loss="kto"))
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "label": bool(i % 2)})
                              for i in range(4)))
    with pytest.raises(ConfigError, match="train them with --loss kto"):
        train(tiny_config("unpaired", loss="dpo", data=str(path)))
    for bad, message in (({"loss": "kto,sft"}, "cannot be mixed"), ({"use_weighting": True}, "use_weighting"),
                         ({"ld_alpha": 0.5}, "ld_alpha")):
        with pytest.raises(ConfigError, match=message):
            make_config({"loss": "kto", **bad})


# --- the loss -------------------------------------------------------------------------------------------

def kto(policy, ref, policy_kl, ref_kl, labels, beta=0.5, **options):
    tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return preference_loss("kto", tensor(policy), tensor(policy_kl), tensor(ref), tensor(ref_kl), beta=beta,
                           desirable=torch.tensor(labels), **options)


def test_kto_by_hand():
    """β 0.5; a desirable row with r = 1, an undesirable one with r = −0.5; the y' log-ratios 0.4 and 0.2: z0 0.3."""
    losses, chosen, rejected = kto([-9.0, -12.5], [-10.0, -12.0], [-20.0, -30.0], [-20.4, -30.2], [True, False],
                                   desirable_weight=1.5, undesirable_weight=0.5)
    expected = [1.5 * (1 - sigmoid(0.5 * (1.0 - 0.3))), 0.5 * (1 - sigmoid(0.5 * (0.3 + 0.5)))]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64))
    assert chosen[0] == pytest.approx(0.5) and math.isnan(chosen[1])
    assert rejected[1] == pytest.approx(-0.25) and math.isnan(rejected[0])
    # y' less likely under the policy than under the reference: z0 is clamped at 0
    losses, _, _ = kto([-9.0], [-10.0], [-21.0], [-20.0], [True])
    assert float(losses[0]) == pytest.approx(1 - sigmoid(0.5 * 1.0))
    # a policy equal to its reference: 0.5 for every row, whatever the label
    losses, _, _ = kto([-3.0, -4.0], [-3.0, -4.0], [-5.0, -6.0], [-5.0, -6.0], [True, False])
    assert losses.tolist() == [0.5, 0.5]


def test_z0_carries_no_gradient():
    policy_kl = torch.tensor([-20.0, -30.0], requires_grad=True)
    policy = torch.tensor([-9.0, -12.5], requires_grad=True)
    losses, _, _ = preference_loss("kto", policy, policy_kl, torch.tensor([-10.0, -12.0]), torch.tensor([-20.4, -30.2]),
                                   beta=0.5, desirable=torch.tensor([True, False]))
    losses.sum().backward()
    assert policy_kl.grad is None or not policy_kl.grad.any()
    assert policy.grad.abs().min() > 0
    assert float(kto_reference_point(torch.tensor([-20.0, -30.0]), torch.tensor([-20.4, -30.2]))) == pytest.approx(0.3)


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor


def trl_kto(policy, ref, policy_kl, ref_kl, labels, beta, desirable_weight, undesirable_weight):
    """(loss, logged metrics) of TRL 1.16's KTOTrainer._compute_loss on these sums, with a stand-in model whose
    single response position carries each sequence's sum."""
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.kto_trainer import KTOTrainer
    rows = len(labels)
    main_ids, kl_ids = torch.zeros(rows, 2, dtype=torch.long), torch.ones(rows, 2, dtype=torch.long)

    def model(**kwargs):
        sums = torch.tensor(policy_kl if kwargs["input_ids"] is kl_ids else policy, dtype=torch.float64)[:, None]
        return SimpleNamespace(log_probs=sums, entropy=torch.zeros_like(sums), mean_logits=torch.zeros_like(sums))

    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), calculate_KL=True, aux_loss_enabled=False,
        precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    stand_in._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(stand_in, model, batch)
    mask = torch.tensor([[0, 1]] * rows)
    batch = {"input_ids": main_ids, "attention_mask": torch.ones(rows, 2, dtype=torch.long), "completion_mask": mask,
             "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(rows, 2, dtype=torch.long),
             "KL_completion_mask": mask, "label": torch.tensor(labels),
             "ref_logps": torch.tensor(ref, dtype=torch.float64),
             "ref_KL_logps": torch.tensor(ref_kl, dtype=torch.float64)}
    loss = KTOTrainer._compute_loss(stand_in, model, batch, return_outputs=False)
    return loss, {key: values[-1] for key, values in stand_in._metrics["train"].items()}


@pytest.mark.parametrize("kl_shift, weights", [(0.5, (1.0, 1.0)), (-0.7, (1.0, 1.0)), (0.9, (1.33, 0.6))])
def test_kto_matches_trl(kl_shift, weights):
    policy, ref = [-9.0, -12.5, -7.25, -15.0, -11.0], [-10.0, -12.0, -8.0, -14.0, -11.5]
    ref_kl = [-20.0, -30.0, -25.0, -18.0, -22.0]
    policy_kl = [value + kl_shift + 0.1 * i for i, value in enumerate(ref_kl)]
    labels = [True, False, True, False, False]
    trl_loss, metrics = trl_kto(policy, ref, policy_kl, ref_kl, labels, 0.3, *weights)
    losses, chosen, rejected = kto(policy, ref, policy_kl, ref_kl, labels, beta=0.3, desirable_weight=weights[0],
                                   undesirable_weight=weights[1])
    assert float(losses.mean()) == pytest.approx(float(trl_loss), rel=1e-12)
    z0 = float(kto_reference_point(torch.tensor(policy_kl), torch.tensor(ref_kl)))
    assert z0 == pytest.approx(metrics["kl"], abs=1e-6)
    assert float(chosen.nanmean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-9)
    assert float(rejected.nanmean()) == pytest.approx(metrics["rewards/rejected"], rel=1e-9)


# --- z0 in a run ----------------------------------------------------------------------------------------

def test_a_single_row_batch_takes_z0_from_its_mismatched_pair(tiny_model_dir, tiny_model_saver, tmp_path):
    """Batch size 1: z0 comes from (x, y') with y' another prompt's completion, not from the row's own r."""
    from transformers import AutoModelForCausalLM

    from dpop.models.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_saver(tmp_path / "other", seed=3))
    from dpop.data.tokenize import tokenize_pairs

    rows = pairs_from_rows([{"prompt": "1 + 1 =", "completion": " 2", "label": True},
                            {"prompt": "5 + 3 =", "completion": " 80 apples", "label": False}]).pairs
    row = tokenize_pairs(rows, tokenizer, max_length=64).pairs[0]
    batch = make_batch([row], [0], layout="plain", pad_id=0)
    with torch.no_grad():
        mine, theirs = sequence_logps(policy, batch), sequence_logps(reference, batch)
    assert row.rejected_ids != row.chosen_ids
    if float(mine.rejected - theirs.rejected) < 0:  # the order of the two models in which y''s ratio is positive
        mine, theirs = theirs, mine
    z0 = float(make_objective("kto").reference_point(mine, theirs))
    assert z0 == pytest.approx(float(mine.rejected - theirs.rejected), abs=1e-6) and z0 > 0
    assert z0 != pytest.approx(max(0.0, float(mine.chosen - theirs.chosen)), abs=1e-3)


def test_z0_is_taken_per_micro_batch_and_the_step_accumulates_exactly(tiny_config, tiny_model_saver, tmp_path):
    """Batch 2 × grad_accum 2 against a different reference, so z0 > 0 from the first step: the logged loss is
    Σ over both micro-batches of each row's loss under ITS micro-batch's z0, over the step's 4 rows; kto/z0 the
    mean of the micro-batches' z0; the gradient that of that loss."""
    reference = tiny_model_saver(tmp_path / "reference", seed=5)
    config = tiny_config("kto", loss="kto", unpair=True, batch_size=2, grad_accum=2, max_steps=1,
                         ref_model=str(reference), ref_strategy="model", learning_rate=1e-3, max_grad_norm=0.0)
    run = setup(config)
    pairs = run.data.train.pairs
    step_batches = next(optimizer_steps(micro_batches(len(pairs), 2, config.seed, lengths=pair_lengths(pairs, config),
                                                      group_size=4), 2))
    expected, points = 0.0, []
    model = run.model
    model.zero_grad()
    for micro in step_batches:
        batch = make_batch(pairs, micro.pair_indices, **run.layout())
        policy = sequence_logps(model, batch)
        with torch.no_grad():
            ref = run.reference(batch, micro.pair_indices)
        z0 = kto_reference_point(policy.rejected, ref.rejected)
        points.append(float(z0))
        losses, _, _ = preference_loss("kto", policy.chosen, policy.rejected, ref.chosen, ref.rejected,
                                       beta=config.beta, desirable=batch.desirable, reference_point=z0)
        (losses.sum() / 4).backward()
        expected += float(losses.detach().sum()) / 4
    assert max(points) > 0 and points[0] != pytest.approx(points[1])  # so a z0 over the whole step would differ
    expected_grad = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                          if p.grad is not None]))
    model.zero_grad()
    row = train_step(run, step_batches)
    assert row["loss"] == pytest.approx(expected, rel=1e-6)
    assert row["kto/z0"] == pytest.approx(sum(points) / 2, rel=1e-6)
    assert row["grad_norm"] == pytest.approx(float(expected_grad), rel=1e-5)


def test_kto_trains_from_one_half_and_logs_by_label(tiny_config, eval_pairs_file):
    config = tiny_config("kto", loss="kto", unpair=True, batch_size=4, max_steps=3, learning_rate=1e-3,
                         eval_data=str(eval_pairs_file), desirable_weight=1.0, undesirable_weight=1.0)
    summary = train(config).summary
    rows = rows_of(config)
    first = rows[0]
    assert first["loss"] == 0.5 and first["kto/z0"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["rewards/accuracies"] is None and first["tokens/divergent_chosen_logp"] is None
    assert rows[2]["loss"] != pytest.approx(0.5, abs=1e-4)
    assert summary["eval"]["eval/kto/z0"] >= 0 and math.isnan(summary["eval"]["eval/pair_accuracy"])


def test_the_step_zero_loss_is_half_the_mean_weight(tiny_config):
    config = tiny_config("weighted", loss="kto", unpair=True, batch_size=32, max_steps=1, desirable_weight=2.0,
                         undesirable_weight=1.0)
    train(config)
    assert rows_of(config)[0]["loss"] == pytest.approx(0.5 * (2.0 + 1.0) / 2)  # 16 desirable, 16 undesirable rows


def test_a_resumed_kto_run_equals_the_uninterrupted_one(tiny_config, tiny_model_saver, tmp_path, monkeypatch):
    """z0 is recomputed from the policy at every micro-batch, so it holds no state a checkpoint could lose: the run
    dies in step 3 and is resumed from step 2's checkpoint, and ends bit-exactly where the whole run does."""
    from safetensors.torch import load_file
    from test_train_resume import train_until_a_crash_in_step

    policy = tiny_model_saver(tmp_path / "policy", seed=5)
    common = dict(loss="kto", unpair=True, model=str(policy), ref_model=str(tiny_config().model), max_steps=4,
                  save_every=2, learning_rate=1e-3, batch_size=3, grad_accum=2)
    whole = tiny_config("whole", **common)
    train(whole)
    train_until_a_crash_in_step(3, tiny_config("crashed", **common), monkeypatch)
    crashed = tiny_config("crashed", **common, resume=True)
    train(crashed)
    final = [load_file(str(Path(c.output_dir) / "final" / "model.safetensors")) for c in (whole, crashed)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    assert [r["kto/z0"] for r in rows_of(whole)] == [r["kto/z0"] for r in rows_of(crashed)]
    assert any(r["kto/z0"] > 0 for r in rows_of(whole))


def test_the_doctor_counts_labels_instead_of_edit_distances(tmp_path):
    from dpop.data.doctor import examine, format_report
    from dpop.models.tiny import make_tiny_tokenizer

    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}", "label": i % 3 != 0})
                              for i in range(6)))
    report = examine(path, tokenizer=make_tiny_tokenizer())
    assert report.labels == (4, 2) and report.edit_distances == []
    assert set(report.token_lengths) == {"prompt", "completion"}
    text = format_report(report)
    assert "6 unpaired rows (4 desirable, 2 undesirable)" in text
    assert "ratio 2, outside the KTO paper's [1, 4/3]" in text and "--loss kto" in text


def test_data_make_writes_unpaired_rows(tmp_path):
    from dpop.cli import main

    out = tmp_path / "kto.jsonl"
    assert main(["data", "make", "arithmetic", "--n", "5", "--unpaired", "--out", str(out)]) == 0
    rows = load_pairs(out).pairs
    assert [row.desirable for row in rows] == [True, False] * 5
    assert all(isinstance(row.metadata["answer"], int) for row in rows)  # the task checker's answer is kept
