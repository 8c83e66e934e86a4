"""Shared fixtures: a tiny model dir, small pairs files, a private $DPOP_CACHE, and a factory of training
configs for them. Everything here is built in code (no download) and takes well under a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: the test machines share 2 cores between jobs, and torch's multi-threaded kernels
    then spin-wait for each other and run tens of times slower than one thread does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def dpop_messages_on_stdout():
    """dpop's messages printed as the CLI prints them (dpop.cli.configure_logging), set again before every test:
    tests that call the library directly read them from stdout as CLI tests do, whatever ran before (a --quiet
    CLI call, which keeps only warnings)."""
    from dpop.cli import configure_logging

    configure_logging()


@pytest.fixture
def dpop_cache(tmp_path, monkeypatch) -> Path:
    """A private $DPOP_CACHE, so reference caches and fingerprints never leak between tests or into ~/.cache."""
    cache = tmp_path / "dpop-cache"
    monkeypatch.setenv("DPOP_CACHE", str(cache))
    return cache


def save_tiny_model(directory: Path, *, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random 2-layer Llama and its tokenizer as a model dir that `--model DIR` accepts."""
    from dpop.models.tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_saver():
    """save_tiny_model, for tests that need a variant (another seed, config overrides such as dropout)."""
    return save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """16 builtin-task training pairs (conversational rows with `answer` metadata) as JSONL."""
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    return write_jsonl(make_pairs(16, edit="low", seed=0), tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="session")
def eval_pairs_file(tmp_path_factory) -> Path:
    """6 builtin-task pairs of the eval split (no problem shared with pairs_file)."""
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    return write_jsonl(make_pairs(6, edit="low", seed=0, split="eval"), tmp_path_factory.mktemp("data") / "eval.jsonl")


@pytest.fixture
def tiny_config(tiny_model_dir, pairs_file, dpop_cache, tmp_path):
    """Factory: a TrainConfig for the tiny model and pairs_file, fp32, output in tmp_path/<name>."""
    from dpop.config import make_config

    def build(name: str = "run", **overrides):
        values = dict(model=str(tiny_model_dir), data=str(pairs_file), output_dir=str(tmp_path / name),
                      precision="fp32", batch_size=2, max_steps=3, max_length=256)
        values.update(overrides)
        return make_config(values)

    return build
