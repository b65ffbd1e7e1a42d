"""android_bench: tfqat's kernels measured on phones (adb), Linux boards (ssh), the host (local)
and an emulated aarch64 CPU (qemu; exact instruction counts, never time).

    python -m android_bench build                       # cross-compile for arm64
    python -m android_bench run --transport adb --serial S [--model m.tflite] [--out DIR]
    python -m android_bench run --transport ssh --host user@board
    python -m android_bench run --transport emulated     # instruction counts under qemu

Modules: build (toolchains, artifacts, manifest), transports (Adb, Ssh, Local, Emulated and the
run itself), report (report.md / report.json / report.png, Table IV layout), litert_benchmark
(LiteRT benchmark_model's flags and output on the LiteRT Python runtime: ``--benchmark-model
litert-python``, the default for ``--transport local``).
"""
from __future__ import annotations

import os
from pathlib import Path

from tfqat.atomic import write_bytes_atomic as atomic_write_bytes  # noqa: F401 (re-exported)
from tfqat.atomic import write_json_atomic
from tfqat.atomic import write_text_atomic as atomic_write_text  # noqa: F401 (re-exported)

__all__ = ["BenchError", "DEVICE_DIR", "REPO_ROOT", "SCHEMA", "atomic_write_text", "atomic_write_json"]

#: where pushed files live on an Android device (and, by default, on an ssh board)
DEVICE_DIR = "/data/local/tmp/tfqat"
#: the JSON result schema every transport writes
SCHEMA = "tfqat.android_bench.result/1"
REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """A failure with a one-line message for the user.

    kind: no-device, unauthorized, offline, disconnected, timeout, abi, build, command, usage.
    """

    def __init__(self, message: str, kind: str = "command"):
        super().__init__(" ".join(str(message).split()))  # always one line
        self.kind = kind


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    write_json_atomic(path, obj, indent=2)
