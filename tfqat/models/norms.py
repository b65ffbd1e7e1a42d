"""RMSNorm (LLaMA) and LayerNorm (GPT-2), over the last axis, in float32."""

from __future__ import annotations

import keras
import tensorflow as tf


class RMSNorm(keras.layers.Layer):
    """``x / sqrt(mean(x^2) + eps) * scale`` (no mean subtraction, no bias)."""

    def __init__(self, eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        ms = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)  # (..., 1)
        return x * tf.math.rsqrt(ms + self.eps) * self.scale


class LayerNorm(keras.layers.Layer):
    """``(x - mean) / sqrt(var + eps) * gamma + beta``."""

    def __init__(self, eps: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.eps = eps

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(input_shape[-1],), initializer="zeros")

    def call(self, x):
        mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)  # (..., 1) each
        return (x - mean) * tf.math.rsqrt(var + self.eps) * self.gamma + self.beta
