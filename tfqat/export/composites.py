"""The TFQAT_* ops as TensorFlow composites: the contract of ``tflite_ops/OPS.md``.

Each op is a ``tfl_fusable_op`` composite (``@tf.function(experimental_implements=...)``) whose TF
body is the exact integer reference of OPS.md; the TFLite converter turns each call into one
CUSTOM ``TFQAT_*`` node (the function's attrs become the op's flexbuffer options) that
``libtfqat_ops.so`` runs. The bodies also run as plain TensorFlow, which is how the export's
graph can be checked against the Keras model before any kernel runs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfqat.quant.token_bits import select_token_bits

TFQAT_OPS = ("TFQAT_QUANTIZE", "TFQAT_SELECT_BITS", "TFQAT_QLINEAR", "TFQAT_ATTN_QK",
             "TFQAT_ATTN_PV")

_COMPOSITES: dict = {}


def _implements(name: str, **attrs) -> str:
    parts = [f'name: "{name}"', 'attr {key: "tfl_fusable_op" value {b: true}}']
    for key, value in attrs.items():
        kind = "f" if isinstance(value, float) else "i"
        parts.append(f'attr {{key: "{key}" value {{{kind}: {value}}}}}')
    return " ".join(parts)


def _composite(name: str, body, **attrs):
    """A cached ``tf.function`` that the converter fuses into one CUSTOM ``name`` op."""
    key = (name, body.__name__, tuple(sorted(attrs.items())))
    if key not in _COMPOSITES:
        _COMPOSITES[key] = tf.function(body, experimental_implements=_implements(name, **attrs),
                                       autograph=False)
    return _COMPOSITES[key]


def _tf_unpack_int4(packed, length: int):
    wi = tf.cast(packed, tf.int32)
    nib = tf.stack([tf.bitwise.bitwise_and(wi, 15), tf.bitwise.right_shift(wi, 4)], -1)
    shape = tf.concat([tf.shape(packed)[:-1], [-1]], 0)
    nib = tf.reshape(nib, shape)[..., :length]
    return nib - 16 * tf.cast(nib >= 8, tf.int32)


def _tf_quantize_rows(x, bits, scales, dynamic: bool):
    is8 = tf.equal(bits, 8)
    qmax = tf.where(is8, 127.0, 7.0)  # [T]
    if dynamic:
        m = tf.reduce_max(tf.abs(x), axis=1)
        s = tf.where(m == 0.0, tf.ones_like(m), m / qmax)
    else:
        s = tf.where(is8, scales[0], scales[1])
    q = tf.clip_by_value(tf.round(x / s[:, None]), -qmax[:, None] - 1.0, qmax[:, None])
    return q, s


def qlinear_op(x, bits, act_scales, w, w_scales, bias=None, *, w_bits: int, k: int,
               act_mode: int = 0, group_size: int = 0):
    """TFQAT_QLINEAR (OPS.md): fused per-token quantize + int matmul + float epilogue.

    Args:
        group_size: 0 (default): ``w_scales`` is [N], one scale per output channel, and the
            epilogue is ``float(acc) * (xs * ws)``. G > 0, a multiple of 32: ``w_scales`` is
            [N, ceil(k / G)], one scale per output channel and group of G consecutive inputs (the
            last group may be partial), and the epilogue is the grouped one of OPS.md:
            ``s = 0; s = s + float(acc_g) * ws[:, g]`` for g in order, then ``* xs``, then ``+ bias``.
            Emitted as the op's ``group_size`` attr only when G > 0.

    Raises:
        ValueError: ``group_size`` is negative or not a multiple of 32.
    """
    if group_size < 0 or group_size % 32:
        raise ValueError(f"qlinear_op: group_size={group_size} must be 0 (one scale per output "
                         "channel) or a positive multiple of 32")

    def body(x, bits, act_scales, w, w_scales, *rest):
        q, s = _tf_quantize_rows(x, bits, act_scales, act_mode == 1)
        wi = _tf_unpack_int4(w, k) if w_bits == 4 else tf.cast(w, tf.int32)
        qi = tf.cast(q, tf.int32)
        if group_size == 0:
            acc = tf.matmul(qi, wi, transpose_b=True)  # [T, N] exact int32
            y = tf.cast(acc, tf.float32) * (s[:, None] * w_scales[None, :])
        else:
            # Exact int32 sums per group (zero padding to whole groups adds nothing), then the
            # float32 sum over groups from 0.0 in group order. foldl is a loop, one add per step:
            # neither reduce_sum (no order promised) nor an unrolled chain of adds (grappler
            # rewrites it into AddN, which reorders, and drops the add of zeros) keeps that order.
            ng = -(-k // group_size)
            pad = [[0, 0], [0, ng * group_size - k]]
            qg = tf.transpose(tf.reshape(tf.pad(qi, pad), [-1, ng, group_size]), [1, 0, 2])
            wg = tf.transpose(tf.reshape(tf.pad(wi, pad), [-1, ng, group_size]), [1, 0, 2])
            acc = tf.matmul(qg, wg, transpose_b=True)  # [ng, T, N]
            p = tf.cast(acc, tf.float32) * tf.transpose(w_scales)[:, None, :]
            y = tf.foldl(lambda acc_s, p_g: acc_s + p_g, p, initializer=tf.zeros_like(p[0]))
            y = y * s[:, None]
        return y + rest[0][None, :] if rest else y

    body.__name__ = "qlinear_bias" if bias is not None else "qlinear"
    grouping = {"group_size": group_size} if group_size else {}
    fn = _composite("TFQAT_QLINEAR", body, w_bits=w_bits, k=k, act_mode=act_mode, **grouping)
    args = (x, bits, act_scales, w, w_scales) + ((bias,) if bias is not None else ())
    return fn(*args)


def quantize_op(x, bits, scales, mode: int = 0):
    """TFQAT_QUANTIZE: int8 codes [T, K] and the per-token scale [T]; ``mode`` 0 static (scales
    by bit width), 1 dynamic (``max|row| / qmax``; ``scales`` is then ignored)."""

    def quantize(x, bits, scales):
        q, s = _tf_quantize_rows(x, bits, scales, mode == 1)
        return tf.cast(q, tf.int8), s

    return _composite("TFQAT_QUANTIZE", quantize, mode=mode)(x, bits, scales)


def select_bits_topk_op(importance, rho: float):
    """TFQAT_SELECT_BITS mode 0: the top ``rho*T`` tokens get 8 bits (token_bits.select_token_bits)."""

    def select_bits_topk(importance):
        return tf.cast(select_token_bits(importance[None, :], float(np.float32(rho)))[0], tf.int32)

    return _composite("TFQAT_SELECT_BITS", select_bits_topk, mode=0,
                      rho=float(np.float32(rho)))(importance)


def select_bits_threshold_op(importance, threshold):
    """TFQAT_SELECT_BITS mode 1: ``importance >= threshold ? 8 : 4``."""

    def select_bits_threshold(importance, threshold):
        return tf.where(importance >= threshold[0], 8, 4)

    return _composite("TFQAT_SELECT_BITS", select_bits_threshold, mode=1)(importance, threshold)


def attn_qk_op(q_codes, q_scales, k_cache, k_scales, length, *, kv_bits: int, d: int,
               q_layout: int = 0):
    """TFQAT_ATTN_QK: scores [H, T, S_cap], -inf outside the causal valid part. ``q_layout=1``:
    q_codes is [T, H, D] (the quantize op's rows as they are; no TRANSPOSE in the graph)."""

    def attn_qk(q, qs, kc, ks, length):
        if q_layout == 1:
            q = tf.transpose(q, [1, 0, 2])  # [H, T, D]
        h, t = tf.shape(q)[0], tf.shape(q)[1]
        k = _tf_unpack_int4(kc, d) if kv_bits == 4 else tf.cast(kc, tf.int32)
        hkv, s_cap = tf.shape(k)[0], tf.shape(k)[1]
        qg = tf.reshape(tf.cast(q, tf.int32), [hkv, -1, d])  # [Hkv, G*T, D]
        acc = tf.reshape(tf.matmul(qg, k, transpose_b=True), [h, t, s_cap])
        scores = tf.cast(acc, tf.float32) * (qs[None, :, None] * ks[None, None, :])
        pos = length[0] - t + tf.range(t)  # absolute position of each query
        valid = tf.range(s_cap)[None, :] <= pos[:, None]  # [T, S_cap]
        return tf.where(valid[None], scores, tf.constant(-np.inf, tf.float32))

    attrs = {"q_layout": 1} if q_layout == 1 else {}
    return _composite("TFQAT_ATTN_QK", attn_qk, kv_bits=kv_bits, d=d, **attrs)(
        q_codes, q_scales, k_cache, k_scales, length)


def attn_pv_op(p_codes, p_scale, v_cache, v_rowbits, v_scales, length, *, kv_bits: int, d: int,
               p_max: int = 0, p_mode: int = 0, return_p_scales: bool = False):
    """TFQAT_ATTN_PV: [H, T, D] from uint8 probabilities and the (grouped) V cache. ``p_max > 0``:
    p_codes is the float32 softmax output and the op quantizes it, ``clamp(round(p / scale),
    0, p_max)`` (no ROUND / clip / CAST over [H, T, S] in the graph).

    Args:
        p_max: 0 (default): ``p_codes`` is uint8 codes. 1..255: float32 probabilities, quantized
            by the op to codes in [0, p_max].
        p_mode: 0 (default): one scale, ``p_scale`` [1], for every probability row. 1 (needs
            ``p_max``): a scale per row (h, t), ``m / p_max`` with ``m`` the row's max over the
            ``length`` valid positions (NaN and negative entries count as 0), or 1.0 when
            ``m == 0``; ``p_scale`` is then ignored and may be None. Emitted as the op's
            ``p_mode`` attr only when 1, so p_mode=0 exports are unchanged.
        return_p_scales: also return the op's output 1, the [H, T] float32 scale each
            probability row used (``p_scale[0]`` everywhere with p_mode=0), e.g. to weigh token
            importance with exactly the codes the op used.

    Returns:
        out [H, T, D] float32, or ``(out, p_scales)`` with ``return_p_scales``.

    Raises:
        ValueError: ``p_mode`` is not 0 or 1, or is 1 without ``p_max``.
    """
    if p_mode not in (0, 1):
        raise ValueError(f"attn_pv_op: p_mode={p_mode} must be 0 (one static p_scale) or 1 (a "
                         "dynamic scale per probability row)")
    if p_mode == 1 and not 1 <= p_max <= 255:
        raise ValueError(f"attn_pv_op: p_mode=1 needs float probabilities in: set p_max in "
                         f"[1, 255], got p_max={p_max}")
    if p_scale is None:
        if p_mode == 0:
            raise ValueError("attn_pv_op: p_scale is required with p_mode=0")
        p_scale = tf.zeros([1], tf.float32)  # input 1 is not read with p_mode=1

    def attn_pv(p, ps, vc, rowbits, vs, length):
        h, t, s_cap = tf.shape(p)[0], tf.shape(p)[1], tf.shape(p)[2]
        valid = tf.range(s_cap) < length[0]
        if p_mode == 1:
            # p > 0 is false for NaN: NaN, negatives and positions >= length become 0, which
            # changes no max and quantizes to code 0 as the op's codes do.
            pv = tf.where(tf.logical_and(valid[None, None, :], p > 0.0), p, 0.0)
            m = tf.reduce_max(pv, axis=-1)  # [H, T]
            # divide_no_nan: grappler rewrites a division by a constant into a multiplication
            # by its reciprocal (not the true division of the contract); DivNoNan it leaves.
            rows = tf.where(m == 0.0, tf.ones_like(m), tf.math.divide_no_nan(m, float(p_max)))
            q = tf.round(pv / rows[:, :, None])
            p = tf.where(q > 0.0, tf.minimum(q, float(p_max)), 0.0)  # NaN (inf / inf) -> 0
            scale = rows[:, :, None]  # [H, T, 1]
        else:
            if p_max:
                q = tf.round(p / ps[0])
                p = tf.where(q > 0.0, tf.minimum(q, float(p_max)), 0.0)  # NaN -> 0, as the op
            rows = tf.fill([h, t], ps[0]) if return_p_scales else None
            scale = ps[0]
        v = _tf_unpack_int4(vc, d) if kv_bits == 4 else tf.cast(vc, tf.int32)
        hkv = tf.shape(v)[0]
        g8 = tf.cast(tf.logical_and(valid, tf.equal(rowbits, 8)), tf.int32)
        g4 = tf.cast(tf.logical_and(valid, tf.equal(rowbits, 4)), tf.int32)
        pi = tf.reshape(tf.cast(p, tf.int32), [hkv, -1, s_cap])
        acc8 = tf.reshape(tf.matmul(pi * g8[None, None, :], v), [h, t, d])
        acc4 = tf.reshape(tf.matmul(pi * g4[None, None, :], v), [h, t, d])
        out = (tf.cast(acc8, tf.float32) * (scale * vs[0])
               + tf.cast(acc4, tf.float32) * (scale * vs[1]))
        return (out, rows) if return_p_scales else out

    if return_p_scales:  # a second output: another function under the same attrs
        attn_pv.__name__ = "attn_pv_with_p_scales"
    attrs = {"p_max": p_max} if p_max else {}
    if p_mode:
        attrs["p_mode"] = p_mode
    return _composite("TFQAT_ATTN_PV", attn_pv, kv_bits=kv_bits, d=d, **attrs)(
        p_codes, p_scale, v_cache, v_rowbits, v_scales, length)
