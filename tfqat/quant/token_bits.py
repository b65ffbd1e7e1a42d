"""Token importance -> per-token activation bit widths (EdgeQAT Eq. 14), as the kernels pick them.

Importance of token t = attention that query t pays to token 0, summed over heads. Prefill
(and training, which is all prefill): per sequence, the top ``n8 = clamp(floor(rho * T + 0.5),
0, T)`` tokens get 8 bits and the rest 4; ``n8`` is computed in float64 from ``float32(rho)``
exactly as ``select_bits_topk``; ties go to the lower index; NaN ranks lowest.

Decode rule (METHOD.md sec. 3, tfqat decision): the prefill's selection implies a threshold,
the importance of its ``n8``-th most important token (``prefill_threshold``; ``+inf`` when
``n8 == 0``). It is carried with the KV cache, and each decoded token gets 8 bits when its
importance is ``>=`` that threshold (``threshold_token_bits``, the kernels'
``select_bits_threshold``). Tokens already in the cache keep the bits they were written with,
so a decode step never rewrites cached rows. ``decode_rule_token_bits`` applies this rule
inside a full training/eval sequence (top-k over a prefill prefix, threshold after it), which
is how the rule is trained and how its perplexity is compared with re-selecting every step.
"""

from __future__ import annotations

import tensorflow as tf

HIGH_BITS = 8
LOW_BITS = 4


def _n8(t: tf.Tensor, rho) -> tf.Tensor:
    rho64 = tf.cast(tf.cast(rho, tf.float32), tf.float64)
    t64 = tf.cast(t, tf.float64)
    n8 = tf.floor(rho64 * t64 + 0.5)
    n8 = tf.where(tf.math.is_nan(n8), tf.zeros_like(n8), n8)  # NaN rho -> 0, as the kernel
    return tf.cast(tf.clip_by_value(n8, 0.0, t64), tf.int32)


def _descending_order(importance: tf.Tensor) -> tf.Tensor:
    """Token indices per row, most important first; ties by lower index, NaN last."""
    nan = tf.math.is_nan(importance)
    nan_last = tf.argsort(tf.cast(nan, tf.int32), axis=-1, stable=True)  # (B, T)
    key = tf.where(nan, tf.constant(-float("inf"), importance.dtype), importance)
    key = tf.gather(key, nan_last, batch_dims=1)
    # top_k is stable: equal values keep their (NaN-last, then index) order.
    _, idx = tf.math.top_k(key, k=tf.shape(key)[-1], sorted=True)
    return tf.gather(nan_last, idx, batch_dims=1)


def select_token_bits(importance: tf.Tensor, rho) -> tf.Tensor:
    """Per-sequence top-``rho`` token bits.

    Args:
        importance: float ``[B, T]`` (T may be dynamic).
        rho: fraction of 8-bit tokens (Python float or scalar tensor).

    Returns:
        int32 ``[B, T]``: 8 for the selected tokens, 4 for the rest.
    """
    importance = tf.convert_to_tensor(importance)
    order = _descending_order(importance)  # (B, T) token index by rank
    rank = tf.argsort(order, axis=-1, stable=True)  # (B, T) rank of each token
    n8 = _n8(tf.shape(importance)[-1], rho)
    return tf.where(rank < n8, HIGH_BITS, LOW_BITS)


def threshold_token_bits(importance: tf.Tensor, threshold) -> tf.Tensor:
    """``8 if importance >= threshold else 4`` (NaN -> 4); ``threshold`` broadcasts
    (scalar, or ``[B, 1]`` per sequence)."""
    importance = tf.convert_to_tensor(importance)
    keep = importance >= tf.cast(threshold, importance.dtype)
    return tf.where(keep, HIGH_BITS, LOW_BITS)


def prefill_threshold(importance: tf.Tensor, rho) -> tf.Tensor:
    """The importance threshold implied by the prefill's top-k selection, per sequence.

    Returns:
        ``[B, 1]`` (same dtype as ``importance``): the ``n8``-th largest importance of each row,
        ``+inf`` when ``n8 == 0`` (nothing is 8-bit). ``threshold_token_bits`` with it
        reproduces ``select_token_bits`` except that ties with the last selected value are
        also kept.
    """
    importance = tf.convert_to_tensor(importance)
    order = _descending_order(importance)
    ranked = tf.gather(importance, order, batch_dims=1)  # (B, T) descending
    n8 = _n8(tf.shape(importance)[-1], rho)
    last = tf.gather(ranked, tf.maximum(n8 - 1, 0), axis=-1)[:, None]
    inf = tf.constant(float("inf"), importance.dtype)
    return tf.where(n8 > 0, last, inf)


def decode_rule_token_bits(importance: tf.Tensor, rho, prefill_len) -> tf.Tensor:
    """Bits a decoder would give each token of a full sequence: top-k within the first
    ``prefill_len`` tokens, then the prefill's threshold for every later token."""
    importance = tf.convert_to_tensor(importance)
    t = tf.shape(importance)[-1]
    p = tf.clip_by_value(tf.cast(prefill_len, tf.int32), 1, t)
    head = importance[:, :p]
    prefix_bits = select_token_bits(head, rho)
    tail_bits = threshold_token_bits(importance[:, p:], prefill_threshold(head, rho))
    return tf.concat([prefix_bits, tail_bits], axis=-1)
