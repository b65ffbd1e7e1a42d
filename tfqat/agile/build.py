"""Assemble an Agile-Quant W4A8 student from an FP model (post-training, no gradient steps).

1. ``quantize_model(teacher, "w4a8")`` for the slots, then: TRIP 8-bit quantizers at attn_in,
   mlp_in, mlp_act (the inputs of the projections; per-tensor scale + per-channel 2^k), 8-bit
   per-tensor ActQuantizers at q, k, v (KV cache), the 4-bit log2 quantizer at probs; weight
   quantizers removed (weights are quantized below and stored dequantized in the kernels).
2. One forward over the calibration batches (training text only) initialises every activation
   quantizer in data-flow order (each point sees the already quantized points before it).
3. Block by block: capture each projection's (quantized) input over the calibration batches with
   the previous blocks' weights already quantized, then GPTQ (or group RTN) each projection.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfqat.agile.gptq import gptq, hessian, rtn
from tfqat.agile.log2 import Log2Quantizer
from tfqat.agile.trip import TripQuantizer
from tfqat.quant.qat import quantize_model, quantizers

TRIP_POINTS = ("attn_in", "mlp_in", "mlp_act")


def _capture(student, x, block):
    """Inputs (N, in) of every projection of ``block`` during ``student(x)``."""
    seen = {}
    linears = block.linears()
    originals = {}
    for name, lin in linears.items():
        orig = lin.call
        originals[name] = orig

        def hook(inp, orig=orig, name=name):
            seen.setdefault(name, []).append(np.asarray(inp).reshape(-1, inp.shape[-1]))
            return orig(inp)

        object.__setattr__(lin, "call", hook)
    try:
        for i in range(0, len(x), 16):
            student(x[i:i + 16], training=False)
    finally:
        for name, lin in linears.items():
            object.__delattr__(lin, "call") if "call" in lin.__dict__ else None
    return {k: np.concatenate(v) for k, v in seen.items()}


def agile_student(teacher, calib_batches, weights: str = "gptq", group_size: int = 128, trip: bool = True,
                  log2_probs: bool = True, act_order: bool = True, progress: bool = False):
    """The Agile-Quant student (see module doc); ``weights`` in {"gptq", "rtn", "float"}."""
    student = quantize_model(teacher, "w4a8", name="agile")
    for block in student.blocks:
        for lin in block.linears().values():
            lin.set_weight_quantizer(None)
        pts = block.quant_points()
        if trip:
            for p in TRIP_POINTS:
                pts[p].set_quantizer(TripQuantizer(8, name=f"trip_{p}"))
        if log2_probs:
            pts["probs"].set_quantizer(Log2Quantizer(4, name="log2_probs"))
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in calib_batches]
    x = tf.concat([tf.convert_to_tensor(b, tf.int32) for b in xs], axis=0)
    for q in quantizers(student).values():
        if hasattr(q, "initialized"):
            q.initialized.assign(False)
    student(x, training=True)  # data-flow order init of every activation quantizer
    student.recipe_name = f"w4a8-agile-{weights}"
    student.agile = {"weights": weights, "group_size": group_size, "trip": trip, "log2_probs": log2_probs,
                     "act_order": act_order, "calib_tokens": int(np.prod(x.shape))}
    if weights == "float":
        return student
    for bi, block in enumerate(student.blocks):
        inputs = _capture(student, x, block)
        for name, lin in block.linears().items():
            k = lin.kernel.numpy()
            if weights == "gptq":
                k_hat, _ = gptq(k, hessian(inputs[name]), 4, group_size, act_order)
            else:
                k_hat = rtn(k, 4, group_size)
            lin.kernel.assign(k_hat)
        if progress:
            print(f"  block {bi}: weights {weights} done", flush=True)
    return student


def agile_size_bytes(cfg, group_size: int = 128) -> int:
    """4-bit projections + one float32 scale per (output row, group) + float parts + activation
    scales (TRIP: scale + a 1-byte k per channel)."""
    from tfqat.models import param_count
    from tfqat.quant.qat import projection_shapes

    projs = projection_shapes(cfg)
    proj = sum(math.ceil(i * o / 2) for i, o, _ in projs)
    scales = sum(4 * o * math.ceil(i / group_size) for i, o, _ in projs)
    floats = 4 * (param_count(cfg) - sum(i * o for i, o, _ in projs))
    acts = cfg.layers * (3 * 4 + 2 * cfg.hidden + cfg.ffn + 3 * 4)
    return proj + scales + floats + acts
