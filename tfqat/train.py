"""``python -m tfqat.train``: the default job, end to end.

data -> FP teacher (trained, or reused when cached) -> FP evaluation -> RTN post-training
quantization rows (``qat.ptq_recipes``) -> QAT of the student with the full method
(``qat.recipe``, default ``w4a4-8`` at rho 0.5, distill + entropy + distribution losses) ->
its evaluation -> export (:mod:`tfqat.export`) -> ``runs/<name>/report.md``, ``report.json``,
``loss_curves.png``, ``perplexity.png``. Every stage is resumable: interrupt it at any point
(even ``kill -9``) and rerun the same command to continue; finished stages, evaluations and the
export are reused. The run folder records its resolved config (``config.yaml``: ``--run
runs/<name>`` reads it back) and ``provenance.json`` (versions, delegate, git revision, host).
A larger ``train.steps`` / ``qat.train.steps`` trains a finished teacher / student further.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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


def stage_names(cfg, args) -> list[str]:
    """The stages this command runs, in order (what ``stage n of m`` counts)."""
    from .quant.recipes import get_recipe
    from .qat_stage import resolve_recipe

    names = ["data", "FP teacher", "FP evaluation"]
    if args.stage == "all":
        names += [f"{post_training_method(get_recipe(r))} {r}" for r in cfg.qat.ptq_recipes]
        recipe = resolve_recipe(cfg).name
        names += [f"QAT {recipe}", f"QAT {recipe} evaluation"] + ([] if args.no_export else ["export"])
    return names + ["report"]


def post_training_method(recipe) -> str:
    """RTN (plain round-to-nearest calibration) or PTQ (SmoothQuant / GPTQ): the report's label."""
    return "RTN" if recipe.weight_init == "rtn" and recipe.smooth is None else "PTQ"


def export_stage(cfg, stage_dir, data, keras_ppl: dict, progress: bool) -> tuple[str, dict]:
    """Export the QAT student and the FP teacher (reused when its inputs are unchanged) and score
    both files in LiteRT on the evaluation windows the Keras rows used. A failure is reported, not
    fatal, so the report of a finished training run is never lost to an export problem.

    Args:
        keras_ppl: the Keras perplexity to compare each file with, by file key (``model``,
            ``model_float``).

    Returns:
        The report section (markdown) and the record for ``report.json``.
    """
    from .cli import UserError
    from .runtime import TfqatRuntimeError

    try:
        from .export.cli import export_run_cached
    except ImportError as e:  # the export module is optional
        return f"skipped: tfqat.export unavailable ({e})", {"ok": False}
    try:
        res, reused = export_run_cached(cfg, stage_dir, progress=progress)
    except (UserError, TfqatRuntimeError) as e:
        print(f"warning: export failed: {e}", file=sys.stderr)
        return f"**failed**: {e}", {"ok": False, "error": str(e)}
    files = litert_perplexities(cfg, data, res, progress)
    m = res["manifest_data"]
    how = ("reused: its inputs (weights, recipe, options, exporter code) are unchanged" if reused
           else f"exported in {m.get('export_s', 0):.0f} s")
    lines = [f"From `{stage_dir}` ({how}). Perplexity: the same held-out windows as the table above, "
             "the `.tflite` in the stock LiteRT interpreter (TFQAT ops in libtfqat_ops.so), Keras the trained model.",
             "", "| file | what | MB | perplexity, LiteRT | perplexity, Keras | LiteRT / Keras |",
             "|---|---|---:|---:|---:|---:|"]
    what = {"model": f"QAT {m.get('recipe', {}).get('name', '')} (TFQAT ops)".replace("  ", " "),
            "model_float": "FP teacher (builtin ops)"}
    for key, f in files.items():
        k, lite = keras_ppl.get(key), f["perplexity"]
        ratio = "—" if k is None or lite is None else f"{lite / k:.4f}"
        lines.append(f"| `{f['path']}` | {what[key]} | {f['bytes'] / 1e6:.2f} | "
                     f"{'not scored' if lite is None else f'{lite:.3f}'} | {'—' if k is None else f'{k:.3f}'} | "
                     f"{ratio} |")
    for key in ("tokenizer", "manifest"):
        if res.get(key):
            path = Path(res[key])
            lines.append(f"| `{path}` | {key} | {path.stat().st_size / 1e6:.2f} | | | |")
    lines += [f"\n`{Path(f['path']).name}` not scored in LiteRT: {f['error']}" for f in files.values()
              if f.get("error")]
    return "\n".join(lines), {"ok": True, "reused": reused, "dir": str(Path(res["manifest"]).parent),
                              "files": files, "export_s": m.get("export_s")}


def litert_perplexities(cfg, data, res: dict, progress: bool) -> dict:
    """``{file key: {"path", "bytes", "sha256", "perplexity"}}`` of an export's ``.tflite`` files,
    each scored in LiteRT on the evaluation windows (cached beside the file, by its hash).

    A file LiteRT cannot run (say, a delegate library older than the exporter) gets
    ``"perplexity": None`` and a one-line ``"error"``, with a warning: its training run's report is
    still written.
    """
    from . import pipeline
    from .evaluate import perplexity
    from .runtime import LiteModel

    out = {}
    for key in ("model", "model_float"):
        if not res.get(key):
            continue
        path = Path(res[key])
        info = res["manifest_data"]["files"][key]

        def score(path=path):
            lite = LiteModel(path, allow_float=True)
            return perplexity(lite.logprobs, data.ids[cfg.eval.split], cfg.data.seq_len, cfg.eval.stride,
                              cfg.eval.batch_size, cfg.eval.max_tokens, progress)

        out[key] = {"path": str(path), "bytes": path.stat().st_size, "sha256": info["sha256"]}
        try:
            ev = pipeline.cached_eval(path.parent / f"eval_{key}.json",
                                      pipeline.eval_fingerprint(cfg, data, "litert", info["sha256"]), score)
            out[key]["perplexity"] = ev["perplexity"]
        except Exception as e:  # noqa: BLE001 - the interpreter raises bare RuntimeErrors; never lose the report
            why = " ".join(str(e).split())[:300] or type(e).__name__
            print(f"warning: {path}: not scored in LiteRT ({why})", file=sys.stderr)
            out[key].update(perplexity=None, error=why)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.quiet
    with die():
        from . import pipeline
        from .evaluate import evaluate_model, keras_logprob_fn
        from .progress import StagePlan
        from .report import read_metrics, write_report

        cfg = load_cli_config(args)
        t0 = time.perf_counter()
        times: dict[str, float] = {}

        def lap(stage: str, since: float) -> float:
            now = time.perf_counter()
            times[stage] = round(now - since, 1)
            return now

        chief = pipeline.is_chief(cfg)  # creates the strategy first: before any other TensorFlow work
        plan = StagePlan(stage_names(cfg, args), announce=progress and chief)
        with plan("data"):
            data = pipeline.load_data(cfg, progress)
        t = lap("data", t0)
        with plan("FP teacher"):
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
        with plan("FP evaluation"):
            fp_eval = pipeline.cached_eval(cfg.run_dir / "eval_fp.json", pipeline.eval_fingerprint(cfg, data, "fp"),
                                           lambda: evaluate_model(keras_logprob_fn(teacher), data, cfg, progress))
        t = lap("fp_eval", t)
        rows = [{"method": "FP", "recipe": "fp32", "perplexity": fp_eval["perplexity"],
                 "blimp": fp_eval["blimp"]["overall"], "blimp_pairs": fp_eval["blimp"]["pairs"],
                 "size_mb": fp_result["params"] * 4 / 1e6, "file_mb": None,
                 "steps": fp_result["steps"], "tokens_seen": fp_result["tokens_seen"]}]
        curves = {"FP teacher": read_metrics(cfg.run_dir / "fp" / "metrics.csv")}
        extra: dict = {"fp": fp_result, "fp_eval": fp_eval}
        sections = {}
        if args.stage == "all":
            from .qat_stage import ptq_stage, qat_eval_row, qat_stage, resolve_recipe, stage_dir
            from .quant.recipes import get_recipe

            for name in cfg.qat.ptq_recipes:  # one stage per row: its bars name it
                with plan(f"{post_training_method(get_recipe(name))} {name}"):
                    one = cfg.qat.model_copy(update={"ptq_recipes": [name]})
                    rows += ptq_stage(cfg.model_copy(update={"qat": one}), data, teacher, progress)
            t = lap("rtn_calibrate_eval", t)
            recipe = resolve_recipe(cfg)
            with plan(f"QAT {recipe.name}"):
                student, qat_result = qat_stage(cfg, data, teacher, progress=progress)
            print(f"QAT {recipe.name}: {qat_result['steps']} steps, {qat_result['tokens_per_s']:,.0f} tokens/s, "
                  f"{qat_result['wall_s']:.0f} s{' (reused)' if qat_result['reused'] else ''}")
            t = lap("qat_train", t)
            with plan(f"QAT {recipe.name} evaluation"):
                rows.append(qat_eval_row(cfg, data, student, qat_result, "QAT (full method)",
                                         stage_dir(cfg, recipe), progress))
            t = lap("qat_eval", t)
            qat_rows = read_metrics(stage_dir(cfg, recipe) / "metrics.csv")
            curves[f"QAT {recipe.name}: student CE (comparable with FP)"] = [
                {"step": r["step"], "loss": r["ce"]} for r in qat_rows if "ce" in r]
            curves[f"QAT {recipe.name}: total loss (distill + r_E L_E + r_D L_D)"] = qat_rows
            extra["qat"] = qat_result
            if not args.no_export:
                with plan("export"):
                    keras_ppl = {"model": rows[-1]["perplexity"], "model_float": rows[0]["perplexity"]}
                    sections["Export"], extra["export"] = export_stage(cfg, stage_dir(cfg, recipe), data,
                                                                       keras_ppl, progress)
                for row, key in ((rows[0], "model_float"), (rows[-1], "model")):
                    f = extra["export"].get("files", {}).get(key)
                    if f:
                        row["file_mb"], row["file"] = f["bytes"] / 1e6, f["path"]
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
                f"batch width).")
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
        with plan("report"):
            paths = write_report(cfg.run_dir, f"tfqat run `{cfg.name}`", rows, sections, curves, extra)
        print(f"report: {paths['report.md']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
