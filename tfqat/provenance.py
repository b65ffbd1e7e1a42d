"""What a run folder records about how it was made: ``config.yaml`` (the resolved config, every
``--set`` applied) and ``provenance.json`` (versions, the delegate's compiler and ISA, git revision,
host, seeds, command line).

Why: a result must be traceable to the code, libraries and machine that made it, and later
commands (``export``, ``evaluate``, ``ptq``, ``ablate`` with ``--run``) must read the run's own
config instead of guessing it from the folder name. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import datetime
import getpass
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import tempfile
from pathlib import Path

import yaml

from .atomic import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parent.parent

# distribution names: the first one installed is reported (tensorflow-cpu is TensorFlow's CPU wheel)
PACKAGES = {"tfqat": ["tfqat"], "tensorflow": ["tensorflow", "tensorflow-cpu", "tf-nightly"],
            "keras": ["keras"], "litert": ["ai-edge-litert"], "numpy": ["numpy"]}


def package_versions() -> dict:
    """Installed versions by role (``None`` when not installed); read from package metadata, so
    reporting them never imports TensorFlow."""
    out = {"python": platform.python_version()}
    for role, names in PACKAGES.items():
        out[role] = None
        for name in names:
            try:
                out[role] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


_COMPILER = re.compile(rb"(GCC: \([^\x00]*?\) [^\x00]+|[^\x00]*clang version [^\x00]+)")


def delegate_info(lib: str | os.PathLike | None = None) -> dict:
    """The delegate library's path, the compiler that built it and the kernel ISA it selects here.

    The compiler is read from the library's ELF ``.comment`` strings (GCC and clang put their
    version there); the ISA from ``tfqat_bench`` built beside it (the same kernel tables and CPU
    feature detection), or ``$TFQAT_ISA`` when that forces one. Missing pieces are ``None``.
    """
    from .runtime import TfqatRuntimeError, find_library

    info: dict = {"path": None, "compiler": None, "isa_selected": None, "isa_available": None,
                  "isa_forced": os.environ.get("TFQAT_ISA")}
    try:
        path = Path(lib) if lib else Path(find_library())
    except TfqatRuntimeError:
        return info
    if not path.is_file():
        return info
    info["path"] = str(path)
    found = sorted({m.group(1).decode("utf-8", "replace").strip() for m in _COMPILER.finditer(path.read_bytes())})
    info["compiler"] = "; ".join(found) or None
    bench = path.parent / "tfqat_bench"
    if bench.is_file() and os.access(bench, os.X_OK):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            try:  # a filter that matches no case: prints the machine line only (~0.2 s)
                subprocess.run([str(bench), "--filter", "--no-case--", "--reps", "1", "--json", str(out)],
                               capture_output=True, timeout=30, check=True)
                machine = json.loads(out.read_text())["machine"]
                info["isa_selected"] = machine.get("isa_selected")
                info["isa_available"] = machine.get("isa_available")
                info["cpu"] = machine.get("cpu")
            except (OSError, subprocess.SubprocessError, ValueError, KeyError):
                pass
    return info


def git_revision(root: Path = ROOT) -> dict | None:
    """``{"commit", "dirty"}`` of the source tree tfqat runs from, or None outside a git checkout
    (an installed wheel) or without git."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=20, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def host_info() -> dict:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = None
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "user": user}


def config_yaml(cfg) -> str:
    """The resolved config as YAML that :func:`tfqat.config.load_config` reads back to an equal config."""
    from .config import config_to_dict

    head = ("# The resolved config of this run (every --set applied), written by tfqat.\n"
            "# Later commands read it with --run <this folder>; add --set KEY=VALUE to change a key.\n")
    return head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def record_run(cfg, command: list[str]) -> dict:
    """Write ``<run>/config.yaml`` and ``<run>/provenance.json`` (atomically) and return the record.

    Earlier records of the folder are kept under ``history`` (one entry per command that trained
    in it), so a run continued with another TensorFlow or commit says so.
    """
    run = Path(cfg.run_dir)
    record = {
        "config": "config.yaml",
        "command": list(command),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "delegate": delegate_info(),
        "git": git_revision(),
        "host": host_info(),
        "seeds": {"train.seed": cfg.train.seed, "qat.train.seed": cfg.qat.train.seed},
    }
    old_path = run / "provenance.json"
    history = []
    if old_path.is_file():
        try:
            old = json.loads(old_path.read_text())
            history = old.pop("history", []) + [old]
        except (ValueError, AttributeError, UnicodeDecodeError):
            history = []  # a damaged record is replaced: the new one is whole
    record["history"] = history[-20:]
    write_text_atomic(run / "config.yaml", config_yaml(cfg))
    write_json_atomic(old_path, record)
    return record
