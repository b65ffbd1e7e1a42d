"""``python -m tfqat.export --run runs/<name>``: export a run's trained QAT student and its FP
teacher (:func:`tfqat.export.write.export_run`), with the config the run recorded (its
``config.yaml``). A finished export is reused unless its inputs changed (:func:`export_run_cached`).

TensorFlow is imported only once the arguments and the run folder check out (and after
:mod:`tfqat.cli` has quieted its start-up logging), so ``--help`` and those errors never wait for it.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Optional

from tfqat.export.spec import HEADS


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.export",
        description="Export a run's QAT student to model.tflite (TFQAT custom ops), its FP teacher to "
                    "model_float.tflite, and manifest.json.")
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/tiny")
    ap.add_argument("--recipe", help="which qat-<recipe> stage to export (default: the config's recipe, or "
                                     "the only trained one)")
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
    ap.add_argument("--config", help="config name or YAML, for run folders made before runs recorded their "
                                     "config.yaml (default: the run's config.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="export again even when the export there is up to date")
    return ap


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The code an export's bytes depend on besides its inputs: the exporter, the quantizers and models it
# reads, and the TensorFlow that converts. A change there is a new export.
EXPORTER_CODE = ("export", "quant", "models")


def export_inputs(cfg, stage_dir: Path, oproj: str = "float", head: str = "float",
                  prune: Optional[str] = None) -> dict:
    """Everything an export is made from: the student's and the teacher's weights (sha256), its
    recipe, the model config, the options, and a hash of the exporter's code and versions."""
    from tfqat.config import config_to_dict
    from tfqat.pipeline import teacher_path
    from tfqat.provenance import ROOT, package_versions

    pkg = ROOT / "tfqat"
    code = hashlib.sha256()
    for sub in EXPORTER_CODE:
        for f in sorted((pkg / sub).rglob("*.py")):
            code.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    versions = package_versions()
    tpath = teacher_path(cfg)
    return {"student": _sha256_file(stage_dir / "student.weights.h5"),
            "recipe": (stage_dir / "recipe.json").read_text(),
            "teacher": _sha256_file(tpath) if tpath.is_file() else None,
            "model": config_to_dict(cfg.model),
            "data": {k: v for k, v in config_to_dict(cfg.data).items() if k != "cache_dir"},
            "options": {"oproj": oproj, "head": head, "prune": prune},
            "code": code.hexdigest()[:16], "tensorflow": versions["tensorflow"], "tfqat": versions["tfqat"]}


def _default_out(cfg, stage_dir: Path) -> Path:
    """``<run>/export-<recipe name>``, as :func:`tfqat.export.write.export_run` names it."""
    from tfqat.checkpoints import read_json_checked

    recipe = read_json_checked(stage_dir / "recipe.json", f"delete {stage_dir} and rerun python -m tfqat.train")
    return cfg.run_dir / f"export-{recipe.get('name') or stage_dir.name.removeprefix('qat-')}"


def export_run_cached(cfg, stage_dir, out_dir=None, oproj: str = "float", head: str = "float",
                      prune: Optional[str] = None, progress: bool = False, force: bool = False) -> tuple[dict, bool]:
    """:func:`tfqat.export.write.export_run`, skipped when ``out_dir`` holds a complete export
    (``manifest.json``) made from the same :func:`export_inputs` (``source.json``).

    Returns:
        ``(export_run's result, reused)``.
    """
    import json

    from tfqat.atomic import write_json_atomic
    from tfqat.export.write import export_run

    stage_dir = Path(stage_dir)
    if not (stage_dir / "student.weights.h5").is_file() or not (stage_dir / "recipe.json").is_file():
        from tfqat.cli import UserError

        raise UserError(f"{stage_dir}: no trained student (recipe.json + student.weights.h5); run python -m "
                        "tfqat.train first")
    from tfqat.checkpoints import check_weights_file
    from tfqat.pipeline import teacher_path

    check_weights_file(stage_dir / "student.weights.h5", f"delete {stage_dir} and rerun python -m tfqat.train")
    if teacher_path(cfg).is_file():
        check_weights_file(teacher_path(cfg), f"delete {teacher_path(cfg).parent} and rerun python -m tfqat.train")
    out = Path(out_dir) if out_dir is not None else _default_out(cfg, stage_dir)
    inputs = export_inputs(cfg, stage_dir, oproj, head, prune)
    marker, manifest = out / "source.json", out / "manifest.json"
    if not force and marker.is_file() and manifest.is_file():
        try:
            old, data = json.loads(marker.read_text()), json.loads(manifest.read_text())
        except (ValueError, UnicodeDecodeError):
            old, data = None, None  # damaged: export again
        if old == inputs:
            res = {"manifest": str(manifest), "manifest_data": data,
                   "tokenizer": str(out / "tokenizer.json") if (out / "tokenizer.json").is_file() else None}
            for key, f in data["files"].items():
                res[key] = str(out / f["path"])
            res.setdefault("model_float", None)
            return res, True
    marker.unlink(missing_ok=True)  # an export cut short must never look finished
    res = export_run(cfg, stage_dir, out, oproj=oproj, head=head, prune=prune, progress=progress)
    write_json_atomic(marker, inputs)
    return res, False


def main(argv: Optional[list] = None) -> int:
    from tfqat.cli import UserError, die

    args = build_parser().parse_args(argv)
    with die():
        from tfqat.cli import parse_overrides, run_config

        run = Path(args.run)
        if not run.is_dir():
            raise UserError(f"{run}: no such run folder; train first with python -m tfqat.train")
        trained = sorted(p for p in run.glob("qat-*") if (p / "student.weights.h5").is_file())
        if not trained:
            raise UserError(f"{run}: no trained model (no qat-*/student.weights.h5); run python -m tfqat.train first")
        cfg = run_config(run, parse_overrides(args.overrides), args.config)
        own = run / f"qat-{cfg.qat.recipe}"
        if args.recipe:
            stage = run / f"qat-{args.recipe}"
        elif own in trained or len(trained) == 1:
            stage = own if own in trained else trained[0]
        else:
            raise UserError(f"{run}: several QAT stages ({', '.join(p.name for p in trained)}); pick one with "
                            "--recipe")
        if not (stage / "student.weights.h5").is_file():
            raise UserError(f"{stage}: no trained model (student.weights.h5 missing); run python -m "
                            "tfqat.train first")
        if args.prune is not None:  # fail fast, one line
            from tfqat.agile.prune_export import check_schedule

            check_schedule(args.prune, cfg.model.layers, error=UserError)
        res, reused = export_run_cached(cfg, stage, args.out, oproj=args.oproj, head=args.head, prune=args.prune,
                                        force=args.force)
        if reused:
            print(f"{Path(res['manifest']).parent}: up to date (same weights, recipe, options and exporter); "
                  "--force exports again")
        m = res["manifest_data"]
        for key in ("model", "model_float"):
            if res.get(key):
                f = m["files"][key]
                print(f"{res[key]}: {f['bytes'] / 1e6:.2f} MB, sha256 {f['sha256'][:12]}, ops "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(f["ops"].items())))
        print(f"manifest: {res['manifest']}")
    return 0
