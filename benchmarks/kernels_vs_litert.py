"""Our kernels (tfqat_bench) beside LiteRT's own FULLY_CONNECTED, one thread, same shapes, same run.

LiteRT models are built with tf.lite.TFLiteConverter from a one-matmul tf.function:
  f32    float model (XNNPACK float FULLY_CONNECTED)
  dyn8   converter.optimizations = [DEFAULT]: int8 weights, activations quantized per call
  int4w  4-bit fake-quant weights + optimizations + converter._experimental_low_bit_qat:
         INT4 weight tensor, int8 dynamic activations (XNNPACK qd8 x qc4w)
Ours (tfqat_bench): fp32, fp16, w8a8, w4a8, w4a4 on codes, and w4a8_dyn = quantize_rows + qlinear_w4
(float in, float out: the like-for-like comparison with LiteRT's float-in int FULLY_CONNECTED).

Usage:
  python benchmarks/kernels_vs_litert.py [--bench build/kernels-bench/tfqat_bench] [--reps 200]
      [--json results.json] [--shapes 768x3072,3072x768]
Prints a markdown table and the goal checks; writes everything to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = [("llama58m", 512, 512), ("llama58m", 512, 1024), ("llama58m", 1024, 512),
          ("gpt2-97m", 768, 768), ("gpt2-97m", 768, 3072), ("gpt2-97m", 3072, 768)]
GOAL_SHAPE = (768, 3072)


def build_bench(build_dir: Path) -> Path:
    """Configures and builds tfqat_bench (Release) and returns its path."""
    exe = build_dir / "tfqat_bench"
    subprocess.run(["cmake", "-S", str(REPO / "tflite_ops"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DTFQAT_BUILD_DELEGATE=OFF", "-DTFQAT_BUILD_TESTS=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "tfqat_bench", "-j2"], check=True,
                   stdout=subprocess.DEVNULL)
    return exe


def run_ours(exe: Path, reps: int, name_filter: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "ours.json"
        subprocess.run([str(exe), "--reps", str(reps), "--filter", name_filter, "--json", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def litert_models(T: int, K: int, N: int) -> dict[str, bytes]:
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(K * 7 + N).uniform(-1, 1, (K, N)).astype(np.float32))
    spec = [tf.TensorSpec([T, K], tf.float32)]

    @tf.function(input_signature=spec)
    def dense(x):
        return tf.matmul(x, w)

    @tf.function(input_signature=spec)
    def dense_w4(x):
        return tf.matmul(x, tf.quantization.fake_quant_with_min_max_vars(w, -1.0, 1.0, num_bits=4, narrow_range=True))

    def convert(fn, optimize: bool, low_bit: bool) -> bytes:
        conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
        if optimize:
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if low_bit:
            conv._experimental_low_bit_qat = True  # noqa: SLF001 - the documented route to INT4 weights
        return conv.convert()

    return {"f32": convert(dense, False, False), "dyn8": convert(dense, True, False),
            "int4w": convert(dense_w4, True, True)}


def time_litert(model: bytes, T: int, K: int, reps: int) -> tuple[float, float, float, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    it.allocate_tensors()
    ops = [o["op_name"] for o in it._get_ops_details()]  # noqa: SLF001
    it.set_tensor(it.get_input_details()[0]["index"], np.random.default_rng(1).uniform(-1, 1, (T, K)).astype(np.float32))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.02:
        it.invoke()
    us = []
    for _ in range(reps):
        a = time.perf_counter()
        it.invoke()
        us.append((time.perf_counter() - a) * 1e6)
    return float(np.median(us)), float(np.percentile(us, 10)), float(np.percentile(us, 90)), ops


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, help="tfqat_bench binary (default: build it in build/kernels-bench)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", type=Path, default=REPO / "build" / "kernels_vs_litert.json")
    ap.add_argument("--shapes", default="", help="comma list of KxN to keep (default: all)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keep = {s for s in args.shapes.split(",") if s}
    shapes = [s for s in SHAPES if not keep or f"{s[1]}x{s[2]}" in keep]
    exe = args.bench or build_bench(REPO / "build" / "kernels-bench")

    # Per shape and T, ours and LiteRT back to back, so both see the same machine state (other
    # work on the host moves memory-bound timings by 10% or more over a minute).
    rows, ours_raw, machine = [], [], None
    for model, K, N in shapes:
        for T in (1, 128):
            prefix = f"{model}/{K}x{N}/T{T}/"
            ours = run_ours(exe, args.reps, prefix)
            machine = ours["machine"]
            ours_raw += ours["results"]
            by_name = {r["name"]: r for r in ours["results"]}
            lite = {}
            for kind, m in litert_models(T, K, N).items():
                med, p10, p90, ops = time_litert(m, T, K, args.reps)
                lite[kind] = {"median_us": med, "p10_us": p10, "p90_us": p90, "ops": ops, "bytes": len(m)}
            mine = {v: by_name[prefix + v]["median_us"] for v in
                    ("fp32", "fp16", "w8a8", "w4a8", "w4a4", "w4a8_dyn") if prefix + v in by_name}
            rows.append({"model": model, "K": K, "N": N, "T": T, "litert": lite, "ours_median_us": mine})

    hdr = ("| shape (T x K x N) | LiteRT f32 | LiteRT dyn-int8 | LiteRT int4w | our fp32 | our fp16 | our w8a8 "
           "| our w4a8 | our w4a8+quant | our w4a4 | w4a8 vs our fp32 | w4a8+quant vs LiteRT int4w "
           "| w4a8 vs LiteRT f32 | w4a4 vs w4a8 |")
    print(f"\nmachine: {machine}; one thread; medians in us\n")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        lt, o = r["litert"], r["ours_median_us"]
        print(f"| {r['T']}x{r['K']}x{r['N']} | {lt['f32']['median_us']:.1f} | {lt['dyn8']['median_us']:.1f} "
              f"| {lt['int4w']['median_us']:.1f} | {o['fp32']:.1f} | {o['fp16']:.1f} | {o['w8a8']:.1f} "
              f"| {o['w4a8']:.1f} | {o['w4a8_dyn']:.1f} | {o['w4a4']:.1f} | {o['fp32'] / o['w4a8']:.2f}x "
              f"| {lt['int4w']['median_us'] / o['w4a8_dyn']:.2f}x | {lt['f32']['median_us'] / o['w4a8']:.2f}x "
              f"| {o['w4a8'] / o['w4a4']:.2f}x |")

    goals = []
    for r in rows:
        if (r["K"], r["N"]) != GOAL_SHAPE:
            continue
        lt, o = r["litert"], r["ours_median_us"]
        if r["T"] == 1:
            goals.append(("W4A8 GEMV >= 4x our FP32 GEMV", o["fp32"] / o["w4a8"], 4.0))
            goals.append(("W4A8 GEMV (incl. quantize) no slower than LiteRT int4w FC",
                          lt["int4w"]["median_us"] / o["w4a8_dyn"], 1.0))
        else:
            goals.append(("W4A8 GEMM T=128 >= 2.5x XNNPACK float", lt["f32"]["median_us"] / o["w4a8"], 2.5))
            goals.append(("W4A4 GEMM >= 1.2x W4A8 GEMM", o["w4a8"] / o["w4a4"], 1.2))
    print("\n| goal (1x768 / 128x768 @ 768x3072) | ratio | target | met |\n|---|---|---|---|")
    for name, ratio, target in goals:
        print(f"| {name} | {ratio:.2f}x | {target}x | {'yes' if ratio >= target else 'NO'} |")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "reps": args.reps, "rows": rows, "ours_raw": ours_raw,
                                     "goals": [{"goal": g, "ratio": r, "target": t, "met": r >= t}
                                               for g, r, t in goals]}, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
