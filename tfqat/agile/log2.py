"""A 4-bit log2 quantizer for softmax probabilities (Agile-Quant / FQ-ViT log-int-softmax).

``c = clip(round(-log2 p), 0, 2^b - 1)``; ``p_hat = 2^-c`` for ``c < 2^b - 1`` and ``0`` for the
last code (so 4 bits hold exactly 16 levels: 1, 1/2, ..., 2^-14 and 0). Rounding is in the log
domain (the boundary between 2^-c and 2^-(c+1) is ``2^-(c+0.5)``). ``p_hat @ V`` becomes shifts
of V in an integer kernel. Masked (future) probabilities are exactly 0 and stay 0.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def log2_codes(p, bits: int = 4):
    """Integer codes (float32 tensor) of probabilities ``p`` in [0, 1]."""
    p = tf.convert_to_tensor(p, tf.float32)
    top = float(2**bits - 1)
    safe = tf.maximum(p, 1e-38)
    c = tf.round(-tf.math.log(safe) / np.log(2.0))
    c = tf.where(p > 0, c, top)
    return tf.clip_by_value(c, 0.0, top)


def log2_dequant(codes, bits: int = 4):
    top = float(2**bits - 1)
    return tf.where(codes >= top, 0.0, tf.pow(2.0, -codes))


@keras.saving.register_keras_serializable(package="tfqat")
class Log2Quantizer(keras.layers.Layer):
    """Usable in the ``probs`` :class:`~tfqat.models.QuantPoint`; no state, ``bits`` ignored."""

    def __init__(self, bits: int = 4, **kwargs):
        super().__init__(**kwargs)
        if not 2 <= bits <= 8:
            raise ValueError(f"Log2Quantizer: bits={bits} must be in 2..8")
        self.qbits = bits

    def call(self, x, bits=None, training=None, token_axis=None):
        return tf.cast(log2_dequant(log2_codes(x, self.qbits), self.qbits), x.dtype)

    def codes(self, x) -> np.ndarray:
        return log2_codes(x, self.qbits).numpy().astype(np.uint8)

    def get_config(self):
        return {**super().get_config(), "bits": self.qbits}
