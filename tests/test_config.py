"""The one typed config: YAML keys and --flags share names, defaults in --help, loss options taken from
dpop.losses, and every bad key or value is an error that names the key (and the nearest valid one)."""

import argparse
import dataclasses

import pytest

from dpop.cli import main
from dpop.config import TrainConfig, make_config, resolve
from dpop.config.flags import SFT_DEFAULTS, add_config_arguments, config_from_args, read_yaml, write_yaml
from dpop.errors import ConfigError
from dpop.losses import LOSSES, OPTION_HELP, loss_option_defaults

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpop train")
    add_config_arguments(parser)
    return parser


def from_flags(*argv):
    return config_from_args(train_parser().parse_args(list(argv)))


def test_loss_options_are_exactly_those_of_the_losses_module(capsys):
    defaults = loss_option_defaults()
    option_fields = {name for name, f in FIELDS.items() if f.metadata.get("loss_option")}
    assert option_fields == set(defaults) == set(OPTION_HELP)
    assert "orpo_lambda" not in FIELDS and "exo_epsilon" in FIELDS
    resolved = resolve(make_config({}))
    assert {name: getattr(resolved, name) for name in defaults} == defaults  # None -> the loss's own default
    assert resolve(make_config({"dpop_lambda": 5})).dpop_lambda == 5.0
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, default in defaults.items():
        assert f"{' '.join(OPTION_HELP[name].split())}. (default: {default})" in text  # documented once, there
    assert "Choices: " + ", ".join(LOSSES) + "." in text
    with pytest.raises(ConfigError, match="loss: 'orpo_lambda' is not one of"):
        make_config({"loss": "orpo_lambda"})


def test_every_key_is_a_flag_of_the_same_name_with_its_default_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, f in FIELDS.items():
        assert "--" + name.replace("_", "-") in text, name
    assert "(default: 0.3)" in text and "(default: 50.0)" in text and "(default: precompute)" in text
    assert "(default: 0.001)" in text  # exo_epsilon


def test_flags_override_the_yaml_file(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("beta: 0.1\nmax_steps: 5\nloss: dpo\noptimizer: rmsprop\n")
    config = from_flags(str(config_file), "--beta", "0.2", "--max-length", "512", "--no-dropout")
    assert (config.beta, config.max_steps, config.loss, config.optimizer, config.max_length) == (
        0.2, 5, "dpo", "rmsprop", 512)
    assert config.dropout is False


def test_values_are_coerced_strictly():
    assert from_flags("--max-steps", "1e3").max_steps == 1000
    assert make_config({"dropout": "yes", "max-steps": 3}).dropout is True  # YAML may use the dashed form too
    for key, value in (("max_steps", "2.5"), ("max_steps", "many"), ("beta", "high"), ("dropout", "maybe"),
                       ("batch_size", True), ("model", 123)):
        with pytest.raises(ConfigError, match=f"^{key}: expected"):
            make_config({key: value})
    assert from_flags("--max-steps", "none").max_steps is None


BAD_VALUES = [
    ("beta", 0, "beta: must be > 0"),
    ("beta", -1, "beta: must be > 0"),
    ("dpop_lambda", -1, r"dpop_lambda = -1.0 is outside \[0, inf\)"),
    ("learning_rate", 0, "learning_rate: must be > 0"),
    ("max_length", 1, "max_length: must be >= 2, got 1; the nearest valid value is 2"),
    ("label_smoothing", 0.5, r"label_smoothing = 0.5 is outside \[0, 0.5\)"),
    ("exo_epsilon", 0, r"exo_epsilon = 0.0 is outside \(0, 1\)"),
    ("discopop_tau", 0, r"discopop_tau = 0.0 is outside \(0, inf\)"),
    ("batch_size", 0, "batch_size: must be >= 1"),
    ("num_processes", 0, "num_processes: must be >= 1"),
    ("optimizer", "adam", "optimizer: 'adam' is not one of adamw, rmsprop \\(did you mean 'adamw'\\?\\)"),
    ("loss", "dpopp", "loss: 'dpopp' is not one of .* \\(did you mean 'dpop'\\?\\)"),
    ("precision", "fp16", "precision: 'fp16' is not one of auto, fp32, bf16"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_bad_values_name_the_key_from_yaml_and_from_flags(key, value, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message):
        make_config({key: value})

    config_file = tmp_path / "bad.yaml"
    config_file.write_text(f"{key}: {value}\n")
    flag = "--" + key.replace("_", "-")
    out_dir = tmp_path / "run"
    for argv in (["train", str(config_file)], ["train", flag, str(value)]):
        assert main([*argv, "--output-dir", str(out_dir)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dpop train: error: ") and key in err
        assert "Traceback" not in err
    assert not out_dir.exists()


def test_unknown_keys_suggest_the_nearest_valid_one(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
        make_config({"learning_rat": 1e-5})
    config_file = tmp_path / "typo.yaml"
    config_file.write_text("bta: 0.1\n")
    assert main(["train", str(config_file)]) == 1
    assert "unknown config key 'bta' (did you mean 'beta'?)" in capsys.readouterr().err

    for flag, suggestion in (("--learning-rat", "--learning-rate"), ("--max-step", "--max-steps")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", flag, "1"])
        assert exit_info.value.code == 2
        assert f"unknown option {flag} (did you mean '{suggestion}'?)" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    (dict(max_length=256, max_prompt_length=256), "max_prompt_length \\(256\\) must be below max_length"),
    (dict(ref_strategy="lora"), "needs LoRA on"),
    (dict(ref_strategy="lora", lora_r=4, ref_model="x"), "drop ref_model"),
    (dict(resume=True, overwrite=True), "contradict"),
    (dict(report_to="tensorbord"), "unknown tracker 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"),
    (dict(report_to="none,wandb"), "'none' cannot be combined"),
])
def test_inconsistent_settings_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(values)


def test_resolve_makes_every_automatic_value_concrete():
    resolved = resolve(make_config({"batch_size": 3, "max_length": 300}))
    assert resolved.precision in ("fp32", "bf16-sr")
    assert resolved.eval_batch_size == 12 and resolved.max_prompt_length == 150
    assert resolve(make_config({"eval_batch_size": 5, "precision": "fp32"})).eval_batch_size == 5
    assert make_config({"report_to": "wandb, mlflow"}).trackers == ("wandb", "mlflow")
    assert make_config({}).trackers == ()


def test_resume_reads_the_runs_own_config(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = resolve(make_config({"output_dir": str(run_dir), "loss": "ipo", "beta": 0.7, "max_steps": 4}))
    write_yaml(saved, run_dir / "config.yaml")
    config = from_flags("--output-dir", str(run_dir), "--resume", "--max-steps", "8")
    assert (config.loss, config.beta, config.max_steps, config.resume) == ("ipo", 0.7, 8, True)
    assert make_config(read_yaml(run_dir / "config.yaml")) == saved  # the saved file round-trips
    assert from_flags("--output-dir", str(run_dir)).loss == "dpop"  # without --resume: the defaults


def test_a_resumed_sft_run_keeps_its_own_learning_rate_over_the_commands_default(tmp_path):
    """`dpop sft --output-dir RUN --resume` after `dpop sft --learning-rate 2e-5`: the run's saved 2e-5
    outranks sft's command default (1e-5), which once made the resume refuse a 'changed' learning rate."""
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    write_yaml(resolve(make_config({**SFT_DEFAULTS, "output_dir": str(run_dir), "learning_rate": 2e-5})),
               run_dir / "config.yaml")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, command_defaults=SFT_DEFAULTS)
    resumed = config_from_args(parser.parse_args(["--output-dir", str(run_dir), "--resume"]),
                               command_defaults=SFT_DEFAULTS)
    assert (resumed.loss, resumed.learning_rate) == ("sft", 2e-5)
    fresh = config_from_args(parser.parse_args(["--output-dir", str(tmp_path / "new")]), command_defaults=SFT_DEFAULTS)
    assert fresh.learning_rate == 1e-5  # a new sft run still gets the command's default
    flagged = config_from_args(parser.parse_args(["--output-dir", str(run_dir), "--resume", "--learning-rate", "3e-5"]),
                               command_defaults=SFT_DEFAULTS)
    assert flagged.learning_rate == 3e-5  # a flag given still outranks the saved config


def test_yaml_lists_and_maps_and_ranked_pairs_are_config_values(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("report_to: [tensorboard, wandb]\nlora_target: [q_proj, v_proj]\n"
                           "columns: {prompt: question, chosen: good}\nranked_pairs: all\n")
    config = make_config(read_yaml(config_file))
    assert config.trackers == ("tensorboard", "wandb") and config.lora_target == "q_proj,v_proj"
    assert config.columns == "prompt=question,chosen=good" and config.ranked_pairs == "all"
    with pytest.raises(ConfigError, match="ranked_pairs: 'some' is not one of best_worst, all"):
        make_config({"ranked_pairs": "some"})
    with pytest.raises(ConfigError, match="report_to: expected names"):
        make_config({"report_to": ["wandb", 3]})
    with pytest.raises(ConfigError, match="beta: expected float"):
        make_config({"beta": [0.1]})  # only list-valued keys take lists


def test_ranked_pairs_reaches_the_data_loader(tmp_path):
    import json

    from dpop.data.runs import load_run_pairs

    data = tmp_path / "ranked.jsonl"
    data.write_text(json.dumps({"prompt": "2 + 3?", "completions": [{"text": "5", "score": 3}, {"text": "6", "score": 1},
                                                                     {"text": "4", "score": 2}]}) + "\n")
    best_worst = load_run_pairs(make_config({"data": str(data)}))
    every = load_run_pairs(make_config({"data": str(data), "ranked_pairs": "all"}))
    assert len(best_worst.train) == 1 and len(every.train) == 3
