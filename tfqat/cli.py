"""What every ``python -m tfqat.*`` command shares: config flags and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import yaml

from .config import ConfigError, RunConfig, load_config

# Command-line runs only (not library imports): keep TensorFlow's C++ start-up chatter out of the way.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(ValueError):
    """A problem the user can fix (missing checkpoint, bad run folder...): one line, no traceback."""


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", default="tiny", help="config name in configs/ or a YAML path (default: tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=100 (repeatable)")
    ap.add_argument("--name", help="run name (folder under runs/); default: the config's name")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--strategy", choices=["default", "mirrored", "multiworker"],
                    help="tf.distribute strategy for FP and QAT training (sets train.strategy and "
                         "qat.train.strategy; multiworker reads TF_CONFIG)")


def load_cli_config(args: argparse.Namespace) -> RunConfig:
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.name:
        overrides["name"] = args.name
    if getattr(args, "strategy", None):
        overrides["train.strategy"] = overrides["qat.train.strategy"] = args.strategy
    return load_config(args.config, overrides)


@contextlib.contextmanager
def die():
    """Turn the errors a user can fix into one line on stderr and exit status 2."""
    from .data import DataError

    try:
        yield
    except (ConfigError, DataError, UserError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
