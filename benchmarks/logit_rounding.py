"""How far bf16 moves a response's summed log-prob from fp32's, and how much of that is the lm head's rounding.

    .venv/bin/python benchmarks/logit_rounding.py            # 16 builtin low-edit pairs, ~1 minute on 2 cores

Same weights (the builtin model), same token ids; for each of the 32 responses, its summed log-prob:
- fp32: everything in fp32 (the yardstick);
- bf16, rounded logits: the decoder under bf16 autocast, logits from a bf16 matmul (output rounded to bf16);
- bf16, shipped: the decoder under bf16 autocast, then dpop's fused head (dpop.scoring.logprobs), which takes
  the target token's logit as an fp32 dot product of the same bf16 inputs;
- bf16, fp32 logits: the decoder under bf16 autocast, every logit an fp32 matmul of the bf16 inputs (what a
  GPU's fp32-output bf16 matmul would give; on CPU it costs a matmul at a quarter of the bf16 rate).
Prints the rms and max difference from fp32 of each, chosen and rejected apart (docs/performance.md quotes it).
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    from dpop.data.rows import pairs_from_rows
    from dpop.data.tokenize import tokenize_pair
    from dpop.models import load_model
    from dpop.scoring.logprobs import token_logps_chunked
    from dpop.tasks.arithmetic import make_pairs

    model, tokenizer = load_model(args.model)
    model.float().eval()
    head = model.get_output_embeddings()
    weight = head.weight
    pairs = pairs_from_rows(make_pairs(args.pairs, edit="low", seed=args.seed)).pairs
    sums = {name: [] for name in ("fp32", "bf16, rounded logits", "bf16, shipped", "bf16, fp32 logits")}
    with torch.no_grad():
        for pair in pairs:
            tokenized = tokenize_pair(pair, tokenizer)
            for response in (tokenized.chosen_ids, tokenized.rejected_ids):
                ids = torch.tensor([list(tokenized.prompt_ids) + list(response)])
                targets = torch.tensor(response)
                states = slice(-len(response) - 1, -1)  # the states that predict the response's tokens
                hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, states]
                sums["fp32"].append(_logp(hidden @ weight.T, targets))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, states]
                    sums["bf16, shipped"].append(float(token_logps_chunked(hidden, targets, head, model.config).sum()))
                h, w = hidden.bfloat16(), weight.bfloat16()
                sums["bf16, rounded logits"].append(_logp((h @ w.T).float(), targets))
                sums["bf16, fp32 logits"].append(_logp(h.float() @ w.float().T, targets))
    yardstick = torch.tensor(sums["fp32"], dtype=torch.float64)
    print(f"{len(yardstick)} responses of {len(pairs)} pairs; summed log-prob minus fp32's, nats")
    print(f"{'':22s} {'rms':>7s} {'max':>7s} {'chosen rms':>11s} {'rejected rms':>13s}")
    for name, values in sums.items():
        error = torch.tensor(values, dtype=torch.float64) - yardstick
        rms = lambda e: float(e.pow(2).mean().sqrt())  # noqa: E731
        print(f"{name:22s} {rms(error):7.3f} {float(error.abs().max()):7.3f} {rms(error[0::2]):11.3f} "
              f"{rms(error[1::2]):13.3f}")


def _logp(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum())


if __name__ == "__main__":
    main()
