"""Assemble an Agile-Quant W4A8 student from an FP model (post-training, no gradient steps).

1. ``quantize_model(teacher, "w4a8")`` for the slots, then: TRIP 8-bit quantizers at attn_in,
   mlp_in, mlp_act (the inputs of the projections; per-tensor scale + per-channel 2^k), 8-bit
   per-tensor ActQuantizers at q, k, v (KV cache), the 4-bit log2 quantizer at probs; weight
   quantizers removed (weights are quantized below and stored dequantized in the kernels).
2. One forward over the calibration batches (training text only) initialises every activation
   quantizer in data-flow order (each point sees the already quantized points before it).
3. Block by block: capture each projection's (quantized) input over the calibration batches with
   the previous blocks' weights already quantized, then GPTQ (or group RTN) each projection.

``group_size=None`` is the exportable variant (:mod:`tfqat.agile.exportable`): one 4-bit scale per
output channel of the *folded* kernel ``diag(2^k) W`` (``k`` of the TRIP point feeding that Linear;
GPTQ on the folded inputs ``x / 2^k``, i.e. ``H' = D^-1 H D^-1``: the same output error, since
``(x / 2^k) (2^k W) = x W``), stored unfolded (``codes * scale / 2^k``, exact). After
:func:`~tfqat.agile.trip.fold_student` every kernel is then ``int4 codes x per-output-channel scale``
(in the original column order, act-order included), which the TFQAT kernels take as is; GPTQ
on the unfolded kernel would leave folded codes ``c << k`` (int8). Pair it with
``log2_probs=False`` (the recipe's linear unsigned 8-bit probabilities) for an exportable student.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from tfqat.quant.gptq import gptq, group_scale, hessian, rtn
from tfqat.agile.log2 import Log2Quantizer
from tfqat.agile.trip import TripQuantizer
from tfqat.quant.qat import quantize_model, quantizers
from tfqat.quant.quantizers import qrange

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


def trip_row_factors(block) -> dict:
    """``{linear name: 2^k (in,) float64}`` of the TRIP point feeding each Linear (ones if none)."""
    pts = block.quant_points()
    lin = block.linears()
    feeds = {"attn_in": [n for n in ("q_proj", "k_proj", "v_proj") if n in lin],
             "mlp_in": [n for n in type(block.mlp).LINEARS if n not in ("down_proj", "fc_out")],
             "mlp_act": [n for n in ("down_proj",) if n in lin]}
    out = {n: np.ones(int(l.kernel.shape[0])) for n, l in lin.items()}
    for point, names in feeds.items():
        q = pts[point].quantizer
        if isinstance(q, TripQuantizer):
            for n in names:
                out[n] = 2.0 ** q.k.numpy().astype(np.float64)
    return out


def channel_quantize(kernel, x, f, weights: str = "gptq", bits: int = 4, act_order: bool = True):
    """Per-output-channel ``bits`` weights of the folded kernel ``diag(f) kernel`` (see module doc).

    ``x (N, in)``: the Linear's calibration inputs (unfolded; only GPTQ uses them). Returns
    ``(kernel_hat [in, out] float32 = codes * scale / f, scales float32 (out,))``; codes and the
    folded kernel are exact: ``float32(codes) * scales == kernel_hat * f``.
    """
    f = np.asarray(f, np.float64)
    kf = np.asarray(kernel, np.float64) * f[:, None]
    qmin, qmax = qrange(bits, True)
    if weights == "gptq":
        k_hat, _, s = gptq(kf, hessian(x) / np.outer(f, f), bits, None, act_order, return_scales=True)
        s32 = s[:, 0].astype(np.float32)
        codes = np.round(k_hat.astype(np.float64) / s[:, 0][None, :])
    elif weights == "rtn":
        s32 = group_scale(kf.T, bits).astype(np.float32)
        codes = np.round(kf / s32.astype(np.float64)[None, :])
    else:
        raise ValueError(f"channel_quantize: weights={weights!r}; use 'gptq' or 'rtn'")
    codes = np.clip(codes, qmin, qmax).astype(np.float32)
    folded = codes * s32[None, :]  # float32 product, what the weight quantizer reproduces
    return folded / f.astype(np.float32)[:, None], s32


def agile_student(teacher, calib_batches, weights: str = "gptq", group_size: int = 128, trip: bool = True,
                  log2_probs: bool = True, act_order: bool = True, progress: bool = False):
    """The Agile-Quant student (see module doc); ``weights`` in {"gptq", "rtn", "float"}.

    ``group_size=None``: per-output-channel weights in the folded domain (the exportable variant;
    the scales are kept in ``student.agile_channel_scales[(block, linear)]``).
    """
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
    if group_size is None:
        student.agile_channel_scales = {}
    for bi, block in enumerate(student.blocks):
        inputs = _capture(student, x, block)
        factors = trip_row_factors(block) if group_size is None else None
        for name, lin in block.linears().items():
            k = lin.kernel.numpy()
            if group_size is None:
                k_hat, s = channel_quantize(k, inputs[name], factors[name], weights, 4, act_order)
                student.agile_channel_scales[(bi, name)] = s
            elif weights == "gptq":
                k_hat, _ = gptq(k, hessian(inputs[name]), 4, group_size, act_order)
            else:
                k_hat = rtn(k, 4, group_size)
            lin.kernel.assign(k_hat)
        if progress:
            print(f"  block {bi}: weights {weights} done", flush=True)
    return student


def agile_size_bytes(cfg, group_size: int | None = 128) -> int:
    """4-bit projections + one float32 scale per (output row, group) + float parts + activation
    scales (TRIP: scale + a 1-byte k per channel)."""
    from tfqat.models import param_count
    from tfqat.quant.qat import projection_shapes

    projs = projection_shapes(cfg)
    proj = sum(math.ceil(i * o / 2) for i, o, _ in projs)
    scales = sum(4 * o * math.ceil(i / (group_size or i)) for i, o, _ in projs)
    floats = 4 * (param_count(cfg) - sum(i * o for i, o, _ in projs))
    acts = cfg.layers * (3 * 4 + 2 * cfg.hidden + cfg.ffn + 3 * 4)
    return proj + scales + floats + acts
