"""The command lines of `dpop iterate` and `dpop rm train|score` (dpop.cli adds them; nothing here imports torch
until a command runs)."""

from __future__ import annotations


def add_improve_commands(sub) -> None:
    _add_iterate(sub)
    _add_reward_model(sub)


def _add_iterate(sub) -> None:
    from dpop.config.commands import IterateConfig
    from dpop.config.flags import add_config_arguments

    iterate = sub.add_parser("iterate", help="Improve a model on its own answers (Iterative RPO's loop).",
                             description="Each iteration samples answers from the current model, marks them "
                                         "with a verifier, pairs correct with incorrect answers, trains the next "
                                         "model with the current one as its reference (default loss dpop) and "
                                         "scores held-out answers; OUT/summary.json and OUT/report.html.")
    add_config_arguments(iterate, IterateConfig, config_file=False)
    iterate.set_defaults(run=_run_iterate)


def _add_reward_model(sub) -> None:
    from dpop.config.commands import RmScoreConfig, RmTrainConfig
    from dpop.config.flags import add_config_arguments

    rm = sub.add_parser("rm", help="Train and score a Bradley–Terry reward model.",
                        description="A scalar head on a causal LM trained with −log σ(r_w − r_l) on pairs; usable "
                                    "as `dpop iterate --verifier rm:PATH`.")
    rm_sub = rm.add_subparsers(dest="rm_command", metavar="COMMAND", required=True)
    for name, config_class, help_text in (("train", RmTrainConfig, "Train a reward model on pairs."),
                                          ("score", RmScoreConfig, "Score pairs: per-row rewards, reward accuracy.")):
        command = rm_sub.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(command, config_class, config_file=False)
        command.set_defaults(run=_run_reward_model, config_class=config_class)


def _run_reward_model(args) -> int:
    from dpop.config.flags import config_from_args
    from dpop.improve.reward import score_file, train_reward_model

    config = config_from_args(args, args.config_class)
    (train_reward_model if args.rm_command == "train" else score_file)(config)
    return 0


def _run_iterate(args) -> int:
    from dpop.config.commands import IterateConfig
    from dpop.config.flags import config_from_args
    from dpop.improve.iterate import run_iterate

    run_iterate(config_from_args(args, IterateConfig))
    return 0
