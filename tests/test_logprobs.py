"""The one log-prob routine: chunked == naive full logits, every layout == plain, the divergence quantities,
and a memory bound that holds as vocab x tokens grows."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dpop.data.textdiff import first_difference
from dpop.data.tokenize import TokenizedPair
from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer
from dpop.scoring.batching import collate
from dpop.scoring.logprobs import sequence_logps


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model(tokenizer, seed=1), tokenizer


def random_pairs(vocab: int, n: int = 5, seed: int = 0) -> list[TokenizedPair]:
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        def draw(k):
            return torch.randint(5, vocab, (k,), generator=generator).tolist()
        chosen = draw(4 + 2 * i)
        rejected = chosen[: i % 3] + draw(3 + i % 4)  # shares a prefix of 0-2 tokens with chosen
        pairs.append(TokenizedPair(tuple(draw(3 + i)), tuple(chosen), tuple(rejected)))
    return pairs


def naive_sequence_logp(model, prompt, response) -> torch.Tensor:
    """Full (T, V) logits of one unpadded sequence, log_softmax, pick the response tokens."""
    ids = torch.tensor([list(prompt) + list(response)])
    logps = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logps[positions, torch.tensor(response)].sum()


def test_chunked_equals_naive_values_and_gradients(tiny):
    model, tokenizer = tiny
    pairs = random_pairs(len(tokenizer))
    batch = collate(pairs, layout="plain", pad_id=tokenizer.pad_token_id)
    model.zero_grad()
    ours = sequence_logps(model, batch, chunk_tokens=7)  # chunks that cut through sequences
    (ours.chosen.sum() - 0.5 * ours.rejected.sum()).backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chosen = torch.stack([naive_sequence_logp(model, p.prompt_ids, p.chosen_ids) for p in pairs])
    rejected = torch.stack([naive_sequence_logp(model, p.prompt_ids, p.rejected_ids) for p in pairs])
    (chosen.sum() - 0.5 * rejected.sum()).backward()
    torch.testing.assert_close(ours.chosen, chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.rejected, rejected, atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["shared", "packed"])
def test_layouts_equal_plain(tiny, layout):
    """Prefix sharing and padding-free packing give the plain layout's log-probs and gradients (fp32)."""
    model, tokenizer = tiny
    pairs = random_pairs(len(tokenizer), n=6, seed=3)
    results = {}
    for name in ("plain", layout):
        model.zero_grad()
        batch = collate(pairs, layout=name, pad_id=tokenizer.pad_token_id, pack_length=48)
        logps = sequence_logps(model, batch)
        (logps.chosen.sum() + 2 * logps.rejected.sum()).backward()
        results[name] = (logps, {n: p.grad.clone() for n, p in model.named_parameters()}, batch)
    (plain, plain_grads, plain_batch), (other, other_grads, other_batch) = results["plain"], results[layout]
    torch.testing.assert_close(other.chosen, plain.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(other.rejected, plain.rejected, atol=1e-5, rtol=0)
    for name in plain_grads:
        torch.testing.assert_close(other_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert other_batch.num_input_tokens < plain_batch.num_input_tokens  # the prompt is encoded once
    if layout == "packed":
        assert other_batch.input_ids.shape[0] < len(pairs)  # several pairs share a row


def test_the_divergent_token_mean_starts_after_the_first_differing_token(tiny):
    """Pinned by hand: chosen [a b c d], rejected [a X c d] differ at position 1; the Figure 4 quantity averages
    positions 2 and 3 (c, d), the shared prefix is position 0 (a), and the differing token b is in neither."""
    from dpop.data.tokenize import TokenizedPair
    from dpop.scoring.logprobs import reduce_token_logps

    pair = TokenizedPair(prompt_ids=(5, 6), chosen_ids=(7, 8, 9, 10), rejected_ids=(7, 11, 9, 10))
    batch = collate([pair], layout="plain", pad_id=0)
    chosen_tokens = (batch.sequence_index == 0)
    token_logps = torch.zeros(len(batch.target_ids))
    token_logps[chosen_tokens] = torch.tensor([-1.0, -2.0, -3.0, -5.0])  # a, b, c, d
    logps = reduce_token_logps(token_logps, batch)
    assert float(logps.divergent_chosen_mean()[0]) == -4.0  # (c + d) / 2, not (b + c + d) / 3
    assert float(logps.shared_prefix[0]) == -1.0 and float(logps.chosen[0]) == -11.0


def test_divergence_quantities(tiny):
    model, tokenizer = tiny
    pairs = random_pairs(len(tokenizer), n=4, seed=5)
    batch = collate(pairs, layout="shared", pad_id=tokenizer.pad_token_id)
    logps = sequence_logps(model, batch, per_token=True)
    for p, pair in enumerate(pairs):
        first_diff = first_difference(pair.chosen_ids, pair.rejected_ids)
        assert int(batch.divergence[p]) == first_diff
        per_token = torch.stack([
            naive_sequence_logp(model, pair.prompt_ids + pair.chosen_ids[:k], pair.chosen_ids[k:k + 1])
            for k in range(len(pair.chosen_ids))])
        torch.testing.assert_close(logps.shared_prefix[p], per_token[:first_diff].sum(), atol=1e-5, rtol=0)
        after = per_token[first_diff + 1:]  # strictly after the first differing token (DPOP Fig. 4)
        if len(after):
            torch.testing.assert_close(logps.divergent_chosen_mean()[p], after.mean(), atol=1e-5, rtol=0)
        else:
            assert torch.isnan(logps.divergent_chosen_mean()[p])
        torch.testing.assert_close(logps.chosen[p], per_token.sum(), atol=1e-5, rtol=0)


def test_log_softmax_runs_in_fp32_under_bf16_autocast(tiny):
    model, tokenizer = tiny
    batch = collate(random_pairs(len(tokenizer)), layout="shared", pad_id=tokenizer.pad_token_id)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = sequence_logps(model, batch)
    assert logps.chosen.dtype == torch.float32
    reference = sequence_logps(model, batch)
    assert (logps.chosen - reference.chosen).abs().max() < 0.5  # bf16 matmuls, fp32 softmax: close


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys, torch
    from dpop.scoring.logprobs import token_logps_chunked
    mode, tokens, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    head = torch.nn.Linear(64, vocab, bias=False)
    hidden = torch.randn(tokens, 64, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    class Config: pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        logps = token_logps_chunked(hidden, targets, head, Config(), chunk_tokens=128)
    else:
        logps = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    logps.sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_growth_bytes": (after - before) * 1024}))
""")


def _peak_growth(mode: str, tokens: int, vocab: int) -> int:
    # glibc serves big blocks from its heap once a freed mmap raised its threshold, and then keeps freed
    # memory resident; a fixed mmap threshold makes every large tensor its own mapping, returned on free,
    # so peak RSS tracks the bytes actually allocated at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode, str(tokens), str(vocab)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_bytes"]


def test_chunked_peak_memory_stays_bounded():
    """Peak resident memory (allocated bytes, not time) of forward + backward, in a fresh process each.

    Full logits at 4096 tokens x 32768 vocab are 512 MiB in fp32 (the naive path holds several such
    buffers); the chunked path holds one 128-token chunk (16 MiB) at a time, so its peak must stay far below
    one full-logits buffer and must barely grow when tokens x vocab grows 16x.
    """
    full_logits = 4096 * 32768 * 4
    naive = _peak_growth("naive", 4096, 32768)
    chunked_small = _peak_growth("chunked", 1024, 8192)
    chunked_large = _peak_growth("chunked", 4096, 32768)
    assert naive > full_logits  # the probe does see the full-logits allocation
    assert chunked_large < full_logits / 4
    assert chunked_large < naive / 8
    assert chunked_large - chunked_small < full_logits / 8  # 16x the work, nowhere near 16x the memory


@pytest.mark.parametrize("sub_rows", [128, 3])  # 3: every chunk of 10 rows is done in several pieces
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_linear_head_matches_log_softmax_with_gradients(autocast, sub_rows, monkeypatch):
    """The hand-written backward of the fused head equals autograd through log_softmax + gather."""
    import dpop.scoring.logprobs
    from dpop.scoring.logprobs import _fused_head, token_logps_chunked

    monkeypatch.setattr(dpop.scoring.logprobs, "_SUB_ROWS", sub_rows)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = torch.randn(37)  # a non-uniform upstream gradient

    class Config:
        pass

    assert _fused_head(head, Config())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = token_logps_chunked(hidden, targets, head, Config(), chunk_tokens=10)
        naive = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    (fused * weights).sum().backward()
    fused_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    (naive * weights).sum().backward()
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, naive, **tolerance)
    torch.testing.assert_close(fused_grads[0], hidden.grad, **tolerance)
    torch.testing.assert_close(fused_grads[1], head.weight.grad, **tolerance)


def test_under_bf16_the_fused_head_takes_the_target_logit_in_fp32():
    """A bf16 matmul rounds its output: at logits near 20 by up to 1/16. The fused head recomputes each target's
    logit in fp32 from the same bf16 inputs, so its log-prob is the softmax over the rounded logits with the
    exact target logit, not the all-rounded log_softmax."""
    from dpop.scoring.logprobs import token_logps_chunked

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    head.weight.data = (head.weight.data * 8).bfloat16().float()  # on the bf16 grid: only outputs are rounded
    hidden = torch.randn(200, 64).bfloat16().float()
    targets = torch.randint(0, 300, (200,))

    class Config:
        pass

    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = token_logps_chunked(hidden, targets, head, Config())
        rounded = head(hidden).float()
    exact = hidden.double() @ head.weight.double().T
    with_exact_target = rounded.double().scatter(-1, targets[:, None], exact.gather(-1, targets[:, None]))
    expected = torch.log_softmax(with_exact_target, -1).gather(-1, targets[:, None]).squeeze(-1)
    all_rounded = torch.log_softmax(rounded.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert exact.abs().max() > 16  # logits where a bf16 step is 1/8
    torch.testing.assert_close(fused.double(), expected, atol=1e-4, rtol=0)
    assert (fused.double() - all_rounded).abs().max() > 0.02  # the rounded target logit would differ


def test_heads_with_an_output_transform_take_the_generic_path():
    from dpop.scoring.logprobs import _fused_head

    class Softcapped:
        final_logit_softcapping = 30.0

    assert not _fused_head(torch.nn.Linear(4, 8, bias=False), Softcapped())
    assert not _fused_head(torch.nn.Linear(4, 8, bias=True), object())
