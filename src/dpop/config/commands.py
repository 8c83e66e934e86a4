"""The options of `dpop eval`, `dpop generate` and `dpop landscape`, as fields like TrainConfig's: each flag,
its default, bounds and help are written once, here or in the TrainConfig field it shares (β, max_length,
columns, precision, ...), and `--help` is generated from them (dpop.config.flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from dpop.config import TrainConfig, _opt
from dpop.errors import ConfigError

_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _like(name: str, help: str | None = None, default=dataclasses.MISSING):
    """The TrainConfig field `name` (default, bounds, choices, help), for a command that takes the same option."""
    shared = _TRAIN_FIELDS[name]
    metadata = dict(shared.metadata)
    if help is not None:
        metadata["help"] = help
    return dataclasses.field(default=shared.default if default is dataclasses.MISSING else default,
                             metadata=metadata)


_MODEL_HELP = "Model: builtin name, local HF model dir, LoRA adapter dir or .gguf file."


@dataclass(frozen=True)
class EvalConfig:
    model: str = _like("model", _MODEL_HELP)
    data: str | None = _like("data", "Pairs file (none = 200 problems of the builtin task's eval split).")
    columns: str | None = _like("columns")
    ref_model: str | None = _like("ref_model", "Reference model for implicit rewards; it must share the model's "
                                               "tokenizer (none = no reward metrics).")
    beta: float = _like("beta", "β > 0 of the implicit rewards β·(log πθ − log πref).")
    batch_size: int = _opt(16, "Pairs per scoring batch (and prompts per generation batch).", minimum=1)
    max_length: int = _like("max_length")
    max_new_tokens: int = _opt(128, "Tokens generated per prompt for answer accuracy.", minimum=1)
    generate: bool = _opt(True, "Answer accuracy by batched greedy generation, when the rows carry an `answer` "
                                "(--no-generate skips it).")
    precision: str = _like("precision", "fp32, bf16 (autocast) or bf16-sr (autocast over the weights with bf16-sr's "
                                        "dither, as training computes); auto = bf16-sr where the hardware has fast "
                                        "bf16, else fp32. Generation runs in fp32.")
    layout: str = _like("layout")
    chunk_tokens: int = _like("chunk_tokens")
    out: str | None = _opt(None, "Write the results as JSON here (none = the table only).")
    trust_remote_code: bool = _like("trust_remote_code")


@dataclass(frozen=True)
class GenerateConfig:
    model: str = _like("model", _MODEL_HELP)
    prompt: str | None = _opt(None, "One prompt. For a model with a chat template it is sent as a user turn, "
                                    "unless --raw.")
    data: str | None = _opt(None, "A pairs file: generate for every row's prompt, rendered exactly as training "
                                  "renders it (batched).")
    columns: str | None = _like("columns")
    raw: bool = _opt(False, "With --prompt: use the text as is instead of wrapping it as a user turn of the chat "
                            "template.")
    max_new_tokens: int = _opt(128, "Tokens to generate per prompt.", minimum=1)
    temperature: float = _opt(0.0, "Sampling temperature; 0 = greedy.", minimum=0.0)
    batch_size: int = _opt(16, "Prompts per batch with --data.", minimum=1)
    out: str | None = _opt(None, "With --data: write the generations as JSONL here (none = stdout).")
    trust_remote_code: bool = _like("trust_remote_code")

    def check(self) -> None:
        if (self.prompt is None) == (self.data is None):
            raise ConfigError("give exactly one of --prompt TEXT and --data FILE")
        if self.out and self.data is None:
            raise ConfigError("--out writes the generations of --data; with --prompt the text goes to stdout")


LANDSCAPE_CHOICES = ("dpo", "dpop", "both")


@dataclass(frozen=True)
class LandscapeConfig:
    loss: str = _opt("both", "Loss to draw.", choices=LANDSCAPE_CHOICES)
    out: str = _opt("landscape.png", "Image file: .png, .svg or .pdf.")
    beta: float = _like("beta", "β > 0.")
    dpop_lambda: float | None = _like("dpop_lambda")


@dataclass(frozen=True)
class IterateConfig:
    """`dpop iterate`: Iterative RPO's loop (Pang et al. 2024) with any loss (default dpop)."""

    model: str = _like("model", "Model M_0 to improve: builtin name, local HF model dir or .gguf file.")
    sft_steps: int | None = _opt(None, "First SFT M_0 on chosen answers of the builtin task's sft split for this many "
                                       "steps and start from that (none = 32 with the builtin task, 0 with --data: "
                                       "start from --model as it is).", minimum=0)
    data: str | None = _opt(None, "Prompts: a JSONL/JSON/CSV/Parquet file whose rows have a `prompt` (text or "
                                  "messages) and what the verifier reads, e.g. `answer` (none = the builtin "
                                  "arithmetic task's train split).")
    verifier: str = _opt("builtin", "Who marks a sample: builtin (the arithmetic task's checker, which reads the "
                                    "row's `answer`), module:function (called as function(completion, row) -> "
                                    "bool), or rm:PATH (a `dpop rm train` reward model: pairs by score).")
    iterations: int = _opt(3, "Iterations: sample, mark, pair, train M_{t+1} with M_t as its reference, evaluate.",
                           minimum=1)
    prompts: int = _opt(64, "Training prompts sampled per iteration (fresh ones each iteration).", minimum=1)
    samples: int = _opt(4, "Answers sampled per prompt.", minimum=2)
    temperature: float = _opt(0.8, "Sampling temperature.", exclusive_minimum=0.0)
    pairs_per_prompt: int = _opt(4, "Pairs kept per prompt (correct × incorrect, spread over both; 0 = all).",
                                 minimum=0)
    max_new_tokens: int = _opt(72, "Tokens generated per sample and per evaluation answer.", minimum=1)
    eval_problems: int = _opt(100, "Held-out problems of the builtin task's eval split whose greedy answers are "
                                   "scored after each iteration (and for M_0), with 95% intervals; 0 = none.",
                              minimum=0)
    loss: str = _like("loss", "Training loss of each iteration (rpo: Iterative RPO's DPO+NLL; dpop,sft: a mixture).")
    loss_weights: str | None = _like("loss_weights")
    beta: float = _like("beta")
    learning_rate: float = _opt(5e-6, "Peak learning rate of each iteration's training.", exclusive_minimum=0.0)
    batch_size: int = _like("batch_size")
    epochs: float = _like("epochs", "Passes over each iteration's pairs (ignored when max_steps is set).")
    max_steps: int | None = _like("max_steps", "Optimizer steps per iteration (none = as many as epochs take).")
    precision: str = _like("precision")
    batch_generate: int = _opt(32, "Prompts per generation batch.", minimum=1)
    seed: int = _like("seed")
    output_dir: str = _opt("runs/iterate", "Output dir: iter-N/ (samples, pairs, the training run), summary.json, "
                                           "report.html.")
    resume: bool = _opt(False, "Continue in output_dir after its last finished iteration.")
    overwrite: bool = _opt(False, "Delete output_dir first.")

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other")
        if self.data is not None and self.sft_steps:
            raise ConfigError("--sft-steps trains on the builtin task's chosen answers; with --data give an SFT "
                              "model as --model and leave --sft-steps unset")
        if not (self.verifier == "builtin" or self.verifier.startswith("rm:") or ":" in self.verifier):
            raise ConfigError(f"verifier: expected builtin, module:function or rm:PATH, got {self.verifier!r}")


@dataclass(frozen=True)
class RmTrainConfig:
    """`dpop rm train`: a Bradley–Terry reward model (dpop.improve.reward)."""

    model: str = _like("model", "Backbone: builtin name or local HF model dir (a causal LM gets a new scalar head).")
    data: str = _opt("", "Training pairs (any pair shape `dpop data doctor` accepts).")
    eval_data: str | None = _opt(None, "Held-out pairs: reward accuracy at the end, with a 95% interval.")
    output_dir: str = _opt("runs/rm", "Output dir: metrics.jsonl, summary.json, final/ (the reward model).")
    learning_rate: float = _opt(1e-5, "Peak learning rate (linear decay to 0).", exclusive_minimum=0.0)
    batch_size: int = _like("batch_size")
    epochs: float = _like("epochs")
    max_steps: int | None = _like("max_steps")
    max_length: int = _like("max_length")
    precision: str = _opt("fp32", "fp32, or bf16 autocast: bf16 rounds the fp32 weights to nearest at every forward, "
                                  "so updates below half a bf16 step never reach the model (dpop train's bf16-sr "
                                  "avoids that; the reward model's loop does not have it).", choices=("fp32", "bf16"))
    seed: int = _like("seed")
    overwrite: bool = _opt(False, "Replace a finished reward model in output_dir.")

    def check(self) -> None:
        if not self.data:
            raise ConfigError("--data: the pairs to train the reward model on")


@dataclass(frozen=True)
class RmScoreConfig:
    """`dpop rm score`: rewards of every row and the reward accuracy."""

    model: str = _opt("runs/rm/final", "Reward model dir (`dpop rm train`'s final/).")
    data: str = _opt("", "Pairs to score.")
    out: str | None = _opt(None, "Write each row's reward_chosen and reward_rejected here as JSONL.")
    batch_size: int = _opt(16, "Pairs per scoring batch.", minimum=1)
    max_length: int = _like("max_length")

    def check(self) -> None:
        if not self.data:
            raise ConfigError("--data: the pairs to score")
