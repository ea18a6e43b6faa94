"""`python launch/train.py --config ...` (also the `celestial-train` console script). The
observers are those of the installed plug-ins (trainer/plugins.py) unless a caller of `main`
passes its own factory.

The reference card's flags are shortcuts for config keys; `--set key=value` sets any key.
Precedence: defaults < YAML file < card flags < --set, in the order given.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import sys

from trainer import distributed, preemption
from trainer.config import key_default_and_choices, load_config, parse_override
from trainer.errors import EXIT_WRITE_FAILED, UserError, WriteFailed
from trainer.observer import ObserverFactory
from trainer.run_log import log_error_to_file

EXIT_INTERRUPTED = 130    # 128 + SIGINT, as a shell reports a process ended by Ctrl-C

# flag -> (dotted config key, type)
VALUE_FLAGS = {
    "experiment_name": ("train.experiment_name", str),
    "epochs": ("train.epochs", int),
    "max_steps": ("train.max_steps", int),
    "log_interval": ("train.log_interval", int),
    "resume": ("train.resume", str),
    "device": ("train.device", str),
    "precision": ("train.precision", str),
    "batch_size": ("data.batch_size", int),
    "checkpoint_interval": ("checkpoint.interval", int),
    "gradient_log_interval": ("diagnostics.gradient_log_interval", int),
    "attention_log_interval": ("diagnostics.attention_log_interval", int),
}
SWITCH_FLAGS = {
    "enable_gradient_diagnostics": "diagnostics.enable_gradient_diagnostics",
    "enable_attention_logging": "diagnostics.enable_attention_logging",
    "enable_component_profiling": "diagnostics.enable_component_profiling",
}


# What a flag's default means where the config's default value does not say it.
DEFAULT_MEANING = {
    "experiment_name": "<config file stem>_<start time>",
    "max_steps": "0, as many steps as the epochs take",
    "resume": "none (start fresh); auto: the experiment's newest usable checkpoint, or a "
              "checkpoints/<exp>/checkpoint_step_NNNNNN folder",
}
EXIT_STATUSES = ("exit status: 0 done, 1 a failure (lost or hung rank, too many non-finite "
                 "steps), 2 bad input, 74 a file could not be written, 75 stopped on a signal "
                 "after a checkpoint (continue with --resume auto), 76 pruned by a search at a "
                 "validation (no checkpoint, no test)")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a mistake as the project's user errors are: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def _value_help(flag: str, key: str) -> str:
    default, choices = key_default_and_choices(key)
    allowed = f"; one of {', '.join(map(str, choices))}" if choices else ""
    return f"sets {key}{allowed} (default: {DEFAULT_MEANING.get(flag, default)})"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="launch/train.py", allow_abbrev=False, epilog=EXIT_STATUSES,
                           description="Train the Celestial Enhanced PGAT. Settings: defaults, "
                                       "then --config, then these flags, then --set.")
    parser.add_argument("--config", help="YAML config file (see configs/; default: none, "
                                         "the defaults only)")
    for flag, (key, kind) in VALUE_FLAGS.items():
        choices = key_default_and_choices(key)[1]
        parser.add_argument(f"--{flag}", type=kind, choices=choices, help=_value_help(flag, key))
    for flag, key in SWITCH_FLAGS.items():
        parser.add_argument(f"--{flag}", action="store_true",
                            help=f"sets {key}: true (default: false)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="KEY=VALUE", help="any config key, e.g. --set optim.lr=3e-4")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized argument {unknown[0]}{_did_you_mean(unknown[0])}")
    return args


def _did_you_mean(argument: str) -> str:
    """`--max-steps` -> ": did you mean --max_steps?"; close misspellings likewise."""
    if not argument.startswith("--"):
        return ""
    flag = argument.split("=", 1)[0]
    known = ["--config", "--set", *(f"--{f}" for f in (*VALUE_FLAGS, *SWITCH_FLAGS))]
    underscored = "--" + flag[2:].replace("-", "_")
    guess = underscored if underscored in known else next(
        iter(difflib.get_close_matches(underscored, known, n=1)), None)
    return f": did you mean {guess}?" if guess else ""


def overrides_from(args: argparse.Namespace) -> list[tuple[str, object]]:
    pairs = [(key, getattr(args, flag)) for flag, (key, _) in VALUE_FLAGS.items()
             if getattr(args, flag) is not None]
    pairs += [(key, True) for flag, key in SWITCH_FLAGS.items() if getattr(args, flag)]
    pairs += [parse_override(text) for group in args.overrides for text in group]
    return pairs


def run(argv: list[str] | None = None, observers: ObserverFactory | None = None) -> int:
    """Train with the observers `observers` builds from the config (by default those of the
    installed plug-ins, trainer/plugins.py); returns the exit status (0 done, 1 failed, 2 bad
    input, 74 a file could not be written, 75 stopped on a signal, 130 a second Ctrl-C)."""
    args = parse_args(argv)
    # From here on SIGTERM/SIGINT/SIGUSR1 only set a flag: a stop asked for during data preparation,
    # model build or resume is acted on at the trainer's first safe point (exit 75).
    requests = preemption.listen()
    from trainer.build import build_trainer  # after argparse: --help stays fast
    try:
        config = load_config(args.config, overrides_from(args))
        env = distributed.init_distributed(config.train.device, config.train.collective_timeout_s)
        return build_trainer(config, env, args.config, observers=observers).train()
    except UserError as err:
        return _fail(err, 2)
    except WriteFailed as err:
        return _fail(err, EXIT_WRITE_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted twice (Ctrl-C): stopped at once, without a checkpoint; "
                     "resume from the newest one with --resume auto", EXIT_INTERRUPTED)
    except BaseException as err:    # DCP's CheckpointException is a BaseException
        explained = distributed.explain_failure(err)
        if explained is not None:
            logging.getLogger(__name__).debug("collective failure", exc_info=True)
            return _fail(explained, 1)
        if isinstance(err, Exception):
            # Not ours to explain: the traceback goes to the console as usual, and also into
            # training_full.log when the run folder exists, so the run's own record has it.
            log_error_to_file(f"unexpected error: {err!r}", exc_info=True)
        raise
    finally:
        requests.uninstall()
        distributed.destroy()


def _fail(err: object, status: int) -> int:
    """One line on the console (every rank), and into training_full.log if it exists."""
    message = "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    logging.getLogger(__name__).debug("stopping", exc_info=True)
    log_error_to_file(message)
    print(message, file=sys.stderr)
    return status


def main(argv: list[str] | None = None, observers: ObserverFactory | None = None) -> None:
    sys.exit(run(argv, observers))
