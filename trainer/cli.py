"""`python launch/train.py --config ...` (also the `celestial-train` console script), which
passes the diagnostics' observer factory to `main`.

The reference card's flags are shortcuts for config keys; `--set key=value` sets any key.
Precedence: defaults < YAML file < card flags < --set, in the order given.
"""
from __future__ import annotations

import argparse
import logging
import sys

from trainer import distributed, preemption
from trainer.config import load_config, parse_override
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py",
                                     description="Train the Celestial Enhanced PGAT.")
    parser.add_argument("--config", help="YAML config file (see configs/)")
    for flag, (key, kind) in VALUE_FLAGS.items():
        parser.add_argument(f"--{flag}", type=kind, help=f"sets {key}")
    for flag, key in SWITCH_FLAGS.items():
        parser.add_argument(f"--{flag}", action="store_true", help=f"sets {key}: true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], nargs="+",
                        metavar="KEY=VALUE", help="any config key, e.g. --set optim.lr=3e-4")
    return parser.parse_args(argv)


def overrides_from(args: argparse.Namespace) -> list[tuple[str, object]]:
    pairs = [(key, getattr(args, flag)) for flag, (key, _) in VALUE_FLAGS.items()
             if getattr(args, flag) is not None]
    pairs += [(key, True) for flag, key in SWITCH_FLAGS.items() if getattr(args, flag)]
    pairs += [parse_override(text) for group in args.overrides for text in group]
    return pairs


def run(argv: list[str] | None = None, observers: ObserverFactory | None = None) -> int:
    """Train with the observers `observers` builds from the config (the entry point passes the
    diagnostics'); returns the exit status (0 done, 1 failed, 2 bad input, 74 a file could not
    be written, 75 stopped on a signal, 130 a second Ctrl-C)."""
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
