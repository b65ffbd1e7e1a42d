"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly, before
calibration.

For a projection input ``X`` (channels j) read by kernels ``W`` (rows j), the factor
``s_j = max|X_j|^a / max|W_j|^(1-a)`` gives ``X W = (X / s) (s W)``: ``X / s`` has flatter channels
(what per-token activation scales need) and ``s W`` absorbs the outliers (weights are quantized per
output channel or group, where one large input row costs little). ``1 / s`` is folded where ``X``
is produced, so the float model computes the same function:

- attn_in (q/k/v input) and mlp_in (gate/up input): the preceding RMSNorm / LayerNorm's scale
  (and LayerNorm's shift);
- o_in (o_proj input): v_proj's output columns (and bias); with grouped-query attention one factor
  per kv channel, shared by the query heads that read it;
- mlp_act (down_proj input, SwiGLU only): up_proj's output columns (``silu(g) * u / s``).

Statistics come from the float model (every quantizer detached) on calibration batches.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import numpy as np
import tensorflow as tf

# point -> (the linears reading it, what produces it)
SMOOTH_POINTS = ("attn_in", "o_in", "mlp_in", "mlp_act")


class _MaxObserver:
    """Stands in a QuantPoint's quantizer slot: records ``max |x|`` per channel, returns ``x``."""

    def __init__(self) -> None:
        self.peak = None

    def __call__(self, x, bits=None, token_axis=None, training=None):
        m = np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(axis=0)
        self.peak = m if self.peak is None else np.maximum(self.peak, m)
        return x


@contextlib.contextmanager
def detached_quantizers(student, observers: dict | None = None):
    """Run ``student`` as its float model: weight and activation quantizers out of their slots
    (``observers[(block index, point)]`` put in instead), restored on exit. Plain attribute swaps,
    so Keras tracking (and the checkpoint layout) never changes."""
    saved = []
    try:
        for bi, block in enumerate(student.blocks):
            for lin in block.linears().values():
                saved.append((lin, "weight_quantizer", lin.weight_quantizer))
                object.__setattr__(lin, "weight_quantizer", None)
            for name, point in block.quant_points().items():
                saved.append((point, "quantizer", point.quantizer))
                object.__setattr__(point, "quantizer", (observers or {}).get((bi, name)))
        yield student
    finally:
        for obj, attr, value in saved:
            object.__setattr__(obj, attr, value)


def activation_peaks(student, batches: Iterable, chunk: int = 8) -> dict:
    """``{(block, point): max|x| per channel}`` of the float model at :data:`SMOOTH_POINTS`."""
    obs = {(bi, p): _MaxObserver() for bi in range(len(student.blocks)) for p in SMOOTH_POINTS}
    x = np.concatenate([np.asarray(b[0] if isinstance(b, (tuple, list)) else b) for b in batches])
    with detached_quantizers(student, obs):
        for i in range(0, len(x), chunk):
            student(tf.constant(x[i:i + chunk], tf.int32), training=False)
    return {k: o.peak for k, o in obs.items()}


def smooth_factors(act_peak: np.ndarray, weights: list, alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` over the rows ``j`` of every kernel
    ``[in, out]`` in ``weights``; 1 where a channel or its weights are all zero."""
    w_peak = np.max([np.abs(np.asarray(w, np.float64)).max(axis=1) for w in weights], axis=0)
    a = np.asarray(act_peak, np.float64)
    s = np.power(np.maximum(a, 1e-12), alpha) / np.power(np.maximum(w_peak, 1e-12), 1.0 - alpha)
    return np.where((a > 0) & (w_peak > 0), s, 1.0)


def _scale_rows(lin, s) -> None:
    lin.kernel.assign((lin.kernel.numpy().astype(np.float64) * s[:, None]).astype(np.float32))


def _scale_cols(lin, s) -> None:
    lin.kernel.assign((lin.kernel.numpy().astype(np.float64) / s[None, :]).astype(np.float32))
    if lin.bias is not None:
        lin.bias.assign((lin.bias.numpy().astype(np.float64) / s).astype(np.float32))


def _scale_norm(norm, s) -> None:
    for attr in ("scale", "gamma", "beta"):
        v = getattr(norm, attr, None)
        if v is not None:
            v.assign((v.numpy().astype(np.float64) / s).astype(np.float32))


def smooth_student(student, batches: Iterable, alpha: float = 0.5) -> dict:
    """Fold SmoothQuant factors into ``student``'s float weights in place (see module doc).

    Returns ``{(block, point): factors}`` (what was folded, for reports and tests).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"smooth_student: alpha={alpha} must be in (0, 1]")
    peaks = activation_peaks(student, batches)
    cfg = student.config
    folded = {}
    for bi, block in enumerate(student.blocks):
        lin = block.linears()
        attn, mlp = block.attn, block.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        s = smooth_factors(peaks[(bi, "attn_in")], [l.kernel.numpy() for l in qkv], alpha)
        _scale_norm(block.attn_norm, s)
        for l in qkv:
            _scale_rows(l, s)
        folded[(bi, "attn_in")] = s

        # o_proj's input channel h*D + d reads v channel (h // G)*D + d: one factor per kv channel
        g, d = cfg.heads // cfg.num_kv_heads, cfg.head_dim
        a = peaks[(bi, "o_in")].reshape(cfg.num_kv_heads, g, d).max(axis=1)  # (K, D)
        w_rows = np.abs(attn.o_proj.kernel.numpy()).max(axis=1).reshape(cfg.num_kv_heads, g, d).max(axis=1)
        s_kv = smooth_factors(a.reshape(-1), [w_rows.reshape(-1, 1)], alpha)  # (K*D,)
        _scale_cols(attn.v_proj, s_kv)
        _scale_rows(attn.o_proj, np.repeat(s_kv.reshape(cfg.num_kv_heads, 1, d), g, axis=1).reshape(-1))
        folded[(bi, "o_in")] = s_kv

        up = [lin[n] for n in type(mlp).LINEARS[:-1]]
        s = smooth_factors(peaks[(bi, "mlp_in")], [l.kernel.numpy() for l in up], alpha)
        _scale_norm(block.mlp_norm, s)
        for l in up:
            _scale_rows(l, s)
        folded[(bi, "mlp_in")] = s

        if "up_proj" in lin:  # SwiGLU: silu(gate) * up is linear in up; GELU is not
            down = lin["down_proj"]
            s = smooth_factors(peaks[(bi, "mlp_act")], [down.kernel.numpy()], alpha)
            _scale_cols(lin["up_proj"], s)
            _scale_rows(down, s)
            folded[(bi, "mlp_act")] = s
    return folded
