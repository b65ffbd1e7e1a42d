"""python -m android_bench {build,run,report} (see android_bench/__init__.py)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import REPO_ROOT, BenchError

TOOLCHAINS_FOR = {
    "adb": ["android-ndk", "aarch64-linux-gnu", "zig"],
    "ssh": ["aarch64-linux-gnu", "zig"],
    "emulated": ["aarch64-linux-gnu", "zig"],
    "local": ["host"],
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m android_bench",
                                description="tfqat kernels on phones (adb), boards (ssh), the host, or qemu")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="cross-compile tfqat_bench, tfqat_insn_probe and libtfqat_ops.so")
    b.add_argument("--toolchain", default="auto",
                   help="auto (default: android-ndk if ANDROID_NDK_HOME, else aarch64-linux-gnu, else zig), "
                        "android-ndk, aarch64-linux-gnu, zig or host")
    b.add_argument("--build-root", type=Path, default=None, help="default: <repo>/build")
    b.add_argument("--jobs", "-j", type=int, default=None)
    b.add_argument("--no-delegate", action="store_true", help="skip libtfqat_ops.so")

    r = sub.add_parser("run", help="benchmark on a device and write report.md / report.json / report.png")
    r.add_argument("--transport", choices=["adb", "ssh", "local", "emulated"], default="adb")
    r.add_argument("--serial", "-s", help="adb serial (adb devices); default: $ANDROID_SERIAL or the only device")
    r.add_argument("--host", help="ssh: user@board")
    r.add_argument("--port", type=int, help="ssh port")
    r.add_argument("--adb", help="the adb command line (default: $ADB or adb), e.g. 'adb -P 5038'")
    r.add_argument("--device-dir", help="where files are pushed (adb default /data/local/tmp/tfqat, "
                                        "ssh /tmp/tfqat-bench, local a fresh temp dir)")
    r.add_argument("--device-exec-prefix", default="",
                   help="prefix for running pushed binaries on the device, e.g. 'qemu-aarch64-static -cpu max' "
                        "on an emulated device without binfmt")
    r.add_argument("--model", action="append", default=[], help=".tflite for benchmark_model (repeatable: "
                                                                 "float and quantized)")
    r.add_argument("--benchmark-model", help="stock LiteRT benchmark_model binary for the device "
                                             "(default: ~/.cache/litert-cli/binaries/<abi>/benchmark_model), or "
                                             "litert-python: our runner on the LiteRT Python runtime, same flags "
                                             "and output (default for --transport local; runs where this "
                                             "host's Python does)")
    r.add_argument("--signature", help="the signature benchmark_model runs in multi-signature models "
                                       "(--signature_to_run_for; default prefill)")
    r.add_argument("--num-threads", type=int, default=1, help="benchmark_model --num_threads")
    r.add_argument("--num-runs", type=int, default=50, help="benchmark_model --num_runs")
    r.add_argument("--warmup-runs", type=int, default=5, help="benchmark_model --warmup_runs")
    r.add_argument("--bench-runs", type=int, default=3, help="microbenchmark: repeated process runs (median)")
    r.add_argument("--bench-warmup", type=int, default=1, help="microbenchmark: discarded warm-up runs")
    r.add_argument("--reps", type=int, default=30, help="microbenchmark: timed calls per case per run")
    r.add_argument("--bench-filter", action="append", default=[],
                   help="tfqat_bench --filter (repeatable: one process per filter; default llama58m)")
    r.add_argument("--qemu-cpu", action="append", default=[],
                   help="emulated: qemu -cpu model(s): max (i8mm), cortex-a76 (dotprod), cortex-a53 (neon)")
    r.add_argument("--count-filter", default="", help="emulated: only kernel cases containing this")
    r.add_argument("--toolchain", default="auto", help="which build to use (default: per transport)")
    r.add_argument("--build-dir", type=Path, help="use this build directory (with manifest.json)")
    r.add_argument("--build-root", type=Path, default=None)
    r.add_argument("--no-build", action="store_true", help="fail instead of building when no build exists")
    r.add_argument("--timeout", type=float, default=600.0, help="seconds per device step (default 600)")
    r.add_argument("--out", type=Path, help="output directory (default runs/android_bench/<transport>-<time>)")

    rp = sub.add_parser("report", help="re-render report.md/json/png from a run's result.json")
    rp.add_argument("out", type=Path)
    return p


def _cmd_build(a) -> int:
    from .build import build, build_plugin

    m = build(a.toolchain, a.build_root, a.jobs, delegate=False if a.no_delegate else None)
    print(f"built {m['toolchain']} ({m['compiler']}) into {m['build_dir']}:")
    for name, art in m["artifacts"].items():
        print(f"  {name}: {art['bytes']:,} bytes")
    if m["toolchain"] != "host":
        try:
            print(f"  qemu instruction-count plugin: {build_plugin(a.build_root)}")
        except BenchError as e:
            print(f"  qemu instruction-count plugin not built: {e}")
    return 0


def _cmd_run(a) -> int:
    """Inputs first (build folder, models, benchmark_model), then the device, then a build if one is
    needed: a missing file or an absent phone is reported in seconds, not after a cross build."""
    from .build import build_plugin, find_or_build, load_manifest
    from .transports import make_transport, run_session

    for flag, value, least in (("--num-runs", a.num_runs, 1), ("--warmup-runs", a.warmup_runs, 0),
                               ("--num-threads", a.num_threads, 1), ("--bench-runs", a.bench_runs, 1),
                               ("--bench-warmup", a.bench_warmup, 0), ("--reps", a.reps, 1)):
        if value < least:
            raise BenchError(f"{flag} {value}: must be at least {least}", "usage")
    if a.timeout <= 0:
        raise BenchError(f"--timeout {a.timeout:g}: must be a positive number of seconds", "usage")
    build_dir = manifest = None
    if a.build_dir:
        manifest = load_manifest(a.build_dir)
        if not manifest:
            raise BenchError(f"{a.build_dir} has no complete build (manifest.json); run python -m android_bench build",
                             "build")
        build_dir = a.build_dir
    tcs = TOOLCHAINS_FOR[a.transport] if a.toolchain == "auto" else [a.toolchain]
    if a.toolchain == "auto" and a.transport == "adb" and not os.environ.get("ANDROID_NDK_HOME"):
        tcs = [t for t in tcs if t != "android-ndk"]
    out = a.out or REPO_ROOT / "runs" / "android_bench" / f"{a.transport}-{time.strftime('%Y%m%d-%H%M%S')}"
    t = make_transport(a.transport, serial=a.serial, host=a.host, port=a.port, adb=a.adb, timeout=a.timeout,
                       device_dir=a.device_dir, exec_prefix=a.device_exec_prefix,
                       qemu_cpu=(a.qemu_cpu[0] if a.qemu_cpu else None))

    def builder():  # after the device check
        if a.transport == "emulated":
            t.plugin = build_plugin(a.build_root)
        return find_or_build(tcs, a.build_root, auto_build=not a.no_build)

    if build_dir is not None and a.transport == "emulated":
        t.plugin = build_plugin(a.build_root)
    try:
        run_session(t, Path(build_dir) if build_dir else None, manifest, out, filters=a.bench_filter or None,
                    reps=a.reps, bench_runs=a.bench_runs, bench_warmup=a.bench_warmup, models=a.model,
                    benchmark_model=a.benchmark_model, num_threads=a.num_threads, num_runs=a.num_runs,
                    warmup_runs=a.warmup_runs, qemu_cpus=a.qemu_cpu or None, count_filter=a.count_filter,
                    signature=a.signature, builder=builder)
    except BenchError as e:
        e.out = out
        raise
    print(f"[android_bench] report: {out / 'report.md'}")
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "build":
            return _cmd_build(a)
        if a.cmd == "run":
            return _cmd_run(a)
        if a.cmd == "report":
            from .report import rewrite_from

            rewrite_from(a.out)
            print(f"[android_bench] report: {a.out / 'report.md'}")
            return 0
    except BenchError as e:
        out = getattr(e, "out", None)
        kept = f" (results so far: {out})" if out and Path(out, "result.json").exists() else ""
        print(f"android_bench: error: {e}{kept}", file=sys.stderr)
        return 2 if e.kind == "usage" else 1
    except KeyboardInterrupt:
        print("android_bench: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
