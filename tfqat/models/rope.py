"""Rotary position embedding, HF LLaMA "rotate-half" convention.

Pairs are (i, i + D/2), not interleaved (2i, 2i+1): ``out = x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = concat(-x[D/2:], x[:D/2])`` and angle ``pos * theta^(-2i/D)``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin`` of shape ``(max_positions, head_dim)``, computed in float64."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)  # (P, D/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (P, D)
    return np.cos(angles), np.sin(angles)


def rotate_half(x):
    x1, x2 = tf.split(x, 2, axis=-1)  # (..., D/2) each
    return tf.concat([-x2, x1], axis=-1)  # (..., D)


class RotaryEmbedding(keras.layers.Layer):
    """Rotates ``x`` of shape ``(..., T, D)`` by position. No weights: the tables are constants.

    ``call(x, positions=None)``: positions ``0..T-1`` by default, or an int ``(T,)`` tensor (decode
    with a KV cache passes the absolute positions of the new tokens).
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        cos, sin = rope_tables(head_dim, max_positions, theta)
        self.cos = tf.constant(cos, tf.float32)  # (P, D)
        self.sin = tf.constant(sin, tf.float32)  # (P, D)

    def call(self, x, positions=None):
        if positions is None:
            t = tf.shape(x)[-2]
            cos, sin = self.cos[:t], self.sin[:t]  # (T, D)
        else:
            cos, sin = tf.gather(self.cos, positions), tf.gather(self.sin, positions)  # (T, D)
        return x * cos + rotate_half(x) * sin
