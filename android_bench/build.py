"""Cross-compile what a device runs: tfqat_bench, tfqat_insn_probe and libtfqat_ops.so.

Toolchains (``--toolchain``, default ``auto``):

* ``android-ndk``: when ``ANDROID_NDK_HOME`` is set (tflite_ops/cmake/toolchains/android-arm64.cmake,
  API 29, arm64-v8a): bionic binaries and a delegate that Android's ``benchmark_model`` can load.
* ``aarch64-linux-gnu``: Debian's cross g++, ``-static`` executables (they run unchanged from
  ``/data/local/tmp`` on a phone, on a Raspberry Pi, or under qemu-user). Its libtfqat_ops.so is a
  glibc library: usable on Linux boards, not inside Android processes.
* ``zig``: ``python -m ziglang`` (PyPI ziglang), aarch64-linux-musl, static; no delegate.
* ``host``: a native build for ``--transport local``.

``auto`` picks android-ndk, then aarch64-linux-gnu, then zig. Each builds into
``build/android-bench-<toolchain>/`` and writes ``manifest.json`` there (toolchain, compiler,
flags, git revision, artifacts with sha256), which the report quotes as the build facts.

The qemu instruction-count plugin (android_bench/native/insn_count_plugin.c) is a host library;
it is built on demand by :func:`build_plugin` into ``build/android-bench-plugin/``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import REPO_ROOT, BenchError, atomic_write_json

TOOLCHAINS = ("android-ndk", "aarch64-linux-gnu", "zig", "host")
NATIVE_DIR = Path(__file__).resolve().parent / "native"
TOOLCHAIN_FILES = {
    "android-ndk": REPO_ROOT / "tflite_ops/cmake/toolchains/android-arm64.cmake",
    "aarch64-linux-gnu": REPO_ROOT / "tflite_ops/cmake/toolchains/aarch64-linux-gnu.cmake",
    "zig": REPO_ROOT / "tflite_ops/cmake/toolchains/zig-aarch64-musl.cmake",
}
CONFIGURE_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 1800


def build_dir_for(toolchain: str, root: Path | None = None) -> Path:
    return (root or REPO_ROOT / "build") / f"android-bench-{toolchain}"


def _have_zig() -> bool:
    try:
        r = subprocess.run([sys.executable, "-c", "import ziglang"], capture_output=True, timeout=60)
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_toolchain(requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in TOOLCHAINS:
            raise BenchError(f"unknown toolchain {requested!r}; choose one of: auto, {', '.join(TOOLCHAINS)}", "usage")
        if requested == "android-ndk" and not os.environ.get("ANDROID_NDK_HOME"):
            raise BenchError("--toolchain android-ndk needs ANDROID_NDK_HOME=/path/to/android-ndk", "build")
        return requested
    if os.environ.get("ANDROID_NDK_HOME"):
        return "android-ndk"
    if shutil.which("aarch64-linux-gnu-g++"):
        return "aarch64-linux-gnu"
    if _have_zig():
        return "zig"
    raise BenchError(
        "no arm64 toolchain: set ANDROID_NDK_HOME, or apt-get install g++-aarch64-linux-gnu, "
        "or pip install ziglang", "build")


def _run(cmd: list[str], log: Path, timeout: int, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise BenchError(f"build step timed out after {timeout} s: {' '.join(cmd[:3])} ... (log: {log})", "timeout")
        except OSError as e:
            raise BenchError(f"cannot run {cmd[0]}: {e}", "build")
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise BenchError(f"build failed ({' '.join(cmd[:2])} ...): {tail[0][:200]} (log: {log})", "build")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown"


def _git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def build(toolchain: str = "auto", build_root: Path | None = None, jobs: int | None = None,
          delegate: bool | None = None) -> dict:
    """Configure and build; returns the manifest (also written to <build dir>/manifest.json)."""
    tc = pick_toolchain(toolchain)
    out = build_dir_for(tc, build_root)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "build.log"
    log.write_text("")
    if shutil.which("cmake") is None:
        raise BenchError("cmake not found (apt-get install cmake, or pip install cmake)", "build")
    if delegate is None:
        delegate = tc != "zig"  # zig/musl static: no shared library worth shipping
    cfg = ["cmake", "-S", str(NATIVE_DIR), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release",
           f"-DTFQAT_BUILD_DELEGATE={'ON' if delegate else 'OFF'}", "-DTFQAT_BUILD_TESTS=OFF"]
    if tc in TOOLCHAIN_FILES:
        cfg.append(f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN_FILES[tc]}")
    t0 = time.monotonic()
    _run(cfg, log, CONFIGURE_TIMEOUT_S)
    _run(["cmake", "--build", str(out), "-j", str(jobs or os.cpu_count() or 2)], log, BUILD_TIMEOUT_S)
    artifacts = {}
    for name, rel in (("tfqat_bench", "tflite_ops/tfqat_bench"), ("tfqat_insn_probe", "tfqat_insn_probe"),
                      ("libtfqat_ops.so", "tflite_ops/libtfqat_ops.so")):
        p = out / rel
        if p.exists():
            artifacts[name] = {"path": str(p.relative_to(out)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
    if "tfqat_bench" not in artifacts:
        raise BenchError(f"build produced no tfqat_bench in {out}", "build")
    cache = {}
    for line in (out / "CMakeCache.txt").read_text(errors="replace").splitlines():
        if ":" in line and "=" in line and not line.startswith(("//", "#")):
            k, v = line.split("=", 1)
            cache[k.split(":")[0]] = v
    cxx = cache.get("CMAKE_CXX_COMPILER", "")
    for f in sorted(out.glob("CMakeFiles/*/CMakeCXXCompiler.cmake")):
        m = re.search(r'set\(CMAKE_CXX_COMPILER "([^"]+)"\)', f.read_text(errors="replace"))
        if m:
            cxx = m.group(1)
    manifest = {
        "toolchain": tc,
        "target": {"android-ndk": "aarch64-linux-android29 (arm64-v8a, bionic)",
                   "aarch64-linux-gnu": "aarch64-linux-gnu (glibc, static executables)",
                   "zig": "aarch64-linux-musl (static)", "host": "host"}[tc],
        "compiler": _first_line([cxx, "--version"]) if tc != "zig" else "zig c++ " + _first_line(
            [sys.executable, "-m", "ziglang", "version"]),
        "cxx_flags": " ".join(x for x in (cache.get("CMAKE_CXX_FLAGS", ""), cache.get("CMAKE_CXX_FLAGS_RELEASE", ""),
                                          "-ffp-contract=off") if x).strip(),
        "exe_linker_flags": cache.get("CMAKE_EXE_LINKER_FLAGS", "").strip(),
        "build_type": cache.get("CMAKE_BUILD_TYPE", "Release"),
        "git": _git_rev(),
        "build_dir": str(out),
        "build_seconds": round(time.monotonic() - t0, 1),
        "artifacts": artifacts,
        "delegate_loads_in": {"android-ndk": "Android processes (benchmark_model, apps)",
                              "aarch64-linux-gnu": "aarch64 glibc Linux processes (boards), not Android",
                              "host": "host processes", "zig": "n/a"}[tc] if "libtfqat_ops.so" in artifacts else "not built",
    }
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def load_manifest(build_dir: Path) -> dict | None:
    import json

    p = Path(build_dir) / "manifest.json"
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    for a in m.get("artifacts", {}).values():
        if not (Path(build_dir) / a["path"]).exists():
            return None
    return m


def find_or_build(toolchains: list[str], build_root: Path | None = None, auto_build: bool = True) -> tuple[Path, dict]:
    """The first existing build among ``toolchains``; else build the first buildable one."""
    for tc in toolchains:
        d = build_dir_for(tc, build_root)
        m = load_manifest(d)
        if m:
            return d, m
    if not auto_build:
        raise BenchError(f"no build found (looked for {', '.join(toolchains)}); run: python -m android_bench build",
                         "build")
    last: BenchError | None = None
    for tc in toolchains:
        try:
            pick_toolchain(tc)
        except BenchError as e:
            last = e
            continue
        m = build(tc, build_root)
        return build_dir_for(tc, build_root), m
    raise last or BenchError("no usable toolchain", "build")


def build_plugin(build_root: Path | None = None) -> Path:
    """Build the qemu instruction-count plugin (a host shared library) if it is missing or stale."""
    src = NATIVE_DIR / "insn_count_plugin.c"
    out = (build_root or REPO_ROOT / "build") / "android-bench-plugin" / "libinsn_count.so"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise BenchError("no host C compiler (gcc) to build the qemu plugin", "build")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-o", str(tmp), str(src)],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise BenchError("building the qemu plugin timed out", "timeout")
    if r.returncode != 0:
        raise BenchError(f"building the qemu plugin failed: {(r.stderr or r.stdout).strip()[:200]}", "build")
    os.replace(tmp, out)
    return out
