"""Causal multi-head / grouped-query self-attention with every QAT point reachable.

Axes: B batch, T query tokens, S key tokens (S == T here), C hidden, H query heads, K kv heads,
G = H / K query heads per kv head, D head size. Query head ``h = k * G + g`` reads kv head ``k``
(HF ``repeat_kv`` order), done by grouping Q instead of copying K and V.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tfqat.config import ModelConfig
from tfqat.models.linear import INIT_STD, Linear
from tfqat.models.quant_point import QuantPoint
from tfqat.models.rope import RotaryEmbedding

# Masked (future) scores: finite, so that losses over the score maps never see inf - inf.
MASK_VALUE = -1e9


def causal_mask(t):
    """Bool ``(T, T)``: query i may attend to key j iff j <= i."""
    return tf.cast(tf.linalg.band_part(tf.ones((t, t)), -1, 0), tf.bool)


class Attention(keras.layers.Layer):
    """Self-attention: attn_in -> q/k/v_proj -> (RoPE) -> q, k -> softmax -> probs -> @v -> o_proj.

    Args:
        cfg: model config (hidden, heads, kv heads, layers for the output init, RoPE settings).
        rotary: apply RoPE to Q and K (LLaMA) or not (GPT-2, learned positions).
        use_bias: biases on the four projections (GPT-2).

    ``call(x, bits=None, token_bits=None)`` returns ``(out, internals, own_bits)``; see
    :meth:`call`.
    """

    def __init__(self, cfg: ModelConfig, rotary: bool, use_bias: bool, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.head_dim
        out_std = INIT_STD / math.sqrt(2 * cfg.layers)
        self.q_proj = Linear(cfg.heads * cfg.head_dim, use_bias, name="q_proj")
        self.k_proj = Linear(cfg.num_kv_heads * cfg.head_dim, use_bias, name="k_proj")
        self.v_proj = Linear(cfg.num_kv_heads * cfg.head_dim, use_bias, name="v_proj")
        self.o_proj = Linear(cfg.hidden, use_bias, stddev=out_std, name="o_proj")
        self.rope = (
            RotaryEmbedding(cfg.head_dim, cfg.max_positions, cfg.rope_theta, name="rope")
            if rotary
            else None
        )
        self.attn_in = QuantPoint(token_axis=1, name="attn_in")  # (B, T, C)
        self.q = QuantPoint(token_axis=2, name="q")  # (B, H, T, D)
        self.k = QuantPoint(token_axis=2, name="k")  # (B, K, T, D); what the KV cache stores
        self.v = QuantPoint(token_axis=2, name="v")  # (B, K, T, D)
        self.probs = QuantPoint(token_axis=2, signed=False, name="probs")  # (B, H, T, S)
        self.o_in = QuantPoint(token_axis=1, name="o_in")  # (B, T, H*D); o_proj's input

    def _split_heads(self, x, heads):
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        x = tf.reshape(x, (b, t, heads, self.head_dim))  # (B, T, heads, D)
        return tf.transpose(x, (0, 2, 1, 3))  # (B, heads, T, D)

    def call(self, x, bits=None, token_bits=None):
        """Args:
            x: ``(B, T, C)`` normalised block input.
            bits: ``(B, T)`` int32 bit widths for attn_in, q and k (from the previous layer), or
                None.
            token_bits: None or a callable ``importance (B, T) -> bits (B, T)``; its result
                (this layer's bits) quantizes v here and is returned for the MLP and next layer.

        Returns:
            ``out (B, T, C)``, ``internals`` dict (q, k, scores, probs, importance), and
            ``own_bits (B, T)`` int32 or None.
        """
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        k_heads, groups = self.kv_heads, self.heads // self.kv_heads
        x = self.attn_in(x, bits=bits)  # (B, T, C)
        q = self._split_heads(self.q_proj(x), self.heads)  # (B, H, T, D)
        k = self._split_heads(self.k_proj(x), k_heads)  # (B, K, T, D)
        v = self._split_heads(self.v_proj(x), k_heads)  # (B, K, T, D)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        q = self.q(q, bits=bits)  # (B, H, T, D)
        k = self.k(k, bits=bits)  # (B, K, T, D)

        qg = tf.reshape(q, (b, k_heads, groups, t, self.head_dim))  # (B, K, G, T, D)
        scores = tf.einsum("bkgtd,bksd->bkgts", qg, k) / math.sqrt(self.head_dim)  # (B, K, G, T, S)
        scores = tf.reshape(scores, (b, self.heads, t, t))  # (B, H, T, S)
        scores = tf.where(causal_mask(t), scores, MASK_VALUE)  # (B, H, T, S)
        probs = self.probs(tf.nn.softmax(scores, axis=-1))  # (B, H, T, S)

        # Importance of token i = attention query i pays to token 0, summed over heads (Eq. 14).
        importance = tf.reduce_sum(probs[:, :, :, 0], axis=1)  # (B, T)
        own_bits = None if token_bits is None else tf.cast(token_bits(importance), tf.int32)
        v = self.v(v, bits=own_bits)  # (B, K, T, D)

        pg = tf.reshape(probs, (b, k_heads, groups, t, t))  # (B, K, G, T, S)
        out = tf.einsum("bkgts,bksd->btkgd", pg, v)  # (B, T, K, G, D)
        out = self.o_proj(self.o_in(tf.reshape(out, (b, t, self.heads * self.head_dim))))  # (B, T, C)
        internals = {"q": q, "k": k, "scores": scores, "probs": probs, "importance": importance}
        return out, internals, own_bits
