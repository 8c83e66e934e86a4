"""Batched generation: `dpop generate`, and the answer-accuracy part of `dpop eval` and the demo.

    dpop generate --prompt "What is 2 + 3?"
    dpop generate --model runs/train/final --data pairs.jsonl --out generations.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def prompt_ids(tokenizer, prompt, *, as_user_turn: bool = False) -> list[int]:
    """Token ids of a prompt exactly as training renders it (dpop.data.tokenize): the chat template for
    messages, plain text as it is. `as_user_turn` wraps plain text as one user message first when the
    tokenizer has a chat template: for a question typed by hand to an instruct model, not for data rows."""
    from dpop.data.tokenize import _encode_text, render_prompt

    if as_user_turn and isinstance(prompt, str) and getattr(tokenizer, "chat_template", None):
        prompt = ({"role": "user", "content": prompt},)
    text, templated = render_prompt(tokenizer, prompt)
    return _encode_text(tokenizer, text, special=not templated)


@torch.no_grad()
def decode_ids(model, input_ids, attention_mask, *, max_new_tokens: int, eos_token_id: int | None,
               temperature: float = 0.0, generator: torch.Generator | None = None, done=None,
               on_finished=None) -> list[list[int]]:
    """Decoding of left-padded prompts with a KV cache that drops each row from the batch once it is finished
    (EOS, max_new_tokens, or `done(new ids)`), so a batch stops paying for rows that are done: every step's
    matmuls and cache hold only live rows. Returns each row's new ids, EOS excluded.

    Greedy when temperature is 0: then the tokens are generate(do_sample=False)'s (the same positions, from
    the attention mask, the same cache and argmax). Otherwise each token is drawn from softmax(logits / T) in
    fp32 with `generator` (no top-k or top-p truncation). `on_finished(n)` is told each time n rows finish."""
    from transformers import DynamicCache

    new: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    if max_new_tokens < 1:
        if on_finished is not None:
            on_finished(len(new))
        return new
    cache = DynamicCache(config=model.config)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    positions = positions[:, -1:]
    live = list(range(input_ids.shape[0]))  # batch row j holds prompt live[j]
    for _ in range(max_new_tokens):
        tokens = _next_tokens(logits[:, -1], temperature, generator)
        keep = []
        for j, token in enumerate(tokens.tolist()):
            if token == eos_token_id:
                continue
            ids = new[live[j]]
            ids.append(token)
            if len(ids) < max_new_tokens and not (done is not None and done(ids)):
                keep.append(j)
        if on_finished is not None and len(keep) < len(live):
            on_finished(len(live) - len(keep))
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            tokens, attention_mask, positions = tokens[index], attention_mask[index], positions[index]
            live = [live[j] for j in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
        positions = positions + 1
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True).logits
    return new  # every row ends inside the loop: at max_new_tokens at the latest


def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Each row's next token: the argmax, or a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts, *, max_new_tokens: int = 128, batch_size: int = 16,
                   temperature: float = 0.0, as_user_turn: bool = False, progress: bool = True, seed: int = 0,
                   stop_when=None) -> list[str]:
    """Generate a completion for each prompt (text or messages, rendered as training renders them; see
    prompt_ids for `as_user_turn`); greedy when temperature is 0.

    Prompts are sorted by length so each batch pads little, and left-padded so generation continues
    from every prompt's last token. `stop_when(text) -> bool` ends a row early (besides EOS and
    max_new_tokens), e.g. once it has stated its answer. Finished rows leave their batch (decode_ids).
    Sampling draws from one generator seeded with `seed`, so a rerun samples the same texts.
    """
    from tqdm.auto import tqdm

    encoded = [prompt_ids(tokenizer, p, as_user_turn=as_user_turn) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    bar = tqdm(total=len(encoded), desc="generating", unit="prompt", disable=not progress or len(encoded) < 2)
    done = (lambda ids: stop_when(tokenizer.decode(ids, skip_special_tokens=True))) if stop_when else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = encoded[i]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        new_ids = decode_ids(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id, temperature=temperature, generator=generator,
                             done=done, on_finished=bar.update)
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(new_ids[row], skip_special_tokens=True).strip()
    bar.close()
    model.train(was_training)
    return outputs


def run_generate(args) -> int:
    """`dpop generate` (args: a dpop.config.commands.GenerateConfig)."""
    from dpop.config import parse_columns
    from dpop.models import load_model

    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if args.prompt is not None:
        print(generate_texts(model, tokenizer, [args.prompt], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, as_user_turn=not args.raw, progress=False)[0])
        return 0
    from dpop.data import load_pairs

    pairs = load_pairs(args.data, columns=parse_columns(args.columns)).pairs
    texts = generate_texts(model, tokenizer, [p.prompt for p in pairs], max_new_tokens=args.max_new_tokens,
                           batch_size=args.batch_size, temperature=args.temperature)
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for pair, text in zip(pairs, texts):
            prompt = pair.prompt if isinstance(pair.prompt, str) else list(pair.prompt)
            out.write(json.dumps({"source": pair.source, "prompt": prompt, "generation": text}, ensure_ascii=False) + "\n")
    finally:
        if args.out:
            out.close()
            print(f"wrote {len(texts)} generations to {Path(args.out)}", file=sys.stderr)
    return 0
