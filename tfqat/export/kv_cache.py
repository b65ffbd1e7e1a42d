"""The KV cache of an export: its format (the decode signature's cache inputs), rows stored as
int8 codes or packed int4, and the in-graph write of a step's rows at its position.

Per layer ``l``: ``k_cache_l`` / ``v_cache_l`` int8 ``[Hkv, S_cap, D]`` codes, or packed int4
(two codes per byte, ``[Hkv, S_cap, ceil(D/2)]``, the bytes held in int8 tensors) when that
point is uniformly 4-bit (:func:`cache_bits`); ``ks_cache_l`` float32 ``[S_cap]``, the K scale
of each position; ``vb_cache_l`` int32 ``[S_cap]``, which of the two V scales each row uses
(its bits). The float model caches float32 ``k`` / ``v`` rows only.

KV cache as tensors in and out, not TFLite resource variables: (1) the state stays with the
caller, so one interpreter serves several conversations, and a cache can be forked, rewound
(speculative decoding, beam search) or saved; (2) resource variables need the converter's
experimental resource-variable path (VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE), which
XNNPACK and external delegates do not claim, and our ATTN ops would read a copy anyway; (3) the
graph returns only the new rows (T rows, not the whole cache), and :mod:`tfqat.runtime` keeps
the cache in the decode signature's own input buffers and writes the rows there in place, so
a decode step copies the cache once (the in-graph DYNAMIC_UPDATE_SLICE), not three times.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.compiler.tf2xla.python import xla  # dynamic_update_slice -> TFLite DYNAMIC_UPDATE_SLICE

from tfqat.export.spec import ActSpec, ModelSpec


def cache_bits(point: ActSpec) -> int:
    """Cache storage of a K or V point: packed int4 only when every row of that point is 4-bit."""
    return 4 if (point.bits == 4 and not point.adaptive) else 8


def decode_cache_specs(spec: ModelSpec) -> list:
    """``(name, shape, dtype)`` of the decode signature's cache inputs."""
    cfg = spec.cfg
    Hkv, D, S = cfg.num_kv_heads, cfg.head_dim, cfg.max_positions
    out = []
    for i, ls in enumerate(spec.layers):
        if not spec.quantized:
            out += [(f"k_cache_{i}", [Hkv, S, D], tf.float32), (f"v_cache_{i}", [Hkv, S, D], tf.float32)]
            continue
        for key in ("k", "v"):
            b = cache_bits(ls.points[key])
            shape = [Hkv, S, D] if b == 8 else [Hkv, S, (D + 1) // 2]
            out.append((f"{key}_cache_{i}", shape, tf.int8))  # int4: packed bytes as int8
            out.append((f"{key}{'s' if key == 'k' else 'b'}_cache_{i}", [S],
                        tf.float32 if key == "k" else tf.int32))
    if spec.quantized and spec.rho is not None:
        out.append(("thresholds", [cfg.layers], tf.float32))
    return out


def store_rows(codes, kv_bits: int):
    """int8 codes [Hkv, T, D] -> cache rows: int8, or packed int4 uint8 [Hkv, T, D/2]."""
    if kv_bits == 8:
        return codes
    # Packed int4 bytes held as int8 (the same bits): the converter has no uint8
    # DYNAMIC_UPDATE_SLICE, so the cache tensors are int8 and as_uint8 views them for the op.
    c = tf.cast(codes, tf.int32)
    lo = tf.math.floormod(c[..., 0::2], 16)
    hi = tf.math.floormod(c[..., 1::2], 16)
    b = lo + 16 * hi
    return tf.cast(b - 256 * tf.cast(b >= 128, tf.int32), tf.int8)


def as_uint8(cache, kv_bits: int):
    """The packed-int4 cache (int8 bytes) as the uint8 tensor TFQAT_ATTN_* take (a CAST)."""
    return tf.cast(cache, tf.uint8) if kv_bits == 4 else cache


def write_rows(cache, rows, pos):
    """Write ``rows`` into ``cache`` at position ``pos`` (axis 1 for [Hkv, S, .], axis 0 for [S])."""
    zero = tf.zeros([], tf.int32)
    start = [zero, pos] + [zero] * (len(cache.shape) - 2) if len(cache.shape) > 1 else [pos]
    return xla.dynamic_update_slice(cache, rows, tf.stack(start))
