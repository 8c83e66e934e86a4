"""DESIGN.md §1's token-level gradients (the DPOP paper's §3 analysis, seed 000), checked with autograd.

Toy softmax model over a vocabulary of V tokens. A response y = (y_0, y_1, y_2) is scored token by token,
    logits_t(context) = position_bias_t + Σ_{u<t} context_embedding[y_u] + (θ if t == K else 0),
with everything frozen except θ (V,), the logits parameter of the later position K = 2. y_w and y_l differ
only in their first token, so at position K the two contexts differ and so do the softmaxes:
    s(y_w) = softmax(logits_K(y_w's prefix)),  s(y_l) = softmax(logits_K(y_l's prefix)),
and both responses carry the same correct next token i at K. Since ∂ log s_i / ∂θ_j = 1[i = j] − s_j, with
Δ = (lw − rw) − (ll − rl) and the ASCENDED objective J = −loss:

DPO,  J = log σ(βΔ):
    ∂J/∂θ_j = β·σ(−βΔ) · (s_j(y_l) − s_j(y_w))                                   for every j
DPOP, J = log σ(z), z = β(Δ − λ·max(0, rw − lw)), when πθ(y_w) < πref(y_w) (so ∂z/∂lw = β(1 + λ)):
    ∂J/∂θ_j = β·σ(−z) · (λ(1 − s_i(y_w)) + s_i(y_l) − s_i(y_w))                 at j = i
    ∂J/∂θ_j = β·σ(−z) · (−(λ + 1)·s_j(y_w) + s_j(y_l))                           at j ≠ i

So the proportionality constant is exactly β·σ(−βΔ) for DPO and β·σ(−z) for DPOP: β enters once, from the
chain rule through βΔ (the penalty is inside the same β), and σ(−·) = 1 − σ(·) is the derivative of log σ.
The tests divide autograd's gradient by the bracket and check that the quotient is that constant for every j.
"""

import pytest
import torch

from dpop.losses import preference_loss

V = 7  # vocabulary
K = 2  # the later position whose logits carry θ
PROMPT_LENGTH = 2  # tokens of the (shared) prompt, part of every context


def toy_model(seed, correct_token):
    generator = torch.Generator().manual_seed(seed)
    position_bias = torch.randn(PROMPT_LENGTH + 3, V, generator=generator, dtype=torch.float64)
    context_embedding = torch.randn(V, V, generator=generator, dtype=torch.float64) * 1.5
    prompt = torch.randint(V, (PROMPT_LENGTH,), generator=generator)
    first_w, first_l = torch.randperm(V, generator=generator)[:2].tolist()  # the one differing token
    middle = int(torch.randint(V, (1,), generator=generator))
    chosen = [first_w, middle, correct_token]
    rejected = [first_l, middle, correct_token]
    return position_bias, context_embedding, prompt, chosen, rejected


def response_logp_and_softmax_at_k(theta, model, response):
    """(log π(response | prompt), softmax at position K), summing over response tokens only."""
    position_bias, context_embedding, prompt, _, _ = model
    tokens = prompt.tolist() + response
    total = torch.zeros((), dtype=torch.float64)
    softmax_at_k = None
    for t, token in enumerate(response):
        position = PROMPT_LENGTH + t
        logits = position_bias[position] + context_embedding[tokens[:position]].sum(0)
        if t == K:
            logits = logits + theta
            softmax_at_k = torch.softmax(logits, -1).detach()
        total = total + torch.log_softmax(logits, -1)[token]
    return total, softmax_at_k


def ascended_gradient(loss_name, seed, correct_token, beta, ref_offset, **options):
    """θ's gradient of −loss, the softmaxes at K in both contexts, and the loss's σ argument pieces."""
    model = toy_model(seed, correct_token)
    theta = torch.randn(V, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    theta.requires_grad_(True)
    chosen_logp, s_chosen = response_logp_and_softmax_at_k(theta, model, model[3])
    rejected_logp, s_rejected = response_logp_and_softmax_at_k(theta, model, model[4])
    # The reference: constants. ref_offset > 0 puts the chosen log-prob BELOW the reference's (DPOP active).
    ref_chosen = chosen_logp.detach() + ref_offset
    ref_rejected = rejected_logp.detach() - 0.3
    losses, _, _ = preference_loss(loss_name, chosen_logp.reshape(1), rejected_logp.reshape(1),
                                   ref_chosen.reshape(1), ref_rejected.reshape(1), beta=beta, **options)
    (gradient,) = torch.autograd.grad(-losses.sum(), theta)
    margin = (chosen_logp - ref_chosen) - (rejected_logp - ref_rejected)
    penalty = (ref_chosen - chosen_logp).clamp(min=0)
    return gradient, s_chosen, s_rejected, margin.detach(), penalty.detach()


CASES = [(seed, correct_token, beta) for seed, correct_token, beta in
         [(0, 3, 0.1), (1, 0, 0.3), (2, 6, 1.0), (3, 2, 2.5)]]


@pytest.mark.parametrize("seed,correct_token,beta", CASES)
def test_dpo_gradient_is_softmax_difference(seed, correct_token, beta):
    gradient, s_w, s_l, margin, _ = ascended_gradient("dpo", seed, correct_token, beta, ref_offset=0.7)
    bracket = s_l - s_w  # s_j(y_l) − s_j(y_w), every j
    assert bracket.abs().min() > 1e-6  # the contexts really differ, so the division below is safe
    factor = beta * torch.sigmoid(-beta * margin)  # β·σ(−βΔ)
    torch.testing.assert_close(gradient / bracket, factor.expand(V), atol=1e-10, rtol=1e-9)
    assert abs(gradient.sum()) < 1e-12  # softmax gradients sum to 0: DPO only moves mass between tokens


@pytest.mark.parametrize("seed,correct_token,beta", CASES)
@pytest.mark.parametrize("dpop_lambda", [1.0, 50.0])
def test_dpop_gradient_when_chosen_below_reference(seed, correct_token, beta, dpop_lambda):
    gradient, s_w, s_l, margin, penalty = ascended_gradient("dpop", seed, correct_token, beta, ref_offset=0.7,
                                                            dpop_lambda=dpop_lambda)
    assert penalty > 0  # πθ(y_w) < πref(y_w)
    i = correct_token
    bracket = -(dpop_lambda + 1) * s_w + s_l  # j ≠ i
    bracket[i] = dpop_lambda * (1 - s_w[i]) + s_l[i] - s_w[i]  # j = i
    z = beta * (margin - dpop_lambda * penalty)
    factor = beta * torch.sigmoid(-z)  # β·σ(−z)
    torch.testing.assert_close(gradient / bracket, factor.expand(V), atol=1e-10, rtol=1e-9)
    assert abs(gradient.sum()) < 1e-10  # the brackets sum to λ − (λ + 1) + 1 = 0 over j, like any softmax's


@pytest.mark.parametrize("seed,correct_token,beta", CASES)
def test_dpop_gradient_is_dpo_gradient_when_chosen_not_below_reference(seed, correct_token, beta):
    dpo, *_ = ascended_gradient("dpo", seed, correct_token, beta, ref_offset=-0.7)
    dpop, _, _, _, penalty = ascended_gradient("dpop", seed, correct_token, beta, ref_offset=-0.7,
                                               dpop_lambda=50.0)
    assert penalty == 0
    torch.testing.assert_close(dpop, dpo, atol=0, rtol=0)


def find_case_where_dpo_lowers_the_correct_token():
    """A toy model in which y_w's context already favours token i more than y_l's (s_i(y_w) > s_i(y_l))."""
    for seed in range(200):
        for correct_token in range(V):
            _, s_w, s_l, _, _ = ascended_gradient("dpo", seed, correct_token, 0.3, ref_offset=0.7)
            if s_w[correct_token] > s_l[correct_token] + 0.05:
                return seed, correct_token
    raise AssertionError("no such toy model in the search range")


def test_dpo_can_lower_the_correct_token_and_dpop_does_not():
    """The failure mode the formulas predict: where s_i(y_w) > s_i(y_l), DPO's push on θ_i is negative (it
    lowers the probability of y_w's correct token after the differing one); DPOP's λ(1 − s_i(y_w)) term
    turns it positive once the chosen log-prob has fallen below the reference."""
    seed, correct_token = find_case_where_dpo_lowers_the_correct_token()
    dpo, *_ = ascended_gradient("dpo", seed, correct_token, 0.3, ref_offset=0.7)
    dpop, *_ = ascended_gradient("dpop", seed, correct_token, 0.3, ref_offset=0.7, dpop_lambda=50.0)
    assert dpo[correct_token] < 0 < dpop[correct_token]
