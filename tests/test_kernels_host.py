"""Builds tflite_ops for this host and runs the C++ kernel testers through ctest.

Two builds, each cached under build/ (re-runs only rebuild what changed):
  build/kernels-host  Release: every variant this CPU has, bit-exact against the reference
  build/kernels-asan  -DTFQAT_SANITIZE=ON: the same testers under ASan + UBSan
Skipped only when cmake or a C++ compiler is genuinely absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "tflite_ops"

pytestmark = [
    # Builds C++ (~20 s each from scratch on 2 cores): "slow", which the default run still includes.
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("cmake") is None or (shutil.which("g++") is None and shutil.which("c++") is None),
        reason="cmake and a C++ compiler are needed to build the kernels",
    ),
]


def _build_and_test(build: Path, extra: list[str], env: dict[str, str] | None = None) -> str:
    # The kernel tests need neither the delegate nor the benchmark.
    cfg = ["cmake", "-S", str(SRC), "-B", str(build), "-DTFQAT_BUILD_DELEGATE=OFF", "-DTFQAT_BUILD_BENCH=OFF", *extra]
    subprocess.run(cfg, check=True, capture_output=True, text=True)
    b = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert b.returncode == 0, b.stdout[-4000:] + b.stderr[-4000:]
    assert " warning: " not in b.stdout + b.stderr, "kernel sources must build without warnings:\n" + b.stderr[-4000:]
    run_env = dict(os.environ, **(env or {}))
    run_env.pop("TFQAT_ISA", None)
    t = subprocess.run(["ctest", "--output-on-failure", "-V"], cwd=build, capture_output=True, text=True, env=run_env,
                       timeout=600)
    assert t.returncode == 0, t.stdout[-8000:] + t.stderr[-4000:]
    return t.stdout


def test_kernels_host_ctest():
    out = _build_and_test(REPO / "build" / "kernels-host", ["-DCMAKE_BUILD_TYPE=Release"])
    assert "100% tests passed" in out
    # Every family reports which ISAs it ran and found no mismatch.
    for family in ("quantize", "qlinear", "attention", "gemm_float", "dispatch", "parallel"):
        assert f"[{family}] tested: ref" in out
        assert re.search(rf"\[{family}\] \d+ checks, 0 failures", out), family
    # The threads tester ran op 3 / 3g through the tiling loop on pools of 1-4 threads.
    assert re.search(r"\[parallel\] [1-9]\d* cases per variant, tilings on 1-4 threads", out)
    # The qlinear tester also ran its group-wise-scale (op 3g) cases.
    assert re.search(r"\[qlinear\] \d+ cases per variant, [1-9]\d* of them with group-wise scales", out)
    # ... and the attention tester its float-probability cases (op 4p, ATTN_PV p_mode=1).
    assert re.search(r"\[attention\] \d+ cases per variant, [1-9]\d* with float probabilities", out)


def test_kernels_sanitized_ctest():
    # LeakSanitizer needs ptrace-like access to stop threads; it works in this sandbox, so leaks
    # are checked too. halt_on_error keeps the first report readable.
    env = {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:abort_on_error=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    out = _build_and_test(REPO / "build" / "kernels-asan", ["-DTFQAT_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=Debug"], env)
    assert "100% tests passed" in out
    assert "runtime error" not in out and "ERROR: AddressSanitizer" not in out
