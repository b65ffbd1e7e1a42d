"""Cross-built aarch64 kernels under qemu-user: bit-exactness and run-time dispatch per CPU class.

Builds tflite_ops for aarch64 with Debian's g++-aarch64-linux-gnu (static) into
build/kernels-aarch64 and runs the kernel testers under ``qemu-aarch64-static -cpu X`` for the
three phone classes, checking that each run passes *and* that dispatch picked that class's path:

    cortex-a53 (armv8.0)              -> neon
    cortex-a76 (dotprod + fp16)       -> neondot
    max        (dotprod + fp16 + i8mm) -> i8mm

A second build uses zig's clang + musl (the ziglang wheel) and runs under ``-cpu max``
(marked slow: zig fills its cache on first use).
Tests skip, saying why, only when a cross compiler, qemu or cmake is missing (CI installs
g++-aarch64-linux-gnu and qemu-user-static with apt).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "tflite_ops"
TOOLCHAINS = OPS / "cmake" / "toolchains"
QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
FAMILIES = ("quantize", "qlinear", "attention", "gemm_float", "dispatch", "parallel")
# qemu CPU model -> (the ISA dispatch must pick, every ARM table the CPU must expose).
CPUS = {
    "cortex-a53": ("neon", ["neon"]),
    "cortex-a76": ("neondot", ["neon", "neondot"]),
    "max": ("i8mm", ["neon", "neondot", "i8mm"]),
}
ARM_ISAS = ("neon", "neondot", "i8mm")
TIMEOUT = 240
# zig builds its libc++ / musl on first use: minutes on a cold cache (over 4 on 2 busy cores).
ZIG_TIMEOUT = 900


def _require(tool, what):
    if tool is None:
        pytest.skip(f"{what} is not installed "
                    "(apt-get install g++-aarch64-linux-gnu qemu-user-static)")


def _cmake_build(build_dir, toolchain, env=None, timeout=TIMEOUT):
    """Configures and builds the kernel testers and tfqat_bench; returns the build directory."""
    _require(shutil.which("cmake"), "cmake")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and "Ninja" not in cache.read_text() and gen:
        gen = []  # an existing cache keeps its generator
    subprocess.run(
        ["cmake", "-S", str(OPS), "-B", str(build_dir), *gen,
         f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_BUILD_TYPE=Release",
         "-DTFQAT_BUILD_DELEGATE=OFF", "-DTFQAT_BUILD_TESTS=ON", "-DTFQAT_BUILD_BENCH=ON"],
        check=True, capture_output=True, text=True, env=env, timeout=timeout)
    targets = [f"tfqat_test_{f}" for f in FAMILIES] + ["tfqat_bench"]
    proc = subprocess.run(
        ["cmake", "--build", str(build_dir), "-j2", "--target", *targets],
        capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return build_dir


def _qemu(cpu, binary, *args, env_extra=None):
    env = dict(os.environ)
    env.pop("TFQAT_ISA", None)
    env.update(env_extra or {})
    return subprocess.run([QEMU, "-cpu", cpu, str(binary), *args], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT)


def _check_testers(build_dir, cpu):
    """Runs every tester under qemu -cpu `cpu`; asserts pass, the tables tested, the default."""
    want_default, want_arm = CPUS[cpu]
    for family in FAMILIES:
        proc = _qemu(cpu, build_dir / f"tfqat_test_{family}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{family} under -cpu {cpu} failed:\n{out[-4000:]}"
        tested = next(line for line in out.splitlines() if "] tested:" in line)
        names = tested.split("tested:")[1].split(";")[0].split()
        assert [n for n in names if n in ARM_ISAS] == want_arm, tested
        assert f"{family}] " in out and " 0 failures" in out, out[-2000:]
        if family == "qlinear":  # op 3g (group-wise scales) ran too
            assert re.search(r"cases per variant, [1-9]\d* of them with group-wise scales", out), out
        if family == "attention":  # op 4p + per-row probability scales (ATTN_PV p_mode=1) too
            assert re.search(r"cases per variant, [1-9]\d* with float probabilities", out), out
        if family == "dispatch":
            assert f"[dispatch] default: {want_default}\n" in out, out


@pytest.fixture(scope="module")
def gnu_build():
    _require(shutil.which("aarch64-linux-gnu-g++"), "aarch64-linux-gnu-g++")
    _require(QEMU, "qemu-aarch64-static")
    return _cmake_build(ROOT / "build" / "kernels-aarch64",
                        TOOLCHAINS / "aarch64-linux-gnu.cmake")


@pytest.mark.parametrize("cpu", list(CPUS))
def test_gnu_kernels_per_cpu(gnu_build, cpu):
    _check_testers(gnu_build, cpu)


@pytest.mark.parametrize("cpu,forced", [("cortex-a53", "i8mm"), ("cortex-a53", "neondot"),
                                        ("cortex-a76", "i8mm")])
def test_forcing_missing_isa_is_refused(gnu_build, cpu, forced):
    """TFQAT_ISA naming a path the CPU lacks fails with a message, never SIGILL."""
    proc = _qemu(cpu, gnu_build / "tfqat_bench", "--filter", "no-such-case",
                 env_extra={"TFQAT_ISA": forced})
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)  # negative = signal
    assert f"TFQAT_ISA={forced}: this CPU (or this build) lacks" in proc.stderr, proc.stderr


@pytest.mark.parametrize("cpu,forced", [("max", "neon"), ("max", "neondot"),
                                        ("cortex-a76", "neon")])
def test_forcing_available_isa_runs(gnu_build, cpu, forced):
    proc = _qemu(cpu, gnu_build / "tfqat_bench", "--filter", "no-such-case",
                 env_extra={"TFQAT_ISA": forced})
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)


def test_gnu_ctest_runs_under_emulator(gnu_build):
    """ctest runs through CMAKE_CROSSCOMPILING_EMULATOR (qemu -cpu ${TFQAT_QEMU_CPU}: max)."""
    _require(shutil.which("ctest"), "ctest")
    proc = subprocess.run(["ctest", "--test-dir", str(gnu_build), "-R", "kernels_dispatch",
                           "--output-on-failure"], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "100% tests passed" in proc.stdout, proc.stdout


def _zig_python():
    """A Python that can run `-m ziglang`: this one, else the repository's .venv."""
    if importlib.util.find_spec("ziglang") is not None:
        return sys.executable
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists() and subprocess.run([str(venv), "-c", "import ziglang"]).returncode == 0:
        return str(venv)
    return None


@pytest.mark.slow  # about 45 s with a warm zig cache, several minutes with a cold one
def test_zig_musl_kernels_max():
    _require(QEMU, "qemu-aarch64-static")
    py = _zig_python()
    if py is None:
        pytest.skip("ziglang is not installed (pip install ziglang)")
    env = dict(os.environ, TFQAT_ZIG_PYTHON=py)
    build_dir = _cmake_build(ROOT / "build" / "kernels-zig-aarch64",
                             TOOLCHAINS / "zig-aarch64-musl.cmake", env, ZIG_TIMEOUT)
    _check_testers(build_dir, "max")
