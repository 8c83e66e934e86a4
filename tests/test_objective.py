"""Loss mixtures (`--loss dpop,sft --loss-weights 1,1`): each component keeps its own normalisation, is logged
as loss/NAME, and the loop still never branches on a loss name."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpop.errors import ConfigError
from dpop.losses import make_objective, preference_loss
from dpop.training.loop import train


def _policy():
    return SimpleNamespace(chosen=torch.tensor([-10.0, -13.0, -21.5]), rejected=torch.tensor([-14.0, -15.0, -9.25]),
                           chosen_lengths=torch.tensor([2, 4, 7]), rejected_lengths=torch.tensor([4, 3, 5]))


def _ref():
    return SimpleNamespace(chosen=torch.tensor([-11.0, -11.0, -20.0]), rejected=torch.tensor([-12.0, -12.0, -10.0]))


def test_a_mixture_is_the_weighted_sum_of_each_component_under_its_own_normalisation():
    policy, ref = _policy(), _ref()
    objective = make_objective("dpop,sft", "1,0.5", {"dpop_lambda": 20})
    output = objective(policy, ref, beta=0.3)
    units = objective.units_in_step(policy.chosen_lengths)
    assert units == {"dpop": 3.0, "sft": 13.0}
    dpop = preference_loss("dpop", policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.3,
                           dpop_lambda=20)[0].mean()
    sft = -policy.chosen.sum() / policy.chosen_lengths.sum()  # 44.5 / 13
    torch.testing.assert_close(output.step_loss(units), dpop + 0.5 * sft)
    # rewards come from the first component that has them (sft has none)
    torch.testing.assert_close(output.chosen_rewards, 0.3 * (policy.chosen - ref.chosen))
    assert make_objective("sft,dpo", None)(policy, ref, beta=0.3).chosen_rewards.isfinite().all()


def test_a_single_loss_is_a_mixture_of_one():
    policy, ref = _policy(), _ref()
    objective = make_objective("dpo")
    output = objective(policy, ref, beta=0.1)
    expected = preference_loss("dpo", policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta=0.1)[0]
    torch.testing.assert_close(output.step_loss(objective.units_in_step(policy.chosen_lengths)), expected.mean())
    assert not objective.reference_free and objective.uses_rejected
    assert make_objective("sft").reference_free and not make_objective("sft").uses_rejected
    assert make_objective("simpo,sft").reference_free and make_objective("dpo,sft").uses_rejected


@pytest.mark.parametrize("loss, weights, message", [
    ("dpop,sft", "1", "1 weight\\(s\\) for 2 loss"),
    ("dpop,dpop", None, "names a loss twice"),
    ("dpop,sft", "1,-1", "must be >= 0"),
    ("dpop,sft", "0,0", "not all 0"),
    ("dpop,sft", "1,x", "expected numbers"),
])
def test_bad_mixtures_are_refused(loss, weights, message):
    with pytest.raises(ConfigError, match=message):
        make_objective(loss, weights)


def test_a_mixture_trains_and_logs_each_component(tiny_config):
    config = tiny_config("mix", loss="dpop,sft", loss_weights="1,0.5", max_steps=2, batch_size=4)
    summary = train(config).summary
    train_dir = Path(config.output_dir)
    row = json.loads((train_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss"] == pytest.approx(row["loss/dpop"] + 0.5 * row["loss/sft"], rel=1e-6)
    assert row["loss/dpop"] == pytest.approx(0.6931471805599453, abs=1e-5)  # step 0: policy = reference
    assert row["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert summary["steps"] == 2 and train_dir.joinpath("final").is_dir()


@pytest.mark.parametrize("settings", [dict(loss="dpop,sft", loss_weights="1,1"), dict(loss="dpo", ld_alpha=0.5),
                                      dict(loss="dpo", use_weighting=True)], ids=["mixture", "ld_alpha", "wpo"])
def test_a_mixture_and_the_switches_accumulate_exactly(tiny_config, settings):
    """Batch 4 x 1 and batch 2 x 2 take the same step: each component divides by the whole step's units, so the
    gradient's norm (the weights after Adam's first step would hide a scale error: it moves each weight by about
    ±lr whatever the gradient's size) and the logged losses agree."""
    rows = {}
    for name, batch, accum in (("whole", 4, 1), ("split", 2, 2)):
        config = tiny_config(name, max_steps=1, batch_size=batch, grad_accum=accum, learning_rate=1e-3, **settings)
        train(config)
        rows[name] = json.loads((Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("grad_norm", "loss", "loss/dpop", "loss/sft"):
        if key in rows["whole"]:
            assert rows["split"][key] == pytest.approx(rows["whole"][key], rel=1e-5), key


@pytest.mark.parametrize("ref_strategy", ["precompute", "model"])
def test_ld_alpha_weights_policy_and_reference_alike(tiny_config, dpop_cache, ref_strategy):
    """LD-DPO's α applies to the policy's sums and the reference's (precomputed or live): the first step starts at
    ln 2 with zero rewards, and the sums are not the plain ones (the pairs' responses differ in length)."""
    plain = tiny_config(f"plain-{ref_strategy}", loss="dpo", max_steps=1, batch_size=4, ref_strategy=ref_strategy)
    weighted = tiny_config(f"ld-{ref_strategy}", loss="dpo", max_steps=1, batch_size=4, ld_alpha=0.5,
                           ref_strategy=ref_strategy)
    rows = {}
    for config in (plain, weighted):
        train(config)
        rows[config.ld_alpha] = json.loads((Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    row = rows[0.5]
    assert row["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert row["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and row["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert row["logps/rejected"] != pytest.approx(rows[None]["logps/rejected"], rel=1e-3)
    if ref_strategy == "precompute":  # the weighted reference pass has its own cache entry
        assert len(list((dpop_cache / "reference").glob("*.safetensors"))) == 2


def test_the_docs_table_of_losses_is_the_registry():
    """docs/losses.md's registry table is what `dpop losses --markdown` prints: regenerate it when a loss changes."""
    from dpop.reporting.registry import BEGIN, END, markdown_table

    text = (Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    assert text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip() == markdown_table()


def test_wpo_weights_come_from_the_policys_own_token_distribution(tiny_config, tiny_model_dir):
    """token_log_sum_sq is log Σ_v p_v² of the full softmax; a use_weighting run starts at ln 2 times the mean of
    the pairs' weight products (all in (0, 1]), below ln 2."""
    from dpop.models import load_model
    from dpop.scoring.logprobs import backbone_and_head, token_log_sum_sq

    model, _ = load_model(str(tiny_model_dir))
    hidden = torch.randn(300, model.config.hidden_size)
    head = backbone_and_head(model)[1]
    expected = torch.log((torch.softmax(head(hidden).float(), dim=-1) ** 2).sum(-1))
    torch.testing.assert_close(token_log_sum_sq(hidden, head, model.config), expected, atol=1e-5, rtol=1e-5)

    config = tiny_config("wpo", loss="dpo", use_weighting=True, max_steps=1, batch_size=4)
    train(config)
    row = json.loads((Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < row["loss"] < 0.6931471805599453 and row["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("switches", [dict(loss="dpop,sft", loss_weights="1,0.5"), dict(loss="dpo", ld_alpha=0.5),
                                      dict(loss="dpo", use_weighting=True),
                                      dict(loss="tdpo2", ref_strategy="model")],
                         ids=["mixture", "ld_alpha", "use_weighting", "tdpo2"])
def test_a_resumed_run_with_each_switch_equals_an_uninterrupted_one(tiny_config, switches):
    """2 steps, a checkpoint, then resumed to 4: the weights of a 4-step run, bit for bit."""
    common = dict(scheduler="constant", learning_rate=1e-3, batch_size=4, save_every=2, **switches)
    whole = train(tiny_config("whole", max_steps=4, **common)).model.state_dict()
    train(tiny_config("parts", max_steps=2, **common))
    resumed = train(tiny_config("parts", max_steps=4, resume=True, **common)).model.state_dict()
    assert all(torch.equal(resumed[name], value) for name, value in whole.items())
