"""Our losses against TRL 1.16's own code, fed the same log-probs.

TRL's DPO losses live inside DPOTrainer._compute_loss, which runs the model, so we call that method unbound on
a stand-in carrying only the attributes it reads, with a stand-in model whose per-token log-probs we choose:
each response's sum spread evenly over its tokens, so TRL's sums, token counts and per-token means are the
ones we pass to preference_loss. TRL returns the batch-mean loss and logs batch-mean rewards, so per-pair
values are compared one pair at a time (batch of one). CPO/SimPO and ORPO come from TRL's experimental
trainers' loss methods (cpo_loss, odds_ratio_loss), which are per pair already.

Where we deliberately differ from TRL, a test below shows the difference and its comment says why.
"""

import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpop.losses import LOSSES, preference_loss

pytest.importorskip("trl")
with warnings.catch_warnings():  # "You are importing from 'trl.experimental'": we know
    warnings.simplefilter("ignore")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

# Three pairs: chosen rising, chosen falling, rejected ahead of chosen; lengths all different.
PAIRS = dict(policy_chosen_logps=[-10.0, -13.0, -21.5], policy_rejected_logps=[-14.0, -15.0, -9.25],
             ref_chosen_logps=[-11.0, -11.0, -20.0], ref_rejected_logps=[-12.0, -12.0, -10.0],
             chosen_lengths=[2, 4, 7], rejected_lengths=[4, 3, 5])
BETA = 0.3


def pairs(**overrides):
    values = {**PAIRS, **overrides}
    return {key: torch.tensor(value, dtype=torch.int64 if "lengths" in key else torch.float64)
            for key, value in values.items()}


def one_pair(inputs, index):
    return {key: value[index:index + 1] for key, value in inputs.items()}


def ours(name, inputs, beta=BETA, **options):
    return preference_loss(name, inputs["policy_chosen_logps"], inputs["policy_rejected_logps"],
                           inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], beta=beta,
                           chosen_lengths=inputs["chosen_lengths"], rejected_lengths=inputs["rejected_lengths"],
                           **options)


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_dpo(loss_types, inputs, beta=BETA, loss_weights=None, label_smoothing=0.0, discopop_tau=0.05, ld_alpha=None,
            log_sum_sq=None):
    """(batch-mean loss, batch-mean chosen reward, batch-mean rejected reward) from TRL's _compute_loss."""
    lengths = torch.cat([inputs["chosen_lengths"], inputs["rejected_lengths"]])  # rows: [chosen; rejected]
    sums = torch.cat([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]])
    rows, width = len(lengths), 1 + int(lengths.max())  # position 0 is the prompt
    positions = torch.arange(width)
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()  # (2B, T)
    shifted = completion_mask[:, 1:].to(sums.dtype)  # (2B, T−1): which shifted positions predict response
    token_logps = shifted * (sums / lengths.to(sums.dtype))[:, None]  # each response's sum spread evenly
    outputs = SimpleNamespace(log_probs=token_logps, entropy=torch.zeros_like(token_logps),
                              mean_logits=torch.zeros_like(token_logps), is_top1=torch.zeros_like(shifted).bool())
    if log_sum_sq is not None:  # (2B,) one value per sequence, spread over its tokens as the log-probs are
        outputs.log_sum_sq_probs = shifted * log_sum_sq[:, None]
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=list(loss_types),
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=log_sum_sq is not None, args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    batch = {"input_ids": torch.zeros(rows, width, dtype=torch.long), "attention_mask": torch.ones(rows, width),
             "completion_mask": completion_mask, "ref_chosen_logps": inputs["ref_chosen_logps"],
             "ref_rejected_logps": inputs["ref_rejected_logps"]}
    loss = DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, batch, return_outputs=False)
    metrics = stand_in._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


def trl_cpo(inputs, loss_type, beta=BETA, label_smoothing=0.0, simpo_gamma=0.5, average=False):
    stand_in = SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                               simpo_gamma=simpo_gamma, accelerator=_Accelerator())
    chosen, rejected = inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
    if average:  # TRL's concatenated_forward averages per token for 'simpo' (and 'ipo')
        chosen = chosen / inputs["chosen_lengths"]
        rejected = rejected / inputs["rejected_lengths"]
    return CPOTrainer.cpo_loss(stand_in, chosen, rejected)


# TRL loss_type -> (our name, our options, TRL keyword arguments)
SAME_DEFINITION = {
    "sigmoid": ("dpo", {}, {}),
    "hinge": ("hinge", {}, {}),
    "ipo": ("ipo", {}, {}),
    "robust": ("robust", {"label_smoothing": 0.2}, {"label_smoothing": 0.2}),
    "bco_pair": ("bco_pair", {}, {}),
    "sppo_hard": ("sppo_hard", {}, {}),
    "nca_pair": ("nca_pair", {}, {}),
    # TRL reads EXO's ε from label_smoothing (and refuses 0); ours is exo_epsilon, default 1e-3. Same math.
    "exo_pair": ("exo_pair", {"exo_epsilon": 1e-3}, {"label_smoothing": 1e-3}),
    "apo_zero": ("apo_zero", {}, {}),
    "apo_down": ("apo_down", {}, {}),
    "discopop": ("discopop", {"discopop_tau": 0.05}, {"discopop_tau": 0.05}),
    "sigmoid_norm": ("sigmoid_norm", {}, {}),
}


@pytest.mark.parametrize("trl_name", list(SAME_DEFINITION))
@pytest.mark.parametrize("index", [0, 1, 2])
def test_pairwise_losses_match_trl(trl_name, index):
    name, options, trl_kwargs = SAME_DEFINITION[trl_name]
    inputs = one_pair(pairs(), index)
    trl_loss, trl_chosen, trl_rejected = trl_dpo([trl_name], inputs, **trl_kwargs)
    losses, chosen, rejected = ours(name, inputs, **options)
    # TRL builds EXO's ε as an fp32 tensor, so its log(1 − ε) is rounded at ~1e−8.
    tolerance = 1e-7 if trl_name == "exo_pair" else 1e-9
    torch.testing.assert_close(losses, trl_loss.reshape(1), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(chosen.item(), trl_chosen, atol=1e-9, rtol=0)
    torch.testing.assert_close(rejected.item(), trl_rejected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_aot_matches_trl_over_a_batch(label_smoothing):
    """AOT is batch-level in TRL and here: compare the batch means (the only meaningful aggregate). The
    reference margins (−1, 1, −10) rank the pairs differently from the policy margins (4, 2, −12.25)."""
    inputs = pairs(ref_chosen_logps=[-13.0, -11.0, -20.0])
    trl_loss, trl_chosen, trl_rejected = trl_dpo(["aot"], inputs, label_smoothing=label_smoothing)
    losses, chosen, rejected = ours("aot", inputs, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses.mean(), trl_loss, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chosen.mean().item(), trl_chosen, atol=1e-9, rtol=0)
    assert not torch.allclose(losses.mean(), ours("dpo", inputs)[0].mean())  # sorting mattered here


@pytest.mark.parametrize("index", [0, 1, 2])
def test_rpo_matches_trl_sigmoid_plus_sft_per_pair(index):
    """TRL 1.16 has no 'rpo' loss type; DPO+NLL is loss_type ['sigmoid', 'sft'] with weights [1, α]."""
    inputs = one_pair(pairs(), index)
    trl_loss, _, _ = trl_dpo(["sigmoid", "sft"], inputs, loss_weights=[1.0, 0.7])
    torch.testing.assert_close(ours("rpo", inputs, rpo_alpha=0.7)[0], trl_loss.reshape(1), atol=1e-9, rtol=1e-9)


def test_rpo_nll_differs_from_trl_over_a_batch_of_unequal_lengths():
    """Deliberate difference: we average y_w's NLL per pair (−lw/|y_w|), then over pairs; TRL's 'sft' term
    averages over all chosen tokens of the batch (Σ −lw / Σ |y_w|), so a long response weighs more and a
    pair's loss depends on its batch-mates. Per pair keeps preference_loss per-pair, makes the loss
    independent of how pairs are grouped into micro-batches, and is Pang et al.'s per-sequence normalisation.
    The two agree when the chosen responses have equal lengths."""
    alpha = 0.7
    unequal = pairs()
    trl_loss, _, _ = trl_dpo(["sigmoid", "sft"], unequal, loss_weights=[1.0, alpha])
    ours_mean = ours("rpo", unequal, rpo_alpha=alpha)[0].mean()
    token_mean_nll = -unequal["policy_chosen_logps"].sum() / unequal["chosen_lengths"].sum()
    torch.testing.assert_close(trl_loss, ours("dpo", unequal)[0].mean() + alpha * token_mean_nll)
    assert abs(ours_mean - trl_loss) > 1e-3

    equal = pairs(chosen_lengths=[5, 5, 5])
    trl_loss, _, _ = trl_dpo(["sigmoid", "sft"], equal, loss_weights=[1.0, alpha])
    torch.testing.assert_close(ours("rpo", equal, rpo_alpha=alpha)[0].mean(), trl_loss, atol=1e-9, rtol=1e-9)


def test_sft_matches_trl_sft_over_a_batch_of_unequal_lengths():
    """Our sft is TRL's 'sft' loss type: the chosen responses' NLL per chosen token of the batch, Σ −lw / Σ |y_w|
    (the per-pair losses −lw over LossSpec.units, the chosen lengths: what the training loop divides by)."""
    inputs = pairs()
    trl_loss, _, _ = trl_dpo(["sft"], inputs)
    losses, _, _ = ours("sft", inputs)
    units = LOSSES["sft"].units(inputs["chosen_lengths"]).to(losses.dtype)
    torch.testing.assert_close(losses.sum() / units.sum(), trl_loss, atol=1e-9, rtol=1e-9)


def test_cdpo_matches_trl_conservative_sigmoid():
    """TRL 1.16's DPOTrainer has no standalone cDPO; its CPO 'sigmoid' loss with label_smoothing is the same
    label-smoothed BCE ("a conservative ... loss"). Fed the log-ratios lw − rw and ll − rl, its logits are Δ."""
    inputs = pairs()
    log_ratios = {"policy_chosen_logps": inputs["policy_chosen_logps"] - inputs["ref_chosen_logps"],
                  "policy_rejected_logps": inputs["policy_rejected_logps"] - inputs["ref_rejected_logps"]}
    trl_losses, _, _ = trl_cpo(log_ratios, "sigmoid", label_smoothing=0.2)
    torch.testing.assert_close(ours("cdpo", inputs, label_smoothing=0.2)[0], trl_losses, atol=1e-9, rtol=1e-9)


def test_simpo_matches_trl_without_its_nll_term():
    """TRL's SimPO is CPOTrainer with loss_type='simpo' on per-token averages; TRL adds cpo_alpha·NLL on top
    unless cpo_alpha = 0. Ours is the paper's SimPO (eq. 6), no NLL: compare with TRL's loss term alone."""
    inputs = pairs()
    trl_losses, trl_chosen, trl_rejected = trl_cpo(inputs, "simpo", beta=2.0, simpo_gamma=0.8, average=True)
    losses, chosen, rejected = ours("simpo", inputs, beta=2.0, simpo_gamma=0.8)
    torch.testing.assert_close(losses, trl_losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chosen, trl_chosen, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rejected, trl_rejected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_cpo_matches_trl_per_pair(index):
    """TRL's CPO loss = cpo_loss(...).mean() + cpo_alpha · (mean token NLL of the chosen responses); for one
    pair that NLL is −lw/|y_w|. (Over a batch of unequal lengths TRL's token mean differs from our per-pair
    mean, as for rpo above.)"""
    inputs = one_pair(pairs(), index)
    trl_losses, trl_chosen, trl_rejected = trl_cpo(inputs, "sigmoid")
    trl_total = trl_losses.mean() + 1.0 * (-inputs["policy_chosen_logps"] / inputs["chosen_lengths"])
    losses, chosen, rejected = ours("cpo", inputs, cpo_alpha=1.0)
    torch.testing.assert_close(losses, trl_total, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chosen, trl_chosen, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rejected, trl_rejected, atol=1e-9, rtol=1e-9)


def test_orpo_matches_trl():
    """TRL's ORPO loss = nll − odds_ratio_loss(...).mean(), with odds_ratio_loss = β·log σ(log odds ratio) on
    per-token averages and nll the chosen responses' mean token NLL (per pair here: −a_w). Per pair they agree;
    TRL computes in fp32 regardless of input dtype, hence the tolerance."""
    inputs = pairs(policy_chosen_logps=[-1.0, -3.0, -2.1], policy_rejected_logps=[-2.0, -1.5, -9.0])
    chosen_average = inputs["policy_chosen_logps"] / inputs["chosen_lengths"]
    rejected_average = inputs["policy_rejected_logps"] / inputs["rejected_lengths"]
    stand_in = SimpleNamespace(beta=BETA, accelerator=_Accelerator())
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(stand_in, chosen_average,
                                                                             rejected_average)
    losses, chosen, rejected = ours("orpo", inputs)
    torch.testing.assert_close(losses, (-chosen_average - trl_losses).double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen, trl_chosen.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rejected, trl_rejected.double(), atol=1e-6, rtol=1e-6)


def test_discopop_is_finite_where_trl_overflows():
    """Deliberate difference: TRL computes σ(ρ/τ)·exp(−ρ) as written, so for ρ < −88.7 in fp32 exp(−ρ) = inf
    while σ(ρ/τ) = 0, and 0·inf = NaN. We compute it as exp(log σ(ρ/τ) − ρ), which is 0 there; where TRL is
    finite the two agree (the tests above)."""
    inputs = {key: (value.float() if value.is_floating_point() else value)
              for key, value in pairs(policy_chosen_logps=[-10.0, -400.0, -21.5]).items()}
    inputs = one_pair(inputs, 1)  # Δ = (−400 + 11) − (−15 + 12) = −386, ρ = β·Δ = −115.8
    trl_loss, _, _ = trl_dpo(["discopop"], inputs, beta=BETA)
    losses, _, _ = ours("discopop", inputs)
    assert torch.isnan(trl_loss)
    torch.testing.assert_close(losses, torch.tensor([115.8]))  # −log σ(−115.8) = 115.8 (+ e^−115.8)


def test_every_trl_pairwise_loss_is_covered():
    """Every name DESIGN.md assigns to TRL's pairwise set is compared above (aot, rpo, cdpo separately)."""
    compared = {name for name, _, _ in SAME_DEFINITION.values()} | {"aot", "rpo", "cdpo", "simpo", "cpo", "orpo",
                                                                     "sft"}
    compared.add("kto")  # against TRL's KTOTrainer in test_kto.py
    # dpop is ours alone (TRL 1.16 has no DPOP); its form is pinned in test_losses.py.
    assert compared | {"dpop", "tdpo1", "tdpo2"} == set(LOSSES)  # TRL 1.16 has no DPOP and no TDPO


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_ld_alpha_matches_trl_ld_dpo(index, alpha):
    """LD-DPO: TRL weights the tokens of the longer response past the shorter one's length by α. Fed the same
    per-token log-probs (each response's sum spread evenly over its tokens, as the stand-in does), our
    reduce_token_logps gives the sums whose DPO loss is TRL's. The reference sums are given to both as they are
    (TRL's precomputed ones)."""
    from dpop.data.tokenize import TokenizedPair
    from dpop.scoring.batching import collate
    from dpop.scoring.logprobs import reduce_token_logps

    inputs = one_pair(pairs(), index)
    lengths = (int(inputs["chosen_lengths"]), int(inputs["rejected_lengths"]))
    pair = TokenizedPair((1, 2), tuple(range(10, 10 + lengths[0])), tuple(range(30, 30 + lengths[1])))
    batch = collate([pair], layout="plain", pad_id=0)
    sums = torch.cat([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]])
    token_logps = (sums / torch.tensor(lengths, dtype=sums.dtype))[batch.sequence_index]
    ours_logps = reduce_token_logps(token_logps, batch, ld_alpha=alpha)
    trl_loss, _, _ = trl_dpo(["sigmoid"], inputs, ld_alpha=alpha)
    ours_loss = preference_loss("dpo", ours_logps.chosen, ours_logps.rejected, inputs["ref_chosen_logps"],
                                inputs["ref_rejected_logps"], beta=BETA)[0]
    torch.testing.assert_close(ours_loss, trl_loss.reshape(1), atol=1e-9, rtol=1e-9)
    if lengths[0] != lengths[1] and alpha == 0.0:  # the longer one's tail is gone
        shorter = min(lengths)
        expected = sums / torch.tensor(lengths, dtype=sums.dtype) * shorter
        torch.testing.assert_close(torch.stack([ours_logps.chosen[0], ours_logps.rejected[0]]), expected)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_use_weighting_matches_trl_wpo(index):
    """WPO: TRL multiplies each pair's loss by exp(mean_t(log p_t − log Σ_v p_v²)) of its chosen and its rejected
    response. Fed the same per-token values, our wpo_weights and Objective(use_weighting) give TRL's loss."""
    from dpop.data.tokenize import TokenizedPair
    from dpop.losses import make_objective
    from dpop.scoring.batching import collate
    from dpop.scoring.logprobs import reduce_token_logps, wpo_weights

    inputs = one_pair(pairs(), index)
    lengths = (int(inputs["chosen_lengths"]), int(inputs["rejected_lengths"]))
    log_sum_sq = torch.tensor([-1.5, -0.75], dtype=torch.float64)  # chosen's, rejected's (per token)
    pair = TokenizedPair((1, 2), tuple(range(10, 10 + lengths[0])), tuple(range(30, 30 + lengths[1])))
    batch = collate([pair], layout="plain", pad_id=0)
    sums = torch.cat([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]])
    token_logps = (sums / torch.tensor(lengths, dtype=sums.dtype))[batch.sequence_index]
    policy = reduce_token_logps(token_logps, batch)
    policy.chosen_weights, policy.rejected_weights = wpo_weights(token_logps, log_sum_sq[batch.sequence_index], batch)
    ref = SimpleNamespace(chosen=inputs["ref_chosen_logps"], rejected=inputs["ref_rejected_logps"])
    objective = make_objective("dpo", use_weighting=True)
    ours = objective(policy, ref, beta=BETA).step_loss(objective.units_in_step(policy.chosen_lengths))
    trl_loss, _, _ = trl_dpo(["sigmoid"], inputs, log_sum_sq=log_sum_sq)
    torch.testing.assert_close(ours.double(), trl_loss.double(), atol=1e-6, rtol=1e-6)
