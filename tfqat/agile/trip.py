"""TRIP: one activation scale per layer (tensor) plus a per-channel power-of-two factor ``2^k``.

``x_hat[..., c] = s * 2^k_c * clip(round(x_c / (s * 2^k_c)), qmin, qmax)``. ``k_c`` in
``0..k_max`` is chosen per channel by least L2 error; ``s`` by a grid over clip ratios of
``max|x| / (2^k_max * qmax)`` (the base step small enough for the quietest channels, the factor
covering the outlier channels), each candidate ``s`` scored with its best factors.

Folding (:func:`fold_trip`): since ``round(x_c / (s 2^k_c)) == round((x_c / 2^k_c) / s)`` exactly
(division by a power of two is exact in float), dividing the producer's channel ``c`` by
``2^k_c`` and multiplying the consumer Linear's kernel row ``c`` by ``2^k_c`` turns the TRIP
quantizer into a plain per-tensor quantizer with scale ``s`` and leaves every float product
``x_c * W[c, o]`` bit-identical. Producers: the RMSNorm scale (attn_in, mlp_in), the up_proj
output columns (mlp_act of SwiGLU). In integer terms the folded weight codes of row c are
``w_int << k_c`` (4-bit codes with k <= 3 fit int8) at the same per-output-channel scale.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfqat.quant.quantizers import ActQuantizer, qrange

K_MAX = 3


def _fq_np(x, step, qmin, qmax):
    return np.clip(np.round(x / step), qmin, qmax) * step


def best_factors(x: np.ndarray, s: float, bits: int = 8, k_max: int = K_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``k`` (last axis of ``x``) minimising the squared error at base scale ``s``.

    Returns ``(k int (C,), err float64 (C,))``; ties go to the smaller k.
    """
    qmin, qmax = qrange(bits, True)
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    errs = np.stack([((_fq_np(x, s * 2.0 ** k, qmin, qmax) - x) ** 2).sum(0) for k in range(k_max + 1)])
    k = np.argmin(errs, axis=0)
    return k.astype(np.int32), errs[k, np.arange(x.shape[1])]


def search_trip(x: np.ndarray, bits: int = 8, k_max: int = K_MAX, grid: int = 24) -> tuple[float, np.ndarray]:
    """TRIP calibration: ``(s, k (C,))`` with the least total L2 error over the grid of ``s``."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    _, qmax = qrange(bits, True)
    peak = max(float(np.abs(x).max()), 1e-8)
    best = None
    for r in candidate_ratios(grid):
        s = float(np.float32(peak * r / (2 ** k_max * qmax)))
        k, err = best_factors(x, s, bits, k_max)
        if best is None or err.sum() < best[0]:
            best = (err.sum(), s, k)
    return best[1], best[2]


def candidate_ratios(grid: int = 24) -> np.ndarray:
    return np.linspace(0.25, 1.0, grid)


@keras.saving.register_keras_serializable(package="tfqat")
class TripQuantizer(keras.layers.Layer):
    """Fake-quant with a per-tensor scale and per-channel (last axis) power-of-two factors.

    Calibrate with :meth:`initialize` (or the first ``training=True`` call, eagerly); usable in
    any :class:`~tfqat.models.QuantPoint` whose channels are the last axis (attn_in, mlp_in,
    mlp_act). ``bits`` from a token-adaptive model is ignored.
    """

    def __init__(self, bits: int = 8, k_max: int = K_MAX, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.k_max = bits, k_max
        self.qmin, self.qmax = qrange(bits, True)

    def build(self, input_shape):
        c = int(input_shape[-1])
        self.scale = self.add_weight(name="scale", shape=(), initializer="ones", trainable=False)
        self.k = self.add_weight(name="k", shape=(c,), initializer="zeros", trainable=False)
        self.initialized = self.add_weight(name="initialized", shape=(), dtype="bool",
                                           initializer="zeros", trainable=False)

    def initialize(self, x) -> None:
        x = np.asarray(x)
        if not self.built:
            self.build(x.shape)
        s, k = search_trip(x, self.bits, self.k_max)
        self.scale.assign(s)
        self.k.assign(k.astype(np.float32))
        self.initialized.assign(True)

    def step(self):
        """``s * 2^k`` per channel, float32 ``(C,)``."""
        return tf.convert_to_tensor(self.scale) * tf.pow(2.0, tf.convert_to_tensor(self.k))

    def call(self, x, bits=None, training=None, token_axis=None):
        if training and not bool(self.initialized.numpy()):
            self.initialize(x)
        step = self.step()
        return tf.clip_by_value(tf.round(x / step), float(self.qmin), float(self.qmax)) * step

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "k_max": self.k_max}


def per_tensor_from_trip(trip: TripQuantizer) -> ActQuantizer:
    """The per-tensor ActQuantizer a folded TRIP point becomes (scale ``s``, ``initialized``)."""
    q = ActQuantizer(trip.bits)
    q.build((1, int(trip.k.shape[0])))
    q.scale.assign(float(trip.scale.numpy()))
    q.initialized.assign(True)
    return q


def fold_trip(block, point: str, k: np.ndarray) -> None:
    """Fold ``2^k`` of quant point ``point`` ("attn_in", "mlp_in", "mlp_act") into the block.

    Producer channel c is divided by ``2^k_c``, every consumer kernel row c multiplied by it; the
    block's float function is unchanged. Kernels are changed in place (a quantized student's
    weights should already be dequantized into the kernel, weight_quantizer None, or this
    changes what the weight quantizer sees). Supports RMSNorm producers and SwiGLU's mlp_act.
    """
    f = (2.0 ** np.asarray(k, np.float64)).astype(np.float32)  # (C,), exact powers of two
    if point in ("attn_in", "mlp_in"):
        norm = block.attn_norm if point == "attn_in" else block.mlp_norm
        if not hasattr(norm, "scale"):
            raise ValueError(f"fold_trip: {point} producer {type(norm).__name__} is not an RMSNorm")
        norm.scale.assign(norm.scale.numpy() / f)
        consumers = ([block.attn.q_proj, block.attn.k_proj, block.attn.v_proj] if point == "attn_in"
                     else [getattr(block.mlp, n) for n in type(block.mlp).LINEARS if n != "down_proj" and n != "fc_out"])
    elif point == "mlp_act":
        if not hasattr(block.mlp, "up_proj"):
            raise ValueError("fold_trip: mlp_act folding needs SwiGLU (up_proj is the linear producer)")
        up = block.mlp.up_proj
        up.kernel.assign(up.kernel.numpy() / f[None, :])
        consumers = [block.mlp.down_proj]
    else:
        raise ValueError(f"fold_trip: unknown point {point!r}")
    for lin in consumers:
        lin.kernel.assign(lin.kernel.numpy() * f[:, None])


def fold_student(student) -> int:
    """Fold every TripQuantizer of a student: per-tensor quantizers remain. Returns the count."""
    n = 0
    for block in student.blocks:
        for name, qp in block.quant_points().items():
            if isinstance(qp.quantizer, TripQuantizer):
                k = qp.quantizer.k.numpy().astype(np.int32)
                fold_trip(block, name, k)
                qp.set_quantizer(per_tensor_from_trip(qp.quantizer))
                n += 1
    return n
