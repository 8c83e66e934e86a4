"""A Bradley–Terry reward model: a scalar head on a causal LM's backbone (`dpop rm train`, `dpop rm score`).

    dpop rm train --data pairs.jsonl --output-dir runs/rm        # runs/rm/final: a model dir
    dpop rm score --model runs/rm/final --data held_out.jsonl --out scores.jsonl
    dpop iterate --verifier rm:runs/rm/final                     # the loop's judge where no checker exists

The reward r(x, y) is a linear head (no bias) on the backbone's last hidden state at the last token of
[prompt | response], tokenised exactly as training tokenises pairs (dpop.data.tokenize). Trained on pairs with
the Bradley–Terry loss −log σ(r(x, y_w) − r(x, y_l)) (seed 004, §2.1), its reward accuracy is the fraction of
pairs with r(x, y_w) > r(x, y_l). The model is stored as transformers' sequence-classification model with one
label, so `AutoModelForSequenceClassification.from_pretrained(RUN/final)` loads it too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from dpop.errors import ModelError

logger = logging.getLogger(__name__)


def load_reward_model(path: str):
    """(sequence-classification model with one output, tokenizer) from a model name or dir; a causal LM gets a new
    zero-initialised head (its reward starts at 0 for every answer)."""
    from transformers import AutoModelForSequenceClassification

    from dpop.models import load_tokenizer, resolve_model

    local = resolve_model(path)
    if local.suffix == ".gguf":
        raise ModelError(f"{path}: a reward model needs a model dir (convert the .gguf with `dpop train` first)")
    tokenizer = load_tokenizer(local)
    model = AutoModelForSequenceClassification.from_pretrained(local, num_labels=1, dtype=torch.float32)
    config = json.loads((local / "config.json").read_text())
    if "ForSequenceClassification" not in "".join(config.get("architectures") or []):
        torch.nn.init.zeros_(model.score.weight)  # a fresh head: every reward starts at 0
    if model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        model.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    return model, tokenizer


def rewards(model, sequences: list[list[int]], *, pad_id: int) -> torch.Tensor:
    """r for each token sequence (B,) fp32: the head on the last real token's hidden state (right padding)."""
    width = max(len(s) for s in sequences)
    device = next(model.parameters()).device
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    last = hidden[torch.arange(len(sequences), device=device), mask.sum(1).to(device) - 1]
    return model.score(last).squeeze(-1).float()


def _pair_sequences(pairs) -> tuple[list[list[int]], list[list[int]]]:
    return ([list(p.prompt_ids) + list(p.chosen_ids) for p in pairs],
            [list(p.prompt_ids) + list(p.rejected_ids) for p in pairs])


def _tokenized(path, tokenizer, max_length: int):
    from dpop.data import load_pairs
    from dpop.data.tokenize import tokenize_pairs

    return tokenize_pairs(load_pairs(path).pairs, tokenizer, max_length=max_length, max_prompt_length=max_length // 2)


@torch.no_grad()
def score_pairs(model, pairs, *, batch_size: int, pad_id: int, autocast=contextlib.nullcontext) -> tuple:
    """(chosen rewards, rejected rewards), each (N,), of tokenised pairs."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        part = pairs[start:start + batch_size]
        sequences_w, sequences_l = _pair_sequences(part)
        with autocast():
            scores = rewards(model, sequences_w + sequences_l, pad_id=pad_id)
        chosen.append(scores[:len(part)].cpu())
        rejected.append(scores[len(part):].cpu())
    return torch.cat(chosen), torch.cat(rejected)


def train_reward_model(config) -> dict:
    """`dpop rm train` (config: a dpop.config.commands.RmTrainConfig); returns the summary in RUN/summary.json."""
    from tqdm.auto import tqdm

    from dpop.data.order import micro_batches
    from dpop.reporting.report import wilson_interval, write_atomic
    from dpop.scoring.pairs import autocast_for

    out = Path(config.output_dir)
    if (out / "summary.json").exists() and not config.overwrite:
        from dpop.errors import ConfigError

        raise ConfigError(f"{out} holds a finished reward model; --overwrite replaces it")
    torch.manual_seed(config.seed)
    model, tokenizer = load_reward_model(config.model)
    pad_id = model.config.pad_token_id
    train = _tokenized(config.data, tokenizer, config.max_length).pairs
    held_out = _tokenized(config.eval_data, tokenizer, config.max_length).pairs if config.eval_data else []
    autocast = autocast_for(config.precision, torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * per_epoch))
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    stream = micro_batches(len(train), config.batch_size, config.seed)
    model.train()
    started, row = time.perf_counter(), {}
    for step in tqdm(range(1, total + 1), desc="reward model", unit="step"):
        batch = [train[i] for i in next(stream).pair_indices]
        sequences_w, sequences_l = _pair_sequences(batch)
        with autocast():
            scores = rewards(model, sequences_w + sequences_l, pad_id=pad_id)
        margin = scores[:len(batch)] - scores[len(batch):]
        loss = -torch.nn.functional.logsigmoid(margin).mean()  # Bradley–Terry: −log σ(r_w − r_l)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:  # linear decay to 0 over the run
            group["lr"] = config.learning_rate * (1 - step / total)
        margin = margin.detach()
        row = {"step": step, "split": "train", "loss": float(loss.detach()),
               "rewards/accuracies": float((margin > 0).float().mean()), "rewards/margins": float(margin.mean())}
        log.write(json.dumps(row) + "\n")
    log.close()
    summary = {"steps": total, "train_pairs": len(train), "train": row,
               "minutes": round((time.perf_counter() - started) / 60, 2)}
    if held_out:
        chosen, rejected = score_pairs(model, held_out, batch_size=config.batch_size * 2, pad_id=pad_id)
        correct = int((chosen > rejected).sum())
        summary["eval"] = {"reward_accuracy": correct / len(held_out), "pairs": len(held_out),
                           "interval_95": list(wilson_interval(correct, len(held_out)))}
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    logger.info("dpop: reward model: %d steps, train reward accuracy %.3f%s; saved to %s", total,
                row["rewards/accuracies"], (f", held-out reward accuracy {summary['eval']['reward_accuracy']:.3f} "
                                            f"({len(held_out)} pairs)" if held_out else ""), out / "final")
    return summary


def score_file(config) -> dict:
    """`dpop rm score`: every row's two rewards (written to config.out as JSONL) and the reward accuracy."""
    from dpop.reporting.report import wilson_interval, write_atomic

    model, tokenizer = load_reward_model(config.model)
    data = _tokenized(config.data, tokenizer, config.max_length)
    chosen, rejected = score_pairs(model, data.pairs, batch_size=config.batch_size, pad_id=model.config.pad_token_id)
    correct = int((chosen > rejected).sum())
    result = {"reward_accuracy": correct / len(data.pairs), "pairs": len(data.pairs),
              "interval_95": list(wilson_interval(correct, len(data.pairs))),
              "mean_margin": float((chosen - rejected).mean())}
    if config.out:
        write_atomic(config.out, "".join(json.dumps({"source": p.source, "reward_chosen": float(c),
                                                     "reward_rejected": float(r)}) + "\n"
                                         for p, c, r in zip(data.pairs, chosen, rejected)))
    low, high = result["interval_95"]
    print(f"reward accuracy {result['reward_accuracy']:.3f} ({correct}/{len(data.pairs)} pairs, 95% {low:.3f}–"
          f"{high:.3f}); mean margin r_w − r_l {result['mean_margin']:+.3f}"
          + (f"; scores in {config.out}" if config.out else ""))
    return result


class RewardScorer:
    """A reward model as `dpop iterate`'s verifier: (completion, row) -> r(x, y), a float."""

    def __init__(self, path: str):
        self.model, self.tokenizer = load_reward_model(path)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, completion: str, row: dict) -> float:
        from dpop.data.pairs import PreferencePair
        from dpop.data.tokenize import tokenize_pair

        answer = ([{"role": "assistant", "content": completion}] if isinstance(row["prompt"], (list, tuple))
                  else completion)
        prompt = tuple(row["prompt"]) if isinstance(row["prompt"], list) else row["prompt"]
        pair = tokenize_pair(PreferencePair(prompt, answer, answer, "sample"), self.tokenizer)
        sequence = list(pair.prompt_ids) + list(pair.chosen_ids)
        return float(rewards(self.model, [sequence], pad_id=self.model.config.pad_token_id)[0])
