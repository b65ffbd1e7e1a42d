"""What every ``python -m tfqat.*`` command shares: config flags and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import yaml

from .config import CONFIG_DIR, ConfigError, RunConfig, load_config

# Command-line runs only (not library imports): keep TensorFlow's C++ start-up chatter out of the way.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(ValueError):
    """A problem the user can fix (missing checkpoint, bad run folder...): one line, no traceback."""


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--config", help="config name in configs/ or a YAML path (default: tiny)")
    ap.add_argument("--run", metavar="FOLDER",
                    help="a run folder (runs/NAME): use the config it was trained with (its config.yaml); "
                         "--set still changes keys")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set train.steps=100 (repeatable)")
    ap.add_argument("--name", help="run name (folder under runs/); default: the config's name")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--strategy", choices=["default", "mirrored", "multiworker"],
                    help="tf.distribute strategy for FP and QAT training (sets train.strategy and "
                         "qat.train.strategy; multiworker reads TF_CONFIG)")


def parse_overrides(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as ``{dotted key: YAML value}``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=100")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def run_config(run: str | os.PathLike, overrides: dict | None = None, config: str | None = None) -> RunConfig:
    """The config a run folder was made with: its ``config.yaml`` (written by ``python -m tfqat.train``),
    named and placed by the folder (a moved folder still works), ``overrides`` applied.

    Folders made before ``config.yaml`` existed take ``config`` (a name or YAML path), else
    ``configs/<folder name>.yaml`` when there is one.

    Raises:
        UserError: no such folder; ``config`` given for a folder that has its own; no config found.
    """
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder; train first with python -m tfqat.train")
    overrides = {**(overrides or {}), "name": run.name, "runs_dir": str(run.parent)}
    recorded = run / "config.yaml"
    if recorded.is_file():
        if config:
            raise UserError(f"--config {config}: {run} has its own config ({recorded}); drop --config "
                            "(use --set KEY=VALUE to change a key)")
        return load_config(recorded, overrides)
    if config:
        return load_config(config, overrides)
    guess = CONFIG_DIR / f"{run.name}.yaml"
    if guess.is_file():
        print(f"warning: {run} has no config.yaml (made before runs recorded their config); "
              f"using {guess}", file=sys.stderr)
        return load_config(guess, overrides)
    raise UserError(f"{run} has no config.yaml (made before runs recorded their config) and there is no "
                    f"{guess}; pass --config with the config it was trained with")


def load_cli_config(args: argparse.Namespace) -> RunConfig:
    """The run config from ``--run`` or ``--config``, ``--set``, ``--name`` and ``--strategy``."""
    overrides = parse_overrides(args.overrides)
    if getattr(args, "strategy", None):
        overrides["train.strategy"] = overrides["qat.train.strategy"] = args.strategy
    run = getattr(args, "run", None)
    if run:
        if args.name:
            raise UserError(f"--name {args.name} with --run {run}: pick one (--run continues that folder)")
        return run_config(run, overrides, args.config)
    if args.name:
        overrides["name"] = args.name
    return load_config(args.config or "tiny", overrides)


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
