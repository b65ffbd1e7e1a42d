"""report.md, report.json and report.png for one run, laid out like EdgeQAT's Table IV.

Table IV gives ms/token with 128 input tokens for FP16, W8A8, W4A8, W4 with activations mixed
4:8 at 1:3, 1:1 and 3:1, and W4A4, with the speedup over FP16. We derive it from the
microbenchmark, not from an end-to-end model run:

* the LLaMA-58M linear layers (configs/llama-58m.yaml: hidden 512, FFN 1024, 16 layers) are,
  per layer, q/k/v/o = 4 x (K=512, N=512), gate/up = 2 x (K=512, N=1024), down = 1 x (K=1024,
  N=512): the shapes tfqat_bench names llama58m/512x512, 512x1024 and 1024x512;
* each layer's time is the sum of those 7 GEMMs' medians at T = 128 tokens (one prefill of 128
  tokens), the stack's time is 16 x that, and ms/token = stack time / 128;
* so it covers the linear layers only: not attention (QK/PV), norms, embedding, the LM head or
  activation quantization, and it is single-threaded, pinned to the big cores.

A 4:8 ratio "a:b" is the share of tokens at 4 bit to tokens at 8 bit: 1:3 -> 25% of tokens
4-bit (the microbenchmark's w4a48_r75, rho = 0.75 of tokens 8-bit), 1:1 -> r50, 3:1 -> r25.

On the emulated device the same derivation runs on exact guest instruction counts (millions of
aarch64 instructions per token) instead of time: a count, never a time.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from . import atomic_write_bytes, atomic_write_json, atomic_write_text

TABLE_ROWS = [  # (Table IV label, microbenchmark variant)
    ("FP16", "fp16"),
    ("W8A8", "w8a8"),
    ("W4A8", "w4a8"),
    ("W4A4:8 (1:3)", "w4a48_r75"),
    ("W4A4:8 (1:1)", "w4a48_r50"),
    ("W4A4:8 (3:1)", "w4a48_r25"),
    ("W4A4", "w4a4"),
]
LLAMA58M_LAYER = [  # (K, N, how many per layer, which)
    (512, 512, 4, "q, k, v, o"),
    (512, 1024, 2, "gate, up"),
    (1024, 512, 1, "down"),
]
LLAMA58M_LAYERS = 16
PREFILL_TOKENS = 128
DERIVATION = (
    "ms/token = 16 layers x sum over one LLaMA-58M layer's linear layers of the T=128 GEMM median "
    "(4 x 512x512 q/k/v/o + 2 x 512x1024 gate/up + 1 x 1024x512 down) / 128 tokens; linear layers only "
    "(no attention, norms, embedding, LM head, activation quantization); one thread on the big cores. "
    "W4A4:8 (a:b) = a share of tokens at 4 bit to b at 8 bit (1:3 = 25% 4-bit).")
DERIVATION_COUNTS = DERIVATION.replace("ms/token", "Minsn/token").replace(
    "T=128 GEMM median", "T=128 kernel call's exact guest instruction count").replace(
    "one thread on the big cores", "one thread under qemu-user; instruction counts, not time")


def _lookup(values: dict, K: int, N: int, variant: str):
    return values.get((K, N, variant))


def table_iv(values: dict, per_token_scale: float) -> list[dict]:
    """values: {(K, N, variant): per-call value at T=128}. Rows with value = per token."""
    rows = []
    for label, variant in TABLE_ROWS:
        parts = [_lookup(values, K, N, variant) for K, N, _, _ in LLAMA58M_LAYER]
        if any(p is None for p in parts):
            per_layer = None
        else:
            per_layer = sum(c * p for (_, _, c, _), p in zip(LLAMA58M_LAYER, parts))
        value = None if per_layer is None else LLAMA58M_LAYERS * per_layer / PREFILL_TOKENS * per_token_scale
        rows.append({"config": label, "variant": variant, "per_layer": per_layer, "value": value})
    base = rows[0]["value"]
    for r in rows:
        r["speedup_vs_fp16"] = (base / r["value"]) if (base and r["value"]) else None
    return rows


def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.{nd}f}"


def build_tables(result: dict) -> list[dict]:
    tables = []
    agg = result.get("microbench", {}).get("aggregate", [])
    if agg:
        vals = {}
        for r in agg:
            name = r["name"]
            if name.startswith("llama58m/") and r["T"] == PREFILL_TOKENS:
                vals[(r["K"], r["N"], name.rsplit("/", 1)[1])] = r["median_us"]
        isa = next((r.get("isa") for r in agg if r.get("isa")), "")
        tables.append({"kind": "time", "title": f"Table IV: ms/token, 128 input tokens ({isa} kernels)",
                       "unit": "ms/token", "isa": isa, "derivation": DERIVATION,
                       "rows": table_iv(vals, 1e-3), "per_shape": _per_shape(vals, "us")})
    for c in result.get("insn_counts", []):
        vals = {(x["K"], x["N"], x["variant"]): x["insns"] for x in c.get("cases", [])
                if x.get("model") == "llama58m" and x.get("T") == PREFILL_TOKENS}
        tables.append({"kind": "count", "title": f"Table IV as instruction counts: qemu -cpu {c['qemu_cpu']} "
                                                 f"({c['isa']} kernels); counts, not time",
                       "unit": "Minsn/token", "isa": c["isa"], "qemu_cpu": c["qemu_cpu"],
                       "derivation": DERIVATION_COUNTS, "rows": table_iv(vals, 1e-6),
                       "per_shape": _per_shape(vals, "insns")})
    return tables


def _per_shape(vals: dict, unit: str) -> list[dict]:
    out = []
    for label, variant in TABLE_ROWS:
        row = {"config": label, "variant": variant, "unit": unit}
        for K, N, _, _ in LLAMA58M_LAYER:
            row[f"{K}x{N}"] = vals.get((K, N, variant))
        out.append(row)
    return out


def render_markdown(result: dict, tables: list[dict]) -> str:
    dev = result.get("device", {}) or {}
    b = result.get("build", {}) or {}
    L = [f"# tfqat on-device benchmark: {result.get('transport', '?')}", ""]
    if result.get("status") != "ok":
        L += [f"**Status: {result.get('status')}** - {result.get('error') or ''}", "",
              "Results below are what was gathered before the failure.", ""]
    for t in tables:
        L += [f"## {t['title']}", ""]
        if t["kind"] == "time":
            L += ["| config | ms/token | speedup vs FP16 | one layer (us, T=128) |", "|---|---|---|---|"]
            for r in t["rows"]:
                sp = f"{r['speedup_vs_fp16']:.2f}x" if r["speedup_vs_fp16"] else "n/a"
                L.append(f"| {r['config']} | {_fmt(r['value'], 3)} | {sp} | {_fmt(r['per_layer'], 1)} |")
        else:
            L += ["| config | Minsn/token | FP16 / this (count ratio) | one layer (insns, T=128) |",
                  "|---|---|---|---|"]
            for r in t["rows"]:
                sp = f"{r['speedup_vs_fp16']:.2f}x" if r["speedup_vs_fp16"] else "n/a"
                pl = f"{int(r['per_layer']):,}" if r["per_layer"] is not None else "n/a"
                L.append(f"| {r['config']} | {_fmt(r['value'], 2)} | {sp} | {pl} |")
        L += ["", f"Derivation: {t['derivation']}", ""]
        unit = "median us" if t["kind"] == "time" else "guest instructions"
        L += [f"Per kernel call at T=128 ({unit}):", "",
              "| config | 512x512 | 512x1024 | 1024x512 |", "|---|---|---|---|"]
        for r in t["per_shape"]:
            cells = []
            for s in ("512x512", "512x1024", "1024x512"):
                v = r.get(s)
                cells.append("n/a" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.1f}"))
            L.append(f"| {r['config']} | " + " | ".join(cells) + " |")
        L.append("")
    if result.get("benchmark_model"):
        L += ["## benchmark_model", "",
              "| model | signature | delegate | runner | threads | runs | avg (us) | first (us) | init (us) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in result["benchmark_model"]:
            L.append(f"| {r['model']} | {r.get('signature') or '-'} | {r['delegate']} | "
                     f"{r.get('runner', 'benchmark_model')} | {r['num_threads']} | {r['num_runs']} | "
                     f"{_fmt(r.get('avg_us'), 1)} | {_fmt(r.get('first_us'), 1)} | {_fmt(r.get('init_us'), 1)} |")
        L += ["", "Runner: benchmark_model = LiteRT's stock tool; litert-python = android_bench.litert_benchmark "
                  "(the same flags and timings on the LiteRT Python runtime, a few us of Python per run).", ""]
    agg = result.get("microbench", {}).get("aggregate", [])
    if agg:
        L += ["## All microbenchmark cases", "", "| case | isa | median us | p10 | p90 | runs |",
              "|---|---|---|---|---|---|"]
        for r in agg:
            L.append(f"| {r['name']} | {r.get('isa', '')} | {r['median_us']:.2f} | {r['p10_us']:.2f} | "
                     f"{r['p90_us']:.2f} | {r['runs']} |")
        L.append("")
    L += ["## Device", ""]
    for k in ("transport", "serial", "manufacturer", "model", "soc", "android", "sdk", "board", "os", "hostname",
              "abi", "cpu_model", "qemu", "cpus", "big_cores", "pin_mask", "kernel_features", "max_freq_khz",
              "measure"):
        if dev.get(k) not in (None, "", [], {}):
            v = dev[k]
            L.append(f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    bm = dev.get("bench_machine")
    if bm:
        L.append(f"- kernels selected by tfqat_bench: {bm.get('isa_selected')} (available: {bm.get('isa_available')})")
    L += ["", "## Build", ""]
    for k in ("toolchain", "target", "compiler", "cxx_flags", "exe_linker_flags", "build_type", "git",
              "delegate_loads_in"):
        if b.get(k):
            L.append(f"- {k}: {b[k]}")
    for name, a in (b.get("artifacts") or {}).items():
        L.append(f"- {name}: {a['bytes']:,} bytes, sha256 {a['sha256'][:16]}...")
    s = result.get("settings", {})
    if s:
        L += ["", "## Settings", "", "- " + ", ".join(f"{k}={v}" for k, v in s.items())]
    L += ["", f"Cleanup: {result.get('cleanup')}", ""]
    return "\n".join(L)


def render_plot(tables: list[dict]) -> bytes | None:
    tables = [t for t in tables if any(r["value"] is not None for r in t["rows"])]
    if not tables:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tables):
        rows = [r for r in t["rows"] if r["value"] is not None]
        xs = range(len(rows))
        bars = ax.bar(xs, [r["value"] for r in rows],
                      color=["#888888" if r["variant"] == "fp16" else "#2b7bba" for r in rows])
        for bar, r in zip(bars, rows):
            if r["speedup_vs_fp16"]:
                ax.annotate(f"{r['speedup_vs_fp16']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["config"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(t["unit"] + (" (count, not time)" if t["kind"] == "count" else ""))
        ax.set_title(t["title"], fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(result: dict, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    tables = build_tables(result)
    rep = {
        "schema": "tfqat.android_bench.report/1",
        "status": result.get("status"), "error": result.get("error"),
        "transport": result.get("transport"), "device": result.get("device"), "build": result.get("build"),
        "tables": tables, "benchmark_model": result.get("benchmark_model", []),
        "cleanup": result.get("cleanup"),
    }
    atomic_write_json(out_dir / "report.json", rep)
    atomic_write_text(out_dir / "report.md", render_markdown(result, tables))
    png = render_plot(tables)
    if png:
        atomic_write_bytes(out_dir / "report.png", png)
    return rep


def rewrite_from(out_dir: str | Path) -> dict:
    """Re-render the report of an earlier run from its result.json."""
    from . import BenchError

    out_dir = Path(out_dir)
    src = out_dir / "result.json"
    if not out_dir.is_dir():
        raise BenchError(f"{out_dir}: no such folder; give the --out folder of a python -m android_bench run",
                         "usage")
    if not src.is_file():
        raise BenchError(f"{out_dir} holds no result.json, so it is not an android_bench run folder; give the "
                         "--out folder of a python -m android_bench run", "usage")
    try:
        result = json.loads(src.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{src}: damaged JSON ({e}); rerun python -m android_bench run --out {out_dir}",
                         "usage") from None
    if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("tfqat.android_bench.result/"):
        raise BenchError(f"{src} is not an android_bench result (no tfqat.android_bench.result schema)", "usage")
    return write_report(result, out_dir)
