"""Linear: ``y = x @ kernel (+ bias)`` with a slot for a weight fake-quantizer.

Kernel layout is ``[in, out]``; a weight quantizer works per output channel = the last axis.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfqat.models.quant_point import replace_tracked

INIT_STD = 0.02  # GPT-2 / LLaMA init; output projections divide it by sqrt(2 * layers)


class Linear(keras.layers.Layer):
    """A projection whose kernel can be swapped for ``weight_quantizer(kernel)`` at call time.

    Args:
        units: output features.
        use_bias: add a bias (GPT-2) or not (LLaMA).
        stddev: normal init standard deviation of the kernel; the bias starts at zero.
    """

    def __init__(self, units: int, use_bias: bool = False, stddev: float = INIT_STD, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.use_bias = use_bias
        self.stddev = stddev
        self.weight_quantizer = None

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(input_shape[-1], self.units),
            initializer=keras.initializers.RandomNormal(stddev=self.stddev),
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.units,), initializer="zeros")
            if self.use_bias
            else None
        )

    def set_weight_quantizer(self, quantizer) -> None:
        """Attach a layer ``q(kernel) -> kernel_hat`` (or ``None`` to use the float kernel)."""
        replace_tracked(self, "weight_quantizer", quantizer)

    def effective_kernel(self):
        """The kernel the matmul uses: fake-quantized when a quantizer is attached."""
        kernel = tf.convert_to_tensor(self.kernel)
        return kernel if self.weight_quantizer is None else self.weight_quantizer(kernel)

    def call(self, x):
        # A 2-D matmul: einsum's "...i,io" gradient materialises a broadcast (..., in, out) product.
        kernel = self.effective_kernel()
        lead = tf.shape(x)[:-1]
        y = tf.matmul(tf.reshape(x, (-1, kernel.shape[0])), kernel)  # (N, out)
        y = tf.reshape(y, tf.concat([lead, [self.units]], axis=0))  # (..., out)
        return y if self.bias is None else y + self.bias
