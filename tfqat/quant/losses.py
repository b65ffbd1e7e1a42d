"""EdgeQAT training losses (METHOD.md sec. 2) as pure functions of tensors.

The weights ``r_E``, ``r_D`` are the caller's. Teacher tensors are wrapped in ``stop_gradient``.
Every function is safe on causal maps masked with ``-inf`` or a large negative value: masked
entries are replaced by 0 before any arithmetic, and cosine denominators are floored, so
neither values nor gradients become NaN.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import tensorflow as tf

Tensors = Union[tf.Tensor, Sequence[tf.Tensor]]


def _as_list(x: Tensors) -> list[tf.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _masked_mean(values: tf.Tensor, mask: Optional[tf.Tensor]) -> tf.Tensor:
    if mask is None:
        return tf.reduce_mean(values)
    m = tf.cast(mask, values.dtype)
    return tf.reduce_sum(values * m) / tf.maximum(tf.reduce_sum(m), 1.0)


def distillation_loss(
    student_logits: tf.Tensor,
    teacher_logits: Tensors,
    labels: tf.Tensor,
    gamma: float = 0.5,
    temperature: float = 2.0,
    mask: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """``(1 - gamma) * CE(labels) + gamma * T^2 * KL(p_T || p_S)``, mean over (masked) tokens.

    Several teachers are averaged as logits (the reference's ``stack(...).mean(0)``). Both
    terms are per-token means, as the METHOD formula reads; the reference's
    ``KLDivLoss(reduction="batchmean")`` divides by the batch only, which makes its KL term
    ``seq_len`` times larger relative to CE.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logits: ``[B, T, V]`` or a list of them.
        labels: int ``[B, T]`` next-token ids.
        mask: optional ``[B, T]`` (1 = counts); masked tokens may hold any label id.
    """
    s = tf.cast(student_logits, tf.float32)
    teachers = [tf.cast(t, tf.float32) for t in _as_list(teacher_logits)]
    t_logits = tf.stop_gradient(tf.add_n(teachers) / float(len(teachers)))
    labels = tf.cast(labels, tf.int32)
    if mask is not None:
        labels = tf.where(tf.cast(mask, tf.bool), labels, tf.zeros_like(labels))
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=s)  # (B, T)
    log_ps = tf.nn.log_softmax(s / temperature, axis=-1)
    log_pt = tf.nn.log_softmax(t_logits / temperature, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_pt) * (log_pt - log_ps), axis=-1)  # (B, T)
    return (1.0 - gamma) * _masked_mean(ce, mask) + gamma * temperature**2 * _masked_mean(kl, mask)


def _expand_kv(k: tf.Tensor, num_heads: int) -> tf.Tensor:
    """GQA: ``[B, Hkv, T, D] -> [B, H, T, D]``, query head h reads kv head ``h // (H / Hkv)``."""
    groups = num_heads // k.shape[1]
    return tf.repeat(k, groups, axis=1) if groups > 1 else k


def entropy_loss(q_list: Tensors, k_list: Tensors, form: str = "paper") -> tf.Tensor:
    """Maximum-entropy loss on the quantized queries and keys (minimise it).

    ``form="paper"`` (Eq. 12): per batch row, layer and query head, the population variance of
    q and of its kv head's k over (tokens, head_dim); ``S = mean_batch sum_layers sum_heads
    log(1 + var_q * var_k)``; returns ``-log(S)``.

    ``form="reference"`` (EdgeQAT's training script): unbiased variance over head_dim per
    (batch, head, token) for q and for k (k expanded to the query heads, as the reference
    quantizes K after ``repeat_kv``); ``S = mean over batch and tokens of sum_layers
    sum_heads [log(1 + var_q) + log(1 + var_k)]``; returns ``-log(S)``. The reference sums over
    batch and tokens instead of averaging: that only adds the constant ``-log(B * T)``, so
    values here are batch-size independent and gradients are identical.

    Args:
        q_list: per layer ``[B, H, T, Dh]``.
        k_list: per layer ``[B, Hkv, T, Dh]``.
    """
    qs, ks = _as_list(q_list), _as_list(k_list)
    if form not in ("paper", "reference"):
        raise ValueError(f"entropy_loss: form={form!r} is unknown; use 'paper' or 'reference'")
    if len(qs) != len(ks) or not qs:
        raise ValueError(
            f"entropy_loss: got {len(qs)} q and {len(ks)} k layers; pass one of each per layer"
        )
    total = 0.0
    for q, k in zip(qs, ks):
        q = tf.cast(q, tf.float32)
        k = _expand_kv(tf.cast(k, tf.float32), q.shape[1])
        if form == "paper":
            var_q = tf.math.reduce_variance(q, axis=[2, 3])  # (B, H)
            var_k = tf.math.reduce_variance(k, axis=[2, 3])
            total += tf.reduce_mean(tf.reduce_sum(tf.math.log1p(var_q * var_k), axis=1))
        else:
            d = tf.cast(tf.shape(q)[-1], tf.float32)
            unbiased = d / tf.maximum(d - 1.0, 1.0)
            var_q = tf.math.reduce_variance(q, axis=-1) * unbiased  # (B, H, T)
            var_k = tf.math.reduce_variance(k, axis=-1) * unbiased
            per_token = tf.reduce_sum(tf.math.log1p(var_q) + tf.math.log1p(var_k), axis=1)  # (B, T)
            total += tf.reduce_mean(per_token)
    return -tf.math.log(tf.maximum(total, 1e-12))


def _causal_clean(scores: tf.Tensor) -> tf.Tensor:
    """Zero every entry that is not causal (key s > query t, aligned at the end for T < S) or
    not finite, so masked maps of any masking style compare equal."""
    scores = tf.cast(scores, tf.float32)
    t = tf.shape(scores)[-2]
    s = tf.shape(scores)[-1]
    rows = tf.range(t)[:, None] + (s - t)
    causal = tf.range(s)[None, :] <= rows  # (T, S)
    keep = tf.logical_and(causal, tf.math.is_finite(scores))
    return tf.where(keep, scores, tf.zeros_like(scores))


def _cosine(a: tf.Tensor, b: tf.Tensor, eps: float) -> tf.Tensor:
    """Cosine over the last two axes; the floored denominator keeps zero maps NaN-free."""
    dot = tf.reduce_sum(a * b, axis=[-2, -1])
    norms = tf.reduce_sum(a * a, axis=[-2, -1]) * tf.reduce_sum(b * b, axis=[-2, -1])
    return dot / tf.sqrt(tf.maximum(norms, eps * eps))


def distribution_loss(
    student_scores: Tensors, teacher_scores: Tensors, form: str = "cos", eps: float = 1e-6
) -> tf.Tensor:
    """Attention-map alignment between the quantized student and the FP teacher.

    ``form="cos"`` (tfqat): mean over layers, batch and heads of ``1 - cos`` of the flattened
    causal part of the pre-softmax ``QK^T / sqrt(d)`` maps ``[B, H, T, S]``; 0 when aligned.
    ``form="paper"``: the literal ``+log(sum cos)`` of Eq. 13 and the reference (sum over
    layers, batch and heads), kept for ablation; it pushes the maps apart when minimised. The
    sum is floored at ``eps`` so the log is defined where the reference would give NaN.
    """
    ss, ts = _as_list(student_scores), _as_list(teacher_scores)
    if form not in ("cos", "paper"):
        raise ValueError(f"distribution_loss: form={form!r} is unknown; use 'cos' or 'paper'")
    if len(ss) != len(ts) or not ss:
        raise ValueError(f"distribution_loss: got {len(ss)} student and {len(ts)} teacher layers")
    cos = tf.stack(
        [
            _cosine(_causal_clean(s), tf.stop_gradient(_causal_clean(t)), eps)  # (B, H)
            for s, t in zip(ss, ts)
        ]
    )  # (L, B, H)
    if form == "cos":
        return tf.reduce_mean(1.0 - cos)
    return tf.math.log(tf.maximum(tf.reduce_sum(cos), eps))
