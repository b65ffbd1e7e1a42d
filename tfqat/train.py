"""``python -m tfqat.train``: the default job, end to end.

data -> FP teacher (trained, or reused when cached) -> FP evaluation -> RTN post-training
quantization rows (``qat.ptq_recipes``) -> QAT of the student with the full method
(``qat.recipe``, default ``w4a4-8`` at rho 0.5, distill + entropy + distribution losses) ->
its evaluation -> export (:mod:`tfqat.export`) -> ``runs/<name>/report.md``, ``report.json``,
``loss_curves.png``, ``perplexity.png``. Every stage is resumable: interrupt it at any point
(even ``kill -9``) and rerun the same command to continue; finished stages and evaluations are
reused.
"""

from __future__ import annotations

import argparse
import sys
import time

from .cli import add_common_args, die, load_cli_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.train",
        description="Train the FP teacher, quantization-aware train the student, evaluate and report. "
                    "With no arguments: the 'tiny' config on the shipped corpus, on the CPU.")
    add_common_args(ap)
    ap.add_argument("--stage", choices=["fp", "all"], default="all",
                    help="'fp': only the FP teacher and its evaluation; 'all' (default): the whole job")
    ap.add_argument("--no-export", action="store_true",
                    help="skip the export stage (model.tflite of the QAT student)")
    return ap


def export_stage(cfg, stage_dir, progress: bool) -> tuple[str, dict]:
    """Export the QAT student (:func:`tfqat.export.export_run`); a failure is reported, not fatal,
    so the report of a finished training run is never lost to an export problem."""
    import json

    from .cli import UserError

    try:
        from .export import export_run
    except ImportError as e:  # the export module is optional
        return f"skipped: tfqat.export unavailable ({e})", {"ok": False}
    try:
        result = json.loads(json.dumps(export_run(cfg, stage_dir, progress=progress), default=str))
    except UserError as e:
        print(f"warning: export failed: {e}", file=sys.stderr)
        return f"**failed**: {e}", {"ok": False, "error": str(e)}
    files = ", ".join(f"`{k}`" for k in result) if isinstance(result, dict) else ""
    return f"exported from `{stage_dir}`: {files}", {"ok": True, **(result if isinstance(result, dict) else {})}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    with die():
        from . import pipeline
        from .evaluate import evaluate_model, keras_logprob_fn
        from .report import read_metrics, write_report

        cfg = load_cli_config(args)
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def lap(stage: str, since: float) -> float:
            now = time.perf_counter()
            times[stage] = round(now - since, 1)
            return now

        chief = pipeline.is_chief(cfg)  # creates the strategy first: before any other TensorFlow work
        data = pipeline.load_data(cfg, progress)
        t = lap("data", t0)
        teacher, fp_result = pipeline.fp_stage(cfg, data, progress)
        if not chief:  # a non-chief worker trains, and leaves evaluation and reports to the chief
            if args.stage == "all":
                from .qat_stage import qat_stage

                qat_stage(cfg, data, teacher, progress=False)
            print("worker: training done; the chief evaluates and writes the report")
            return 0
        if "imported" in fp_result:
            print(f"FP teacher: imported from {fp_result['imported']['path']} ({fp_result['params']:,} "
                  f"parameters){' (reused)' if fp_result['reused'] else ''}")
        else:
            print(f"FP teacher: {fp_result['steps']} steps, {fp_result['tokens_per_s']:,.0f} tokens/s, "
                  f"{fp_result['wall_s']:.0f} s{' (reused)' if fp_result['reused'] else ''}")
        t = lap("fp_train", t)
        fp_eval = pipeline.cached_eval(cfg.run_dir / "eval_fp.json", pipeline.eval_fingerprint(cfg, data, "fp"),
                                       lambda: evaluate_model(keras_logprob_fn(teacher), data, cfg, progress))
        t = lap("fp_eval", t)
        rows = [{"method": "FP", "recipe": "fp32", "perplexity": fp_eval["perplexity"],
                 "blimp": fp_eval["blimp"]["overall"], "blimp_pairs": fp_eval["blimp"]["pairs"],
                 "size_mb": fp_result["params"] * 4 / 1e6,
                 "steps": fp_result["steps"], "tokens_seen": fp_result["tokens_seen"]}]
        curves = {"FP teacher": read_metrics(cfg.run_dir / "fp" / "metrics.csv")}
        extra: dict = {"fp": fp_result, "fp_eval": fp_eval}
        sections = {}
        if args.stage == "all":
            from .qat_stage import ptq_stage, qat_eval_row, qat_stage, resolve_recipe, stage_dir

            rows += ptq_stage(cfg, data, teacher, progress)
            t = lap("rtn_calibrate_eval", t)
            recipe = resolve_recipe(cfg)
            student, qat_result = qat_stage(cfg, data, teacher, progress=progress)
            print(f"QAT {recipe.name}: {qat_result['steps']} steps, {qat_result['tokens_per_s']:,.0f} tokens/s, "
                  f"{qat_result['wall_s']:.0f} s{' (reused)' if qat_result['reused'] else ''}")
            t = lap("qat_train", t)
            rows.append(qat_eval_row(cfg, data, student, qat_result, "QAT (full method)",
                                     stage_dir(cfg, recipe), progress))
            t = lap("qat_eval", t)
            qat_rows = read_metrics(stage_dir(cfg, recipe) / "metrics.csv")
            curves[f"QAT {recipe.name}: student CE (comparable with FP)"] = [
                {"step": r["step"], "loss": r["ce"]} for r in qat_rows if "ce" in r]
            curves[f"QAT {recipe.name}: total loss (distill + r_E L_E + r_D L_D)"] = qat_rows
            extra["qat"] = qat_result
            if not args.no_export:
                sections["Export"], extra["export"] = export_stage(cfg, stage_dir(cfg, recipe), progress)
                t = lap("export", t)
            lo = cfg.qat.losses
            sections["QAT"] = (
                f"Student `{recipe.name}`: {recipe.describe()}. Initialised from the teacher, every scale "
                f"calibrated on {cfg.qat.calib_batches} training batches, then {qat_result['steps']} steps "
                f"(batch {cfg.qat.train.batch_size} x {cfg.data.seq_len}, lr {cfg.qat.train.lr:g}) of "
                f"L = distill(gamma {lo.gamma:g}, T {lo.temperature:g}) + {lo.entropy:g} * entropy "
                f"({lo.entropy_form}) + {lo.distribution:g} * distribution ({lo.distribution_form}). "
                f"RTN rows: the same quantizers calibrated on the same batches, no training "
                f"(weights: per-channel MSE clip; activations: "
                f"{'LSQ init' if cfg.qat.act_calibration == 'lsq' else 'least-squares clip'}; probs: min-max). "
                f"Token-adaptive "
                f"rows select the top rho*T tokens over each evaluation window (BLiMP: over the padded "
                f"batch width). Size: projections at the weight bit width plus float32 scales; "
                f"embeddings and norms float32; KV cache not counted.")
        sections["Setup"] = (
            f"config `{cfg.name}`: {cfg.model.arch}, hidden {cfg.model.hidden}, {cfg.model.layers} layers, "
            f"{cfg.model.heads} heads ({cfg.model.num_kv_heads} KV), vocab {cfg.model.vocab_size}; "
            f"{fp_result['params']:,} parameters"
            + (f", FP teacher imported ({cfg.teacher.source}: {fp_result['imported']['path']})"
               if "imported" in fp_result else "")
            + f". Perplexity on the `{cfg.eval.split}` works "
            f"({fp_eval['tokens']:,} tokens, windows of {fp_eval['seq_len']} at stride {fp_eval['stride']}); "
            f"BLiMP over {fp_eval['blimp']['pairs']:,} pairs.")
        sections["BLiMP by phenomenon (FP)"] = "\n".join(
            ["| phenomenon | accuracy |", "|---|---:|"]
            + [f"| {k} | {100 * v:.1f} |" for k, v in fp_eval["blimp"]["phenomena"].items()])
        times["total"] = round(time.perf_counter() - t0, 1)
        sections["Wall time per stage (s)"] = "\n".join(
            ["| stage | seconds |", "|---|---:|"] + [f"| {k} | {v:.0f} |" for k, v in times.items()])
        extra["wall_s"] = times["total"]
        extra["stage_wall_s"] = times
        paths = write_report(cfg.run_dir, f"tfqat run `{cfg.name}`", rows, sections, curves, extra)
        print(f"report: {paths['report.md']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
