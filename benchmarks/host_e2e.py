"""Host end-to-end benchmark: exported models in the stock LiteRT runtime, one thread.

For each config (``tiny``, ``llama-58m``; random weights, calibrated on random tokens):
the float export (builtins, XNNPACK), ai-edge-quantizer dynamic int8 / int4 versions of it, and
our TFQAT exports at w8a8, w4a8, w4a4-8 and w4a4. Measures ms/token of a 128-token prefill
(prefill time / 128), ms/token of decode (32 steps after that prefill), peak RSS of a process
that loads the model and runs both, and file size. Each model runs in its own subprocess (RSS).

    python benchmarks/host_e2e.py --configs tiny llama-58m --out build/host_e2e.json
    python benchmarks/host_e2e.py --configs tiny llama-58m --fast   # + o_proj dynamic8, int8 head
    python benchmarks/host_e2e.py --exports runs/smollm2-135m/export-w4a4-8 DIR2   # trained exports

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OURS = ["w8a8", "w4a8", "w4a4-8", "w4a4"]

_MEASURE = r"""
import json, resource, sys, time
import numpy as np
from tfqat.runtime import LiteModel
path, lib, prompt_len, decode_steps, reps = sys.argv[1], sys.argv[2] or None, *map(int, sys.argv[3:6])
def hwm_mb():  # VmHWM: this process image only (ru_maxrss survives exec from the TF parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
m = LiteModel(path, lib=lib, allow_float=True, num_threads=1)
rng = np.random.default_rng(0)
x = rng.integers(0, m.vocab_size, prompt_len)
m.prefill(x)  # warm-up (allocation, XNNPACK / delegate packing)
t = []
for _ in range(reps):
    t0 = time.perf_counter(); m.prefill(x); t.append(time.perf_counter() - t0)
pre = min(t) / prompt_len
d = []
for _ in range(max(1, reps // 2)):
    m.prefill(x)
    m.decode(1)  # warm-up of the decode subgraph
    t0 = time.perf_counter()
    for i in range(decode_steps):
        m.decode(int(i % m.vocab_size))
    d.append((time.perf_counter() - t0) / decode_steps)
print(json.dumps({"prefill_ms_per_token": 1e3 * pre, "decode_ms_per_token": 1e3 * min(d),
                  "peak_rss_mb": hwm_mb()}))
"""


def _variants(oproj: str, head: str, fast: bool) -> list:
    """(oproj, head) pairs to build for each recipe: the requested one, plus the fast
    deployment variant (o_proj dynamic8, int8 embedding / lm_head) with ``--fast``."""
    out = [(oproj, head)]
    if fast and (oproj, head) != ("dynamic8", "int8"):
        out.append(("dynamic8", "int8"))
    return out


def build_models(config: str, out: Path, oproj: str, recipes: list, head: str = "float",
                 fast: bool = False) -> dict:
    """Export the float model, the AEQ baselines and ours; returns {label: path}."""
    import numpy as np
    import tensorflow as tf

    from tfqat.config import load_config
    from tfqat.export import export_models
    from tfqat.models import build_model
    from tfqat.quant.qat import calibrate, quantize_model

    cfg = load_config(config).model
    out.mkdir(parents=True, exist_ok=True)
    tf.random.set_seed(0)
    teacher = build_model(cfg, name="teacher")
    rng = np.random.default_rng(0)
    calib = [rng.integers(0, cfg.vocab_size, (2, 128)).astype(np.int32)]
    paths = {}
    fdir = out / "float"
    if not (fdir / "model_float.tflite").is_file():
        student = quantize_model(teacher, recipes[0])
        calibrate(student, calib)
        export_models(student, teacher, fdir, oproj=oproj)
    paths["float (XNNPACK)"] = fdir / "model_float.tflite"
    for name, rfn in (("AEQ dynamic int8", "dynamic_wi8_afp32"), ("AEQ dynamic int4", "dynamic_wi4_afp32")):
        p = out / f"aeq_{rfn}.tflite"
        if not p.is_file():
            try:
                from ai_edge_quantizer import quantizer, recipe
            except ImportError:
                raise SystemExit("host_e2e: ai-edge-quantizer is not installed; pip install -e '.[bench]'") from None

            qt = quantizer.Quantizer(str(paths["float (XNNPACK)"]))
            qt.load_quantization_recipe(getattr(recipe, rfn)())
            qt.quantize().export_model(str(p), overwrite=True)
        paths[name] = p
    for o, h in _variants(oproj, head, fast):
        for r in recipes:
            d = out / f"ours-{r}-{o}-head{h}"
            if not (d / "model.tflite").is_file():
                student = quantize_model(teacher, r)
                calibrate(student, calib)
                export_models(student, None, d, oproj=o, head=h)
            label = f"ours {r}" + ("" if (o, h) == ("float", "float") else f" (o {o}, head {h})")
            paths[label] = d / "model.tflite"
    return paths


def measure(path: Path, lib: str, prompt_len: int, decode_steps: int, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), lib, str(prompt_len),
                           str(decode_steps), str(reps)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["size_mb"] = path.stat().st_size / 1e6
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "llama-58m"])
    ap.add_argument("--recipes", nargs="+", default=OURS)
    ap.add_argument("--oproj", default="float", choices=["float", "dynamic8"])
    ap.add_argument("--head", default="float", choices=["float", "int8"],
                    help="embedding / lm_head of our exports (tfqat.export --head)")
    ap.add_argument("--fast", action="store_true",
                    help="also build each recipe with --oproj dynamic8 --head int8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default=str(ROOT / "build" / "host_e2e"))
    ap.add_argument("--out", default=str(ROOT / "build" / "host_e2e.json"))
    ap.add_argument("--lib", default=None)
    ap.add_argument("--exports", nargs="+", metavar="DIR",
                    help="instead of --configs: measure these export folders of trained runs (python -m "
                         "tfqat.export --out DIR): the first one's model_float.tflite and each one's model.tflite")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfqat.runtime import find_library

    lib = args.lib or find_library()
    results = {"host": os.uname().machine, "threads": 1, "prompt_len": args.prompt_len,
               "decode_steps": args.decode_steps, "oproj": args.oproj, "head": args.head,
               "configs": {}}
    groups = {"exports": None} if args.exports else {c: None for c in args.configs}
    for config in groups:
        t0 = time.perf_counter()
        if args.exports:
            dirs = [Path(d) for d in args.exports]
            paths = {"float (XNNPACK)": dirs[0] / "model_float.tflite",
                     **{f"ours {d.name}": d / "model.tflite" for d in dirs}}
            missing = [str(p) for p in paths.values() if not p.is_file()]
            if missing:
                raise SystemExit(f"host_e2e: {missing[0]} does not exist; export the run first "
                                 "(python -m tfqat.export --run runs/<name> --out DIR)")
        else:
            paths = build_models(config, Path(args.work) / config, args.oproj, args.recipes,
                                 args.head, args.fast)
        rows = {label: {"path": str(p), **measure(p, lib, args.prompt_len, args.decode_steps, args.reps)}
                for label, p in paths.items()}
        base = rows["float (XNNPACK)"]
        for r in rows.values():
            if "error" not in r and "error" not in base:
                r["prefill_speedup"] = base["prefill_ms_per_token"] / r["prefill_ms_per_token"]
                r["decode_speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
                r["size_ratio"] = r["size_mb"] / base["size_mb"]
        results["configs"][config] = {"rows": rows, "build_s": round(time.perf_counter() - t0, 1)}
        print(f"\n### {config} (1 thread, {args.prompt_len}-token prefill, o_proj {args.oproj}, "
              f"head {args.head})\n")
        print("| model | prefill ms/tok | decode ms/tok | peak RSS MB | size MB | prefill x | decode x | size x |")
        print("|---|---|---|---|---|---|---|---|")
        for label, r in rows.items():
            if "error" in r:
                print(f"| {label} | error: {r['error']} | | | | | | |")
                continue
            print(f"| {label} | {r['prefill_ms_per_token']:.3f} | {r['decode_ms_per_token']:.3f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['size_mb']:.2f} | {r.get('prefill_speedup', 0):.2f} | "
                  f"{r.get('decode_speedup', 0):.2f} | {r.get('size_ratio', 0):.2f} |")
        aeq4 = rows.get("AEQ dynamic int4", {})
        for label, r in rows.items():
            if not label.startswith("ours w4a4-8") or "error" in r or "error" in base:
                continue
            goals = {"prefill >= 2.5x float": r["prefill_speedup"] >= 2.5,
                     "decode >= 3x float": r["decode_speedup"] >= 3.0,
                     "faster than AEQ int4 (prefill and decode)": "error" not in aeq4 and
                     r["prefill_ms_per_token"] < aeq4.get("prefill_ms_per_token", 0) and
                     r["decode_ms_per_token"] < aeq4.get("decode_ms_per_token", 0),
                     "size <= 0.3x float": r["size_ratio"] <= 0.3}
            r["goals"] = goals
            print(f"\ngoals, {label}: " + "; ".join(f"{k}: {'met' if v else 'MISSED'}"
                                                    for k, v in goals.items()))
        sys.stdout.flush()
    from tfqat.atomic import write_json_atomic

    write_json_atomic(args.out, results)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
