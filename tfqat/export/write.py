"""Writing an export: convert, check and write ``model.tflite``, ``model_float.tflite``,
``tokenizer.json`` and ``manifest.json`` (:func:`export_models`), and the default job's export
stage (:func:`export_run`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from tfqat.agile.prune_export import check_schedule, convert_pruned
from tfqat.atomic import write_bytes_atomic
from tfqat.config import config_to_dict
from tfqat.export.checks import check_export, inspect_tflite
from tfqat.export.graph import convert
from tfqat.export.kv_cache import cache_bits
from tfqat.export.spec import ExportError, spec_from_model

FORMAT_VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_models(student, teacher=None, out_dir=".", tokenizer_json: Optional[str] = None,
                  rho: Optional[float] = None, oproj: str = "float", extra: Optional[dict] = None,
                  check: bool = True, head: str = "float", prune: Optional[str] = None) -> dict:
    """Convert, check and write ``model.tflite`` (+ ``model_float.tflite`` when ``teacher``),
    ``tokenizer.json`` and ``manifest.json`` into ``out_dir`` (each file atomically, the manifest
    last, so a present manifest means a complete export).

    ``prune``: an Agile-Quant token-pruning schedule (``"progressive:0.25"``, ``"0.1,0.1,0"``)
    applied in both files' prefill; their signatures then change (``kv_len``, see
    :mod:`tfqat.agile.prune_export`). A bad schedule raises a one-line :class:`ExportError`.

    Returns:
        ``{"model": path, "model_float": path or None, "manifest": path, "manifest_data": dict}``.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    spec = spec_from_model(student, quantized=True, rho=rho, oproj=oproj, head=head)
    ratios = None
    if prune is not None:
        ratios = check_schedule(prune, spec.cfg.layers, error=ExportError)
    _convert = convert if ratios is None else (lambda s: convert_pruned(s, ratios))
    data = _convert(spec)
    info = check_export(data, spec) if check else inspect_tflite(data)
    files = {"model": ("model.tflite", data, info)}
    if teacher is not None:
        fspec = spec_from_model(teacher, quantized=False)
        fdata = _convert(fspec)
        finfo = check_export(fdata, fspec) if check else inspect_tflite(fdata)
        files["model_float"] = ("model_float.tflite", fdata, finfo)
    tok_bytes = None
    if tokenizer_json is not None:
        tok_bytes = Path(tokenizer_json).read_bytes()
    manifest: dict = {
        "format": "tfqat-export", "format_version": FORMAT_VERSION,
        "config": config_to_dict(spec.cfg), "recipe": spec.recipe,
        "token_adaptive": None if spec.rho is None else {
            "rho": spec.rho, "prefill": "top-k (TFQAT_SELECT_BITS mode 0)",
            "decode": "importance >= per-layer prefill threshold (mode 1)"},
        "oproj": spec.oproj,
        "head": spec.head,
        "kv_cache": {
            "capacity": spec.cfg.max_positions,
            "layout": "k/v [kv_heads, capacity, head_dim] int8 codes, or packed int4 [.., ceil(head_dim/2)] "
                      "(two codes per byte, stored in int8 tensors); "
                      "ks float32 [capacity] (K scale per position); vb int32 [capacity] (V row bits)",
            "k_bits": [cache_bits(ls.points["k"]) for ls in spec.layers],
            "v_bits": [cache_bits(ls.points["v"]) for ls in spec.layers]},
        "delegate": "libtfqat_ops.so (tflite_ops/OPS.md); load with ai_edge_litert load_delegate",
        "files": {}, "export_s": None,
    }
    for key, (name, blob, inf) in files.items():
        manifest["files"][key] = {
            "path": name, "bytes": len(blob), "sha256": _sha256(blob), "ops": inf["ops"],
            "signatures": inf["signatures"], "tensor_types": inf["tensor_types"],
            "const_bytes": inf["const_bytes"]}
    if tok_bytes is not None:
        manifest["tokenizer"] = {"path": "tokenizer.json", "sha256": _sha256(tok_bytes)}
    if ratios is not None:
        manifest["prune"] = {
            "schedule": prune, "ratios": ratios,
            "rule": "after block l's residual add, drop the prunable tokens (all but token 0 and the "
                    "last) with the least attention to token 0 summed over heads; order and RoPE "
                    "positions kept; drops per layer = floor(cumsum(ratios) * (T - 2)) differences",
            "signatures": "prefill -> logits [T_L, V], logit_positions, kv_len [L], rows of T_l per layer; "
                          "decode(token, position, kv_len [L], caches...): row written at kv_len[l]",
            "runner": "tfqat.agile.prune_export.PrunedLiteModel"}
    manifest.update(extra or {})
    manifest["export_s"] = round(time.perf_counter() - t0, 2)
    for key, (name, blob, _) in files.items():
        write_bytes_atomic(out / name, blob)
    if tok_bytes is not None:
        write_bytes_atomic(out / "tokenizer.json", tok_bytes)
    write_bytes_atomic(out / "manifest.json", json.dumps(manifest, indent=1, default=_json_default).encode())
    return {"model": str(out / "model.tflite"),
            "model_float": str(out / "model_float.tflite") if teacher is not None else None,
            "tokenizer": str(out / "tokenizer.json") if tok_bytes is not None else None,
            "manifest": str(out / "manifest.json"), "manifest_data": manifest}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def export_run(cfg, stage_dir, out_dir=None, oproj: str = "float", progress: bool = False,
               head: str = "float", prune: Optional[str] = None) -> dict:
    """The default job's export stage: the trained student of ``stage_dir`` (runs/<name>/qat-<recipe>)
    and the run's FP teacher -> ``out_dir`` (default runs/<name>/export-<recipe>).

    Raises:
        UserError: no trained student / teacher there (one line).
    """
    # The run's stages only here: export_models stays a plain library call (importing tfqat.cli
    # quiets TensorFlow's logging, which only the command-line tools should do).
    from tfqat.cli import UserError
    from tfqat.pipeline import build_fp_model, load_data, teacher_path
    from tfqat.qat_stage import load_student

    stage_dir = Path(stage_dir)
    try:
        student = load_student(cfg, stage_dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # a weights file from another config
        raise UserError(f"{stage_dir}: cannot load the student into a {cfg.model.arch} model of this "
                        f"config ({type(e).__name__}); check --config") from None
    tpath = teacher_path(cfg)
    if not tpath.is_file():
        raise UserError(f"no FP teacher at {tpath}; run python -m tfqat.train first")
    teacher = build_fp_model(cfg)
    teacher.load_weights(str(tpath))
    data = load_data(cfg, progress)
    tok = Path(cfg.data.cache_dir) / f"data-{data.key}" / "tokenizer.json"
    recipe = getattr(student, "recipe", None)
    rname = getattr(recipe, "name", stage_dir.name.removeprefix("qat-"))
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / f"export-{rname}"
    try:
        return export_models(student, teacher, out, tokenizer_json=str(tok) if tok.is_file() else None,
                             oproj=oproj, head=head, prune=prune,
                             extra={"run": cfg.name, "stage_dir": str(stage_dir)})
    except ExportError as e:
        raise UserError(str(e)) from None
