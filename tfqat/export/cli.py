"""``python -m tfqat.export --run runs/<name>``: export a run's trained QAT student and its FP
teacher (:func:`tfqat.export.write.export_run`).

TensorFlow is imported only once the arguments and the run folder check out (and after
:mod:`tfqat.cli` has quieted its start-up logging), so ``--help`` and those errors never wait for it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from tfqat.export.spec import HEADS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.export",
        description="Export a run's QAT student to model.tflite (TFQAT custom ops), its FP teacher to "
                    "model_float.tflite, and manifest.json.")
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/tiny")
    ap.add_argument("--recipe", help="which qat-<recipe> stage to export (default: the only one, or the "
                                     "config's recipe)")
    ap.add_argument("--out", help="output folder (default: <run>/export-<recipe>)")
    ap.add_argument("--oproj", choices=["dynamic8", "float"], default="float",
                    help="o_proj: float matmul with dequantized weights, as trained (default), or "
                         "dynamic per-token int8 activations")
    ap.add_argument("--head", choices=list(HEADS), default="float",
                    help="embedding and lm_head: float32, exactly as trained (default), or int8 per "
                         "row with dynamic per-token int8 activations for the head (about 4x smaller "
                         "and faster; logits within a stated bound of the exact export)")
    ap.add_argument("--prune", metavar="SCHEDULE",
                    help="Agile-Quant token pruning in the prefill: 'progressive:R' or per-layer "
                         "fractions 'r0,r1,...,0' (see tfqat/agile/prune_export.py; changes the signatures)")
    ap.add_argument("--config", help="config name or YAML (default: the run folder's name)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def main(argv: Optional[list] = None) -> int:
    from tfqat.cli import UserError, die

    args = build_parser().parse_args(argv)
    with die():
        from tfqat.cli import load_cli_config

        run = Path(args.run)
        if not run.is_dir():
            raise UserError(f"{run}: no such run folder; train first with python -m tfqat.train")
        stages = sorted(p for p in run.glob("qat-*") if p.is_dir())
        if args.recipe:
            stage = run / f"qat-{args.recipe}"
        elif len(stages) == 1:
            stage = stages[0]
        else:
            trained = [p for p in stages if (p / "student.weights.h5").is_file()]
            if len(trained) != 1:
                raise UserError(f"{run}: {'no trained model (no qat-*/student.weights.h5)' if not trained else 'several QAT stages ' + ', '.join(p.name for p in trained) + '; pick one with --recipe'}")
            stage = trained[0]
        if not (stage / "student.weights.h5").is_file():
            raise UserError(f"{stage}: no trained model (student.weights.h5 missing); run python -m "
                            "tfqat.train first")
        ns = argparse.Namespace(config=args.config or run.name, overrides=args.overrides,
                                name=run.name)
        cfg = load_cli_config(ns)
        cfg = cfg.model_copy(update={"runs_dir": str(run.parent)})
        if args.prune is not None:  # fail fast, one line
            from tfqat.agile.prune_export import check_schedule

            check_schedule(args.prune, cfg.model.layers, error=UserError)
        from tfqat.export.write import export_run

        res = export_run(cfg, stage, args.out, oproj=args.oproj, head=args.head, prune=args.prune)
        m = res["manifest_data"]
        for key in ("model", "model_float"):
            if res.get(key):
                f = m["files"][key]
                print(f"{res[key]}: {f['bytes'] / 1e6:.2f} MB, sha256 {f['sha256'][:12]}, ops "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(f["ops"].items())))
        print(f"manifest: {res['manifest']}")
    return 0
