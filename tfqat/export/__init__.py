"""Export a QAT student to ``model.tflite`` (TFQAT_* custom ops) and its FP teacher to
``model_float.tflite`` (builtin ops only), plus ``manifest.json``.

``python -m tfqat.export --run runs/<name>`` (also the last stage of the default job, through
:func:`export_run`).

The parts, in the order an export runs through them:

- :mod:`tfqat.export.spec`: what gets exported, read from the Keras model into plain numpy
  (:func:`spec_from_model`: weight codes and scales, activation points, norms, head), int4
  packing, and the ``oproj`` / ``head`` options.
- :mod:`tfqat.export.composites`: the TFQAT_* ops as TensorFlow composites, the contract of
  ``tflite_ops/OPS.md`` (:func:`qlinear_op`, :func:`quantize_op`, :func:`attn_qk_op`, ...).
- :mod:`tfqat.export.kv_cache`: the KV cache's format (:func:`decode_cache_specs`), int4 rows
  and the in-graph row write.
- :mod:`tfqat.export.graph`: the inference graph (:class:`InferenceModule`, with the
  ``prefill`` / ``decode`` signatures) and :func:`convert` to ``.tflite`` bytes.
- :mod:`tfqat.export.checks`: what a ``.tflite`` holds and whether it is the export it must be,
  without TensorFlow (:func:`inspect_tflite`, :func:`check_export`).
- :mod:`tfqat.export.write`: files and manifest (:func:`export_models`), the job's export stage
  (:func:`export_run`); :mod:`tfqat.export.cli` is ``python -m tfqat.export``.

A token-pruned prefill (Agile-Quant) is a variant of the graph in :mod:`tfqat.agile.prune_export`.

Names are resolved lazily (PEP 562), so ``import tfqat.export`` (and ``python -m tfqat.export
--help``) does not import TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "tfqat.export.spec": (
        "ActSpec", "ExportError", "HEADS", "LayerSpec", "ModelSpec", "QLinearSpec", "pack_int4",
        "quantize_rows_int8", "spec_from_model", "unpack_int4",
    ),
    "tfqat.export.composites": (
        "TFQAT_OPS", "attn_pv_op", "attn_qk_op", "qlinear_op", "quantize_op", "select_bits_threshold_op",
        "select_bits_topk_op",
    ),
    "tfqat.export.kv_cache": ("cache_bits", "decode_cache_specs"),
    "tfqat.export.graph": ("DecoderLayer", "InferenceModule", "build_module", "convert"),
    "tfqat.export.checks": ("check_export", "expected_ops", "inspect_tflite"),
    "tfqat.export.write": ("FORMAT_VERSION", "export_models", "export_run"),
    "tfqat.export.cli": ("build_parser", "main"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tfqat.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
