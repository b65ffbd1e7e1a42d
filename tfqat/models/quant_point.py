"""QuantPoint: a named place in the graph where QAT may attach an activation quantizer.

An identity layer until ``set_quantizer(q)``; then ``call(x, bits)`` returns ``q(x, bits=bits)``.
Per-token bit widths arrive as ``[B, T]`` and leave already broadcastable to ``x``, so a quantizer
never needs to know where the token axis of its tensor is.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def replace_tracked(layer: keras.layers.Layer, attr: str, value) -> None:
    """Set ``layer.<attr> = value`` even after ``layer`` is built, keeping Keras tracking right.

    Keras locks a layer's state after ``build``; the quantizer (with its learnable scales) must
    still become a tracked sub-layer so its variables train and checkpoint with the model. This
    is the same unlock / relock that Keras' own ``Dense.quantize`` does. The old value, if a
    layer, is untracked so its variables leave the model.
    """
    tracker = layer._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        old = getattr(layer, attr, None)
        if old is not None:
            tracker.untrack(old)
        setattr(layer, attr, value)
    finally:
        if was_locked:
            tracker.lock()


class QuantPoint(keras.layers.Layer):
    """Identity by default; calls ``quantizer(x, bits=bits)`` when one is attached.

    Args:
        token_axis: axis of ``x`` that indexes tokens (1 for ``(B, T, C)``, 2 for ``(B, H, T, D)``).
        signed: a hint for QAT; ``False`` for non-negative tensors (softmax probabilities).
    """

    def __init__(self, token_axis: int = 1, signed: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.token_axis = token_axis
        self.signed = signed
        self.quantizer = None

    def set_quantizer(self, quantizer) -> None:
        """Attach a quantizer layer (or ``None`` to go back to identity)."""
        replace_tracked(self, "quantizer", quantizer)

    def call(self, x, bits=None):
        if self.quantizer is None:
            return x
        if bits is not None:
            bits = self.broadcast_bits(bits, len(x.shape))
        return self.quantizer(x, bits=bits, token_axis=self.token_axis)

    def broadcast_bits(self, bits, rank: int):
        """``(B, T)`` -> shape ``(B, 1.., T, 1..)`` of ``rank`` with T on ``token_axis``."""
        bits = tf.convert_to_tensor(bits)
        for _ in range(1, self.token_axis):
            bits = tf.expand_dims(bits, 1)  # axes between batch and token
        for _ in range(rank - self.token_axis - 1):
            bits = tf.expand_dims(bits, -1)  # axes after token
        return bits
