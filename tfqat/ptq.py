"""``python -m tfqat.ptq --method agile-quant``: post-training rows (Agile-Quant, METHOD.md sec. 5).

Rows, on the same model and held-out windows: FP; RTN W4A8 (the pipeline's RTN); Agile-Quant
W4A8 (TRIP activations, 4-bit log2 probs, GPTQ g128 act-order weights) and the same with group
RTN weights (ablation); Agile-Quant (and FP) with token pruning for each ``--prune`` schedule;
EdgeQAT QAT rows when ``<qat-run>/qat-w4a8`` / ``qat-w4a4-8`` hold trained students.
Calibration: ``qat.calib_batches`` training batches (never held-out text). Writes
``runs/<name>/ptq/report.md`` and ``report.json``; evaluations are cached there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import UserError, add_common_args, die, load_cli_config


def build_parser():
    ap = argparse.ArgumentParser(prog="python -m tfqat.ptq", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--method", choices=["agile-quant"], default="agile-quant")
    ap.add_argument("--teacher", help="FP weights (.weights.h5); default runs/<name>/fp/teacher.weights.h5")
    ap.add_argument("--prune", action="append", default=None, metavar="SCHEDULE",
                    help="pruning schedule: per-layer fractions '0.2,0.2,0.2,0' of the prunable tokens, or "
                         "'progressive:R' (repeatable; default: progressive:0.25 and progressive:0.5; 'none': no rows)")
    ap.add_argument("--qat-run", help="run folder holding qat-w4a8 / qat-w4a4-8 (default runs/tiny)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the group-RTN-weights Agile row")
    return ap


def table(rows):
    lines = ["| method | recipe | prune | perplexity | x FP | BLiMP | size (MB) | tokens per layer | prefill FLOPs x |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    fp = next((r["perplexity"] for r in rows if r["method"] == "FP" and not r.get("prune")), None)

    def f(v, s):
        return "—" if v is None else format(v, s)
    for r in rows:
        tok = r.get("mean_tokens_per_layer")
        lines.append(
            f"| {r['method']} | {r['recipe']} | {r.get('prune') or '—'} | {r['perplexity']:.3f} | "
            f"{f(r['perplexity'] / fp if fp else None, '.3f')} | "
            f"{f(None if r.get('blimp') is None else 100 * r['blimp'], '.1f')} | {f(r.get('size_mb'), '.2f')} | "
            f"{'/'.join(f'{t:.0f}' for t in tok) if tok else '—'} | {f(r.get('prefill_flops_ratio'), '.3f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    with die():
        import numpy as np

        from . import pipeline
        from .agile.build import agile_size_bytes, agile_student
        from .agile.pruning import parse_schedule, prefill_cost, prefill_tokens, pruned_perplexity, time_prefill
        from .agile.trip import fold_student
        from .evaluate import evaluate_model, keras_logprob_fn
        from .quant.qat import calibration_batches, load_student, logprob_fn, model_size_bytes, rtn_student
        from .report import write_report

        t0 = time.perf_counter()
        cfg = load_cli_config(args)
        out = cfg.run_dir / "ptq"
        data = pipeline.load_data(cfg, progress)
        tpath = Path(args.teacher) if args.teacher else pipeline.teacher_path(cfg)
        if not tpath.is_file():
            raise UserError(f"no FP teacher at {tpath}; train one (python -m tfqat.train --stage fp "
                            f"--name {cfg.name}) or pass --teacher")
        teacher = pipeline.build_fp_model(cfg)
        teacher.load_weights(str(tpath))
        fpr = pipeline.fingerprint(str(tpath), tpath.stat().st_mtime_ns, cfg.qat.calib_batches)

        def ev(key, fn, with_blimp=True):
            return pipeline.cached_eval(out / f"eval_{key}.json", pipeline.eval_fingerprint(cfg, data, fpr, key), fn)

        rows, extra = [], {"teacher": str(tpath), "calib_batches": cfg.qat.calib_batches,
                           "calib_batch_size": cfg.qat.train.batch_size}
        params = int(sum(int(v.numpy().size) for v in teacher.weights))
        e = ev("fp", lambda: evaluate_model(keras_logprob_fn(teacher), data, cfg, progress))
        rows.append(pipeline.result_row("FP", "fp32", e, params * 4))
        print(f"FP {e['perplexity']:.3f}", flush=True)
        e = ev("rtn_w4a8", lambda: evaluate_model(logprob_fn(rtn_student(cfg, data, teacher, "w4a8")), data, cfg, progress))
        rows.append(pipeline.result_row("RTN", "w4a8 (per-channel MSE clip, LSQ act, 8-bit probs)", e,
                                        model_size_bytes(cfg.model, "w4a8")["total"]))
        print(f"RTN w4a8 {e['perplexity']:.3f}", flush=True)

        calib = calibration_batches(cfg, data)
        t = time.perf_counter()
        agile = agile_student(teacher, calib, "gptq", progress=progress)
        extra["agile_build_s"] = round(time.perf_counter() - t, 1)
        size = agile_size_bytes(cfg.model)
        e = ev("agile_gptq", lambda: evaluate_model(keras_logprob_fn(agile), data, cfg, progress))
        desc = "w4a8 (TRIP a8, log2 4-bit probs, GPTQ g128 act-order)"
        rows.append(pipeline.result_row("Agile-Quant", desc, e, size))
        print(f"Agile gptq {e['perplexity']:.3f}", flush=True)
        if not args.no_ablation:
            e = ev("agile_rtn", lambda: evaluate_model(keras_logprob_fn(agile_student(teacher, calib, "rtn")),
                                                        data, cfg, progress))
            rows.append(pipeline.result_row("Agile-Quant (ablation)", "w4a8 (TRIP, log2 probs, RTN g128)", e, size))
            print(f"Agile rtn {e['perplexity']:.3f}", flush=True)

        specs = args.prune if args.prune is not None else ["progressive:0.25", "progressive:0.5"]
        specs = [s for s in specs if s != "none"]
        L, T = cfg.model.layers, cfg.data.seq_len
        base_cost = prefill_cost(cfg.model, [T] * L)
        speed = {}
        ev_kw = dict(stride=cfg.eval.stride, batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)
        speed["none"] = {"keras_prefill_s": time_prefill(agile, T, [])}
        for spec in specs:
            ratios = parse_schedule(spec, L)
            ratio = base_cost / prefill_cost(cfg.model, prefill_tokens(ratios, T))
            speed[spec] = {"prefill_tokens_per_layer": prefill_tokens(ratios, T), "prefill_flops_ratio": ratio,
                           "keras_prefill_s": time_prefill(agile, T, ratios)}
            for method, model, recipe, sz in (("Agile-Quant", agile, desc, size), ("FP", teacher, "fp32", params * 4)):
                key = f"prune_{'agile' if model is agile else 'fp'}_{spec.replace(':', '-').replace(',', '_')}"
                e = pipeline.cached_eval(out / f"eval_{key}.json", pipeline.eval_fingerprint(cfg, data, fpr, key),
                                         lambda m=model: pruned_perplexity(m, data.ids[cfg.eval.split], T, ratios, **ev_kw))
                rows.append({"method": method, "recipe": recipe, "prune": spec, "perplexity": e["perplexity"],
                             "blimp": None, "size_mb": sz / 1e6, "mean_tokens_per_layer": e["mean_tokens_per_layer"],
                             "prefill_flops_ratio": ratio})
                print(f"{method} prune {spec}: {e['perplexity']:.3f} tokens/layer {e['mean_tokens_per_layer']}", flush=True)
        extra["prefill"] = speed

        qat_dir = Path(args.qat_run) if args.qat_run else Path(cfg.run_dir).parent / "tiny"
        missing = []
        for name, label in (("w4a8", "EdgeQAT QAT"), ("w4a4-8", "EdgeQAT QAT (full method)")):
            d = qat_dir / f"qat-{name}"
            if (d / "student.weights.h5").is_file() and (d / "recipe.json").is_file():
                st = load_student(cfg, d)
                e = ev(f"qat_{name}", lambda st=st: evaluate_model(logprob_fn(st), data, cfg, progress))
                rows.append(pipeline.result_row(label, name, e, model_size_bytes(cfg.model, st.recipe)["total"]))
            else:
                missing.append(str(d))

        x = np.asarray(calib[0])
        before = agile(x).numpy()
        n = fold_student(agile)
        extra["fold_check"] = {"points_folded": n, "max_abs_logit_diff": float(np.abs(agile(x).numpy() - before).max())}

        sections = {
            "Setup": (f"config `{cfg.name}`, teacher `{tpath}`; perplexity on `{cfg.eval.split}` "
                      f"(max {cfg.eval.max_tokens} tokens, windows of {T} at stride {cfg.eval.stride or T // 2}). "
                      f"Calibration: {cfg.qat.calib_batches} training batches x {cfg.qat.train.batch_size} x {T} "
                      f"(the RTN rows' batches). Agile build {extra['agile_build_s']} s."),
            "Pruning": ("Only unscored context tokens (the first half of each sliding window, never token 0) are "
                        "pruned, so every row scores the same targets; the first window is never pruned. "
                        "'tokens per layer' is the mean over evaluation windows; 'prefill FLOPs x' is the "
                        "projection + causal-attention FLOP ratio of a 128-token prefill where every token but "
                        "the first and last is prunable. Keras prefill timings (batch 8): "
                        + ", ".join(f"{k}: {1000 * v['keras_prefill_s']:.0f} ms" for k, v in speed.items()) + "."),
            "Folding": (f"{n} TRIP points folded into RMSNorm scales / up_proj columns and the next kernels' rows; "
                        f"max |logit difference| after folding: {extra['fold_check']['max_abs_logit_diff']:.3g}."),
            "QAT rows": ("none missing" if not missing else "left out, no trained student at: " + ", ".join(missing)),
        }
        extra["wall_s"] = round(time.perf_counter() - t0, 1)
        paths = write_report(out, f"Agile-Quant post-training rows `{cfg.name}`", rows, sections, {}, extra, table=table)
        print(table(rows))
        print(f"report: {paths['report.md']} ({extra['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
