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
