"""``python -m tfqat.ptq --method agile-quant``: post-training rows (Agile-Quant, METHOD.md sec. 5).

Rows, on the same model and held-out windows: FP; RTN W4A8 (the pipeline's RTN); Agile-Quant
W4A8 (TRIP activations, 4-bit log2 probs, GPTQ g128 act-order weights) and the same with group
RTN weights (ablation); Agile-Quant (and FP) with token pruning for each ``--prune`` schedule;
EdgeQAT QAT rows from ``<qat-run>``: ``--qat-stage`` folders, or by default ``qat-w4a8`` /
``qat-w4a4-8`` (falling back to the ablation's ``qat-abl-full-w4a8`` / ``qat-abl-full-w4a4-8``).
Agile-Quant (exportable): per-output-channel GPTQ in the TRIP-folded domain and the linear unsigned
8-bit probabilities, folded and exported with :func:`tfqat.agile.exportable.export_agile` (under
``ptq/exports/agile-channel``), its LiteRT perplexity on the same windows. Exported prefill: that
QAT student and the FP teacher are exported unpruned and with each schedule
(:mod:`tfqat.agile.prune_export`) and their prefills timed side by side in LiteRT.
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
                         "'progressive:R' (repeatable; default: progressive:0.1, 0.25 and 0.5; 'none': no rows)")
    ap.add_argument("--qat-run", help="run folder holding the QAT students (default: this run's folder)")
    ap.add_argument("--qat-stage", action="append", default=None, metavar="FOLDER",
                    help="QAT student folder inside --qat-run to add as a row (repeatable; default: for "
                         "w4a8 and w4a4-8, qat-<recipe> if trained, else the ablation's qat-abl-full-<recipe>)")
    ap.add_argument("--no-ablation", action="store_true", help="skip the group-RTN-weights Agile row")
    ap.add_argument("--no-exportable", action="store_true",
                    help="skip the exportable Agile row (per-channel GPTQ, linear 8-bit probs) and its TFLite export")
    ap.add_argument("--no-agile-export", action="store_true",
                    help="keep the exportable Agile row but skip its TFLite export and the exported perplexity")
    ap.add_argument("--no-prune-control", action="store_true",
                    help="skip the FP control rows that prune random tokens / the most-attending tokens instead")
    ap.add_argument("--no-export-timing", action="store_true",
                    help="skip exporting a QAT student + the FP teacher with each pruning schedule and "
                         "timing their prefill in LiteRT")
    return ap


DEFAULT_PRUNE = ("progressive:0.1", "progressive:0.25", "progressive:0.5")


def cached_export(d: Path, source: dict) -> dict | None:
    """``d``'s ``source.json`` when ``d`` holds a complete export (manifest) made from ``source``
    (every key of ``source`` equal), else None."""
    from .checkpoints import read_json_checked

    marker = d / "source.json"
    if not ((d / "manifest.json").is_file() and marker.is_file()):
        return None
    old = read_json_checked(marker, f"delete {d} to export again")
    return old if all(old.get(k) == v for k, v in source.items()) else None


def exported_prefill(cfg, data, teacher, stage, specs, out: Path, progress: bool = False) -> dict:
    """Export ``stage``'s QAT student and the FP teacher unpruned and with each schedule (cached
    under ``out/exports``), then time every prefill side by side (LiteRT, 1 thread, medians)."""
    from .agile.prune_export import time_exported_prefill
    from .atomic import write_json_atomic
    from .export import export_models
    from .qat_stage import load_student

    student = load_student(cfg, stage)
    w = stage / "student.weights.h5"
    teacher_params = int(sum(int(v.numpy().size) for v in teacher.weights))
    paths = {}
    for spec in ["none"] + list(specs):
        d = out / "exports" / spec.replace(":", "-").replace(",", "_")
        src = {"stage": str(stage), "weights_mtime": w.stat().st_mtime_ns, "prune": spec,
               "teacher_params": teacher_params}
        if cached_export(d, src) is None:
            t = time.perf_counter()
            export_models(student, teacher, d, prune=None if spec == "none" else spec,
                          extra={"stage_dir": str(stage)})
            write_json_atomic(d / "source.json", src)
            if progress:
                print(f"  exported {stage.name} + FP, prune {spec} ({time.perf_counter() - t:.0f} s)", flush=True)
        paths[f"{student.recipe.name} {spec}"] = d / "model.tflite"
        paths[f"fp32 {spec}"] = d / "model_float.tflite"
    res = time_exported_prefill(paths, cfg.data.seq_len, cfg.model.vocab_size)
    for k, v in res.items():
        base = res[k.rsplit(" ", 1)[0] + " none"]["ms"]
        v["speedup"] = base / v["ms"]
    return {"stage": str(stage), "seq_len": cfg.data.seq_len, "timings": res}


EXPORTABLE = "Agile-Quant (exportable: per-channel GPTQ, linear 8-bit probs)"


def exportable_rows(cfg, data, teacher, calib, out: Path, fpr: str, rows: list, ev, export: bool = True,
                    progress: bool = False) -> dict:
    """The exportable Agile row (Keras) and, with ``export``, its TFLite export's row (LiteRT
    perplexity on the same windows, file size). Evaluations and the export are cached in ``out``;
    the student is built only when one of them is missing."""
    import numpy as np

    from . import pipeline
    from .atomic import write_json_atomic
    from .checkpoints import read_json_checked
    from .agile.build import agile_size_bytes, agile_student
    from .agile.exportable import export_agile
    from .evaluate import evaluate_model, keras_logprob_fn, perplexity

    info: dict = {}
    built = {}

    def student():
        if "st" not in built:
            t = time.perf_counter()
            built["st"] = agile_student(teacher, calib, "gptq", group_size=None, log2_probs=False, progress=progress)
            info["build_s"] = round(time.perf_counter() - t, 1)
        return built["st"]

    e = ev("agile_gptq_channel_lin8", lambda: evaluate_model(keras_logprob_fn(student()), data, cfg, progress))
    desc = "w4a8 (TRIP a8 folded, linear 8-bit probs, GPTQ per-channel act-order)"
    rows.append(pipeline.result_row(EXPORTABLE, desc, e, agile_size_bytes(cfg.model, None)))
    print(f"Agile exportable {e['perplexity']:.3f}", flush=True)
    if not export:
        return info
    d = out / "exports" / "agile-channel"
    src = {"fingerprint": pipeline.eval_fingerprint(cfg, data, fpr, "agile_gptq_channel_lin8"), "version": 1}
    cached = cached_export(d, src)
    if cached is None:
        st = student()
        x = np.asarray(calib[0])
        before = st(x).numpy()
        t = time.perf_counter()
        export_agile(st, None, d)
        info["export_s"] = round(time.perf_counter() - t, 1)
        cached = {**src, "fold_max_abs_logit_diff": float(np.abs(st(x).numpy() - before).max())}
        write_json_atomic(d / "source.json", cached)
        if progress:
            print(f"  exported the Agile per-channel student ({info['export_s']:.0f} s)", flush=True)
    info["fold_max_abs_logit_diff"] = cached.get("fold_max_abs_logit_diff")
    info["dir"] = str(d)
    size = (d / "model.tflite").stat().st_size
    info["model_bytes"] = size
    sha = read_json_checked(d / "manifest.json", f"delete {d} to export again")["files"]["model"]["sha256"]

    def lite_ppl():
        from .runtime import LiteModel

        m = LiteModel(d / "model.tflite")
        return perplexity(m.logprobs, data.ids[cfg.eval.split], cfg.data.seq_len, cfg.eval.stride,
                          cfg.eval.batch_size, cfg.eval.max_tokens, progress)

    e = pipeline.cached_eval(out / "eval_agile_channel_tflite.json",
                             pipeline.eval_fingerprint(cfg, data, fpr, "agile_channel_tflite", src["fingerprint"], sha),
                             lite_ppl)
    rows.append({"method": EXPORTABLE.replace(")", ", TFLite export)"), "recipe": f"{desc}, `model.tflite`",
                 "perplexity": e["perplexity"], "blimp": None, "size_mb": size / 1e6})
    info["tflite_perplexity"] = e["perplexity"]
    print(f"Agile exportable TFLite {e['perplexity']:.3f} ({size / 1e6:.2f} MB)", flush=True)
    return info


def prune_verdict(rows) -> str:
    """One sentence: pruning's perplexity effect here vs the reference (LLaMA-7B W4A8 6.16 -> 6.09)."""
    def ppl(method, prune=None):
        return next((r["perplexity"] for r in rows if r["method"] == method and r.get("prune") == prune), None)
    base = ppl("Agile-Quant")
    pr = [(r["prune"], r["perplexity"]) for r in rows if r["method"] == "Agile-Quant" and r.get("prune")]
    if base is None or not pr:
        return ""
    parts = ", ".join(f"{s}: {v:.2f} ({100 * (v / base - 1):+.1f}%)" for s, v in pr)
    better = [s for s, v in pr if v < base]
    return (f"Reference (Agile-Quant, LLaMA-7B W4A8): 6.16 -> 6.09 with pruning (-1.1%). Here Agile-Quant "
            f"W4A8 {base:.2f} -> {parts}: pruning "
            + (f"lowers perplexity at {', '.join(better)}." if better else "does not lower perplexity at any schedule."))


def _trained(d: Path) -> bool:
    return (d / "student.weights.h5").is_file() and (d / "recipe.json").is_file()


def qat_stages(qat_dir: Path, names=None) -> tuple[list, list]:
    """``(trained stage folders, missing ones)``: ``names`` (folders in ``qat_dir``) or, by default,
    for w4a8 and w4a4-8 the main stage ``qat-<recipe>`` else the ablation's ``qat-abl-full-<recipe>``."""
    if names:
        dirs = [qat_dir / n for n in names]
        bad = [str(d) for d in dirs if not _trained(d)]
        if bad:
            raise UserError(f"--qat-stage: no trained student (recipe.json + student.weights.h5) at {', '.join(bad)}")
        return dirs, []
    found, missing = [], []
    for r in ("w4a8", "w4a4-8"):
        cands = [qat_dir / f"qat-{r}", qat_dir / f"qat-abl-full-{r}"]
        hit = next((d for d in cands if _trained(d)), None)
        (found.append(hit) if hit else missing.append(" or ".join(str(d) for d in cands)))
    return found, missing


def exportable_note(info) -> str:
    if not info:
        return "The exportable variant was skipped (--no-exportable)."
    if "model_bytes" not in info:
        return ("Exportable variant: GPTQ with one 4-bit scale per output channel of the folded kernel "
                "(act-order, codes in the original column order) and linear unsigned 8-bit probabilities; "
                "its export was skipped (--no-agile-export).")
    return ("Exportable variant (row '" + EXPORTABLE + "'): GPTQ with one 4-bit scale per output channel "
            "of the folded kernel diag(2^k) W (GPTQ on the folded inputs x / 2^k, same output error; act-order, "
            "codes in the original column order), linear unsigned 8-bit probabilities; folded "
            f"(max |logit difference| {info['fold_max_abs_logit_diff']:.3g}) and exported by "
            f"`tfqat.agile.exportable.export_agile` to `{info['dir']}` ({info['model_bytes'] / 1e6:.2f} MB, "
            "int4-packed QLINEARs, per-tensor activation scales, o_proj float as in every export); "
            f"LiteRT perplexity on the same windows {info['tflite_perplexity']:.3f}.")


def table(rows):
    lines = ["| method | recipe | prune | perplexity | x FP | BLiMP | size (MB; estimate, TFLite rows: file) | "
             "tokens per layer | prefill FLOPs x |",
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
        from .checkpoints import load_weights_checked
        from .agile.build import agile_size_bytes, agile_student
        from .agile.pruning import parse_schedule, prefill_cost, prefill_tokens, pruned_perplexity, time_prefill
        from .agile.trip import fold_student
        from .evaluate import evaluate_model, keras_logprob_fn
        from .qat_stage import calibration_batches, load_student, rtn_student
        from .quant.qat import logprob_fn, model_size_bytes
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
        load_weights_checked(teacher, tpath, None if not args.teacher else
                             f"pass --teacher FP weights of a {cfg.model.arch} model of this config (--config or --run)")
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

        if not args.no_exportable:
            extra["exportable"] = exportable_rows(cfg, data, teacher, calib, out, fpr, rows, ev,
                                                  export=not args.no_agile_export, progress=progress)

        specs = args.prune if args.prune is not None else list(DEFAULT_PRUNE)
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
                                         lambda m=model, r=ratios: pruned_perplexity(m, data.ids[cfg.eval.split], T, r, **ev_kw))
                rows.append({"method": method, "recipe": recipe, "prune": spec, "perplexity": e["perplexity"],
                             "blimp": None, "size_mb": sz / 1e6, "mean_tokens_per_layer": e["mean_tokens_per_layer"],
                             "prefill_flops_ratio": ratio})
                print(f"{method} prune {spec}: {e['perplexity']:.3f} tokens/layer {e['mean_tokens_per_layer']}", flush=True)
            for order, label in (() if args.no_prune_control else
                                 (("random", "FP (control: random tokens pruned)"),
                                  ("most", "FP (control: most attention to token 0 pruned)"))):
                key = f"prune_fp_{order}_{spec.replace(':', '-').replace(',', '_')}"
                e = pipeline.cached_eval(out / f"eval_{key}.json", pipeline.eval_fingerprint(cfg, data, fpr, key),
                                         lambda o=order, r=ratios: pruned_perplexity(teacher, data.ids[cfg.eval.split], T, r,
                                                                                     order=o, **ev_kw))
                rows.append({"method": label, "recipe": "fp32", "prune": spec, "perplexity": e["perplexity"],
                             "blimp": None, "size_mb": params * 4 / 1e6,
                             "mean_tokens_per_layer": e["mean_tokens_per_layer"], "prefill_flops_ratio": ratio})
                print(f"{label} {spec}: {e['perplexity']:.3f}", flush=True)
        extra["prefill"] = speed

        qat_dir = Path(args.qat_run) if args.qat_run else Path(cfg.run_dir)
        stages, missing = qat_stages(qat_dir, args.qat_stage)
        for d in stages:
            st = load_student(cfg, d)
            e = ev(f"qat_{d.name}", lambda st=st: evaluate_model(logprob_fn(st), data, cfg, progress))
            label = "EdgeQAT QAT"
            rows.append(pipeline.result_row(label, f"{st.recipe.name} (`{d.name}`)", e,
                                            model_size_bytes(cfg.model, st.recipe)["total"]))
            print(f"{label} {d.name} {e['perplexity']:.3f}", flush=True)

        export_t = None
        if not args.no_export_timing and stages:
            want = f"qat-{cfg.qat.recipe}"
            stage = next((d for d in stages if d.name == want), stages[-1])
            export_t = exported_prefill(cfg, data, teacher, stage, specs, out, progress)
            extra["exported_prefill"] = export_t
            for k, v in export_t["timings"].items():
                print(f"exported prefill {k}: {v['ms']:.2f} ms ({v['ms_per_token']:.3f} ms/token, "
                      f"x{v['speedup']:.2f})", flush=True)

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
                        + ", ".join(f"{k}: {1000 * v['keras_prefill_s']:.0f} ms" for k, v in speed.items()) + ". "
                        "Control rows (FP) drop the same number of tokens chosen at random, or the tokens "
                        "paying the *most* attention to token 0, to tell whether the importance rule helps. "
                        + prune_verdict(rows)),
            "Folding": (f"{n} TRIP points folded into RMSNorm scales / up_proj columns and the next kernels' rows; "
                        f"max |logit difference| after folding: {extra['fold_check']['max_abs_logit_diff']:.3g} "
                        "(Keras; the kernels then see per-tensor activation scales and weight rows scaled "
                        "by 2^k, i.e. 4-bit codes << k in int8). "
                        + exportable_note(extra.get("exportable")) +
                        " The default Agile row is not exportable: "
                        "`tfqat.export` reads per-output-row weight scales from weight quantizers, while "
                        "GPTQ g128 act-order has one scale per (row, group of 128 permuted inputs) "
                        "(needs a gather of the inputs and one QLINEAR per group, or a grouped kernel), and "
                        "TFQAT_ATTN_PV takes linear uint8 probabilities, while the log2 probs need "
                        "2^-c (15 levels over 2^-14..1; a shift-based PV kernel or a float PV)."),
            "Exported prefill": (
                "not measured (--no-export-timing, or no QAT student)" if export_t is None else
                f"`{Path(export_t['stage']).name}` (QAT student) and the FP teacher exported with each "
                f"schedule (`tfqat.export.export_models(prune=...)`, {out / 'exports'}); one {export_t['seq_len']}-token "
                "prefill in the stock LiteRT interpreter (TFQAT ops in libtfqat_ops.so, builtins in "
                "XNNPACK), 1 thread, runs interleaved, median of 20. The default Agile-Quant student "
                "(g128, log2 probs) is not exportable (see Folding), so the speedup pruning buys is "
                "measured on these two models; pruning is independent of the quantizer.\n\n"
                "| model | prune | ms per prefill | ms / token | speedup |\n|---|---|---:|---:|---:|\n"
                + "\n".join(f"| {k.rsplit(' ', 1)[0]} | {k.rsplit(' ', 1)[1]} | {v['ms']:.2f} | "
                            f"{v['ms_per_token']:.3f} | {v['speedup']:.2f} |"
                            for k, v in sorted(export_t["timings"].items(), key=lambda kv: kv[0].startswith("fp32")))),
            "QAT rows": ("none missing" if not missing else "left out, no trained student at: " + ", ".join(missing)),
        }
        extra["wall_s"] = round(time.perf_counter() - t0, 1)
        paths = write_report(out, f"Agile-Quant post-training rows `{cfg.name}`", rows, sections, {}, extra, table=table)
        print(table(rows))
        print(f"report: {paths['report.md']} ({extra['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
