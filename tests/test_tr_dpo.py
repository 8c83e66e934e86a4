"""TR-DPO's reference updates (--sync-ref-model): the formula against TRL's callback, bf16-sr's master weights,
the refusals, and an exact resume that carries the moved reference."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dpop import precision
from dpop.config import make_config
from dpop.errors import ConfigError
from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer
from dpop.scoring.reference import LiveReference
from dpop.training.loop import train
from dpop.training.sync import ReferenceSync


def _fake_run(policy, reference, *, precision_name="fp32", every=2, alpha=0.6, seed=0):
    config = SimpleNamespace(precision=precision_name, seed=seed, loss="dpo", ref_model_sync_steps=every,
                             ref_model_mixup_alpha=alpha)
    weights = precision.trained_weights(policy, precision_name, seed)
    return SimpleNamespace(config=config, model=policy, weights=weights,
                           accelerator=SimpleNamespace(unwrap_model=lambda model: model),
                           reference=LiveReference(reference, lambda: torch.autocast("cpu", enabled=False)))


def test_the_update_is_trl_sync_ref_model_callback_and_only_on_due_steps():
    pytest.importorskip("trl")
    from trl.trainer.callbacks import SyncRefModelCallback

    tokenizer = make_tiny_tokenizer()
    policy, reference = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    expected = copy.deepcopy(reference)
    SyncRefModelCallback._sync_target_model(policy, expected, 0.6)
    sync = ReferenceSync(_fake_run(policy, reference, every=2, alpha=0.6))
    before = copy.deepcopy(reference.state_dict())
    assert not sync.after_step(3)  # not due: the reference is untouched
    for name, value in reference.state_dict().items():
        assert torch.equal(value, before[name])
    assert sync.after_step(4)
    for (name, ours), theirs in zip(reference.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_under_bf16_sr_the_master_weights_are_mixed():
    tokenizer = make_tiny_tokenizer()
    policy, reference = make_tiny_model(tokenizer, seed=0), make_tiny_model(tokenizer, seed=1)
    policy_masters = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reference_masters = {n: p.detach().clone() for n, p in reference.named_parameters()}
    run = _fake_run(policy, reference, precision_name="bf16-sr", every=1, alpha=0.25, seed=3)  # dithers the policy
    precision.dither_like_policy(reference, [n for n, _ in policy.named_parameters()], 3)
    sync = ReferenceSync(run)
    sync.after_step(1)
    mixed = sync.state_dict()  # the reference's masters
    for name, value in mixed.items():
        torch.testing.assert_close(value, 0.75 * reference_masters[name] + 0.25 * policy_masters[name], msg=name)
    with run.weights.masters():  # the policy was not changed
        for name, p in policy.named_parameters():
            assert torch.equal(p, policy_masters[name])


@pytest.mark.parametrize("values, message", [
    (dict(ref_strategy="precompute"), "live reference model"),
    (dict(ref_strategy="model", lora_r=4), "full fine-tune"),
])
def test_a_reference_that_cannot_move_is_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config({"sync_ref_model": True, **values})


def test_a_reference_free_loss_has_no_reference_to_move(tiny_config):
    with pytest.raises(ConfigError, match="needs a live reference model"):
        train(tiny_config("simpo", loss="simpo", sync_ref_model=True, ref_strategy="model", max_steps=1))


def test_a_resumed_tr_dpo_run_equals_an_uninterrupted_one(tiny_config):
    common = dict(loss="dpo", sync_ref_model=True, ref_strategy="model", ref_model_sync_steps=2,
                  ref_model_mixup_alpha=0.5, scheduler="constant", learning_rate=1e-3, batch_size=4, save_every=2)
    whole = train(tiny_config("whole", max_steps=4, **common)).model.state_dict()
    train(tiny_config("parts", max_steps=2, **common))
    assert (Path(tiny_config("parts").output_dir) / "checkpoints" / "step-2" / "reference.safetensors").is_file()
    resumed = train(tiny_config("parts", max_steps=4, resume=True, **common)).model.state_dict()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name
    fixed = train(tiny_config("fixed", max_steps=4, **dict(common, sync_ref_model=False))).model.state_dict()
    assert any(not torch.equal(fixed[name], value) for name, value in whole.items())  # the updates mattered
