"""The config as YAML files and --flags: one flag per field, generated from the fields, and the order in which
defaults, a run's saved config.yaml, a YAML file and flags override each other."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from dpop.config import TrainConfig, _field_type, _help_text, _suggest, make_config
from dpop.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 ({error.reason} at byte {error.start}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)  # where the parser gave up (the first line is 1)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {reason}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
    return loaded


def write_yaml(config, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


# `dpop sft` is the same loop with its own defaults (cross-entropy wants a far larger step than DPO).
SFT_DEFAULTS = {"loss": "sft", "learning_rate": 1e-5, "task_split": "sft"}


def add_config_arguments(parser: argparse.ArgumentParser, base: type = TrainConfig,
                         command_defaults: dict | None = None, exclude: tuple[str, ...] = (),
                         config_file: bool = True) -> None:
    """One --flag per config field (except `exclude`: keys the command fixes), help and default from the field
    itself. Flags default to None (= not given), so a YAML file's value is only overridden by flags the user
    actually typed.
    Abbreviated flags are refused (a flag is exactly its YAML key), and an unknown flag is an error that
    suggests the nearest valid one."""
    if config_file:
        parser.add_argument("config_file", nargs="?", help="YAML file with config keys (flags override it).")
    for f in _flag_fields(base, exclude):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        lazy = f.metadata.get("loss_option") or f.metadata.get("choices_from_losses")
        help_text = "(from dpop.losses)" if lazy else _help_text(f, command_defaults).replace("%", "%%")
        if kind is bool:
            action = parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                         help=help_text)
        else:
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(choices) + "}" if choices and len(choices) <= 3 else kind.__name__.upper()
            action = parser.add_argument(flag, dest=f.name, type=str, default=None, metavar=metavar, help=help_text)
        action.dpop_field = f
        action.dpop_defaults = command_defaults
    parser.formatter_class = _ConfigHelpFormatter
    parser.allow_abbrev = False
    _refuse_unknown_flags(parser, base, exclude)


def _flag_fields(base: type, exclude: tuple[str, ...]) -> list:
    return [f for f in fields(base) if f.name not in exclude]


class _ConfigHelpFormatter(argparse.HelpFormatter):
    """Renders each config flag's help from its field when help is printed (the loss options' from dpop.losses,
    which is imported only then)."""

    def _get_help_string(self, action):
        f = getattr(action, "dpop_field", None)
        if f is None:
            return super()._get_help_string(action)
        return _help_text(f, getattr(action, "dpop_defaults", None)).replace("%", "%%")


def _refuse_unknown_flags(parser: argparse.ArgumentParser, base: type, exclude: tuple[str, ...] = ()) -> None:
    """argparse hands a subcommand's unknown flags to the top-level parser, which reports them without a hint;
    catch them here and name the nearest valid flag."""
    flags = ["--" + f.name.replace("_", "-") for f in _flag_fields(base, exclude)]
    parse_known_args = parser.parse_known_args

    def parse_known_args_checked(args=None, namespace=None):
        namespace, extras = parse_known_args(args, namespace)
        for extra in extras:
            if extra.startswith("-"):
                flag = extra.split("=", 1)[0]
                parser.error(f"unknown option {flag}{_suggest(flag, flags)}")
        return namespace, extras

    parser.parse_known_args = parse_known_args_checked


def config_from_args(args: argparse.Namespace, base: type = TrainConfig, overrides: dict | None = None,
                     command_defaults: dict | None = None):
    """Config from (in increasing priority) the defaults, the command's defaults, the run's saved config.yaml
    when resuming, the YAML file, `overrides` and the flags given."""
    chosen = dict(read_yaml(args.config_file) if getattr(args, "config_file", None) else {})
    chosen.update(overrides or {})
    for f in fields(base):
        given = getattr(args, f.name, None)
        if given is not None:
            chosen[f.name] = _parse_flag(f, given)
    defaults = dict(command_defaults or {})
    saved = _saved_config_values({**defaults, **chosen})  # the run's own values outrank the command's defaults
    return make_config({**defaults, **saved, **chosen}, base)


def _saved_config_values(values: dict[str, Any]) -> dict[str, Any]:
    """On --resume, the run's own config.yaml, so `dpop train --output-dir RUN --resume` needs no other flag."""
    resume = values.get("resume")
    if not (resume is True or str(resume).lower() in ("1", "true", "yes", "on")):
        return {}
    saved = Path(str(values.get("output_dir", TrainConfig.output_dir))) / "config.yaml"
    if not saved.is_file():
        return {}
    return {key: value for key, value in read_yaml(saved).items() if key not in ("resume", "overwrite")}


def _parse_flag(f, text):
    """Flags arrive as strings; 'none'/'null' clears an optional value."""
    if isinstance(text, str) and text.lower() in ("none", "null") and f.default is None:
        return None
    return text
