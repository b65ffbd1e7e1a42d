"""Fake-quant layers for QAT whose arithmetic is the exported kernels' arithmetic.

Every quantizer computes ``q = clamp(round_half_even(x / s) + z, qmin, qmax)`` in float32 with
a true division (``tf.round`` is half-to-even, like the kernels' ``nearbyint``) and returns
``(q - z) * s``. ``export`` runs the very same TF function, so ``codes * scales`` equals the
fake-quant output bit for bit: what training saw is what the kernel computes.

Gradients are LSQ (Esser et al.) with a straight-through round, written as one
``tf.custom_gradient`` so the forward value is never perturbed by surrogate arithmetic:

- ``dx = dy`` where ``qmin <= x / s + z <= qmax``, else 0;
- ``ds = g * dy * (round(x/s) - x/s)`` inside, ``g * dy * (qclip - z)`` at the clip;
- ``dz = g * dy * (-s)`` at the clip, 0 inside (LSQ+ offset, in code units);
- ``g = 1 / sqrt(numel * Qp)``, numel = elements sharing that scale (per channel: ``in``
  features; per tensor: every element of the call, batch included, as the LSQ reference's
  ``x.numel()``; adaptive: the elements of that bit width in the call).

Scales are stored raw and used as ``max(|raw|, 1e-8)``: positive without a softplus (the stored
value *is* the scale, so an LSQ init or a loaded checkpoint is used exactly) and never zero, so
``x / s`` is always finite.

Data-dependent init: a non-trainable ``initialized`` flag. The first call with
``training=True`` (eager or inside ``tf.function``) writes the init computed from that input and
sets the flag. A call with ``training`` false before that quantizes with the init computed from
its own input *without storing it* (for weights this is plain post-training quantization of the
current kernel; for activations a per-batch calibration), so building a model on a dummy batch,
then loading FP weights, then training still initializes from real data. Single-replica only:
the init assign is not aggregated across replicas.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tfqat.quant.specs import ActQuantSpec, WeightQuantSpec

_EPS = 1e-8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The code range: signed ``[-2^(b-1), 2^(b-1) - 1]``, unsigned ``[0, 2^b - 1]``."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _code_dtype(bits: int, signed: bool) -> np.dtype:
    if bits <= 8:
        return np.dtype(np.int8 if signed else np.uint8)
    return np.dtype(np.int16 if signed else np.uint16)


def _replicas() -> float:
    """Replicas sharing the global batch in the current replica context (1 outside tf.distribute)."""
    ctx = tf.distribute.get_replica_context()
    return float(ctx.num_replicas_in_sync) if ctx is not None else 1.0


def clip_search_scale(x: tf.Tensor, peak: tf.Tensor, qp: int, ratios: tf.Tensor, axes=None,
                      mask: Optional[tf.Tensor] = None) -> tf.Tensor:
    """The symmetric scale ``peak * r / qp`` (``r`` in ``ratios``) with the least squared rounding +
    clipping error of ``x`` (summed over ``axes``, weighted by ``mask``); per slice when ``peak``
    has the shape ``x`` takes after reducing ``axes``. The first best ratio wins ties."""
    best_err, best_s = None, None
    for i in range(int(ratios.shape[0])):
        s = peak * ratios[i] / qp
        sq = tf.square(tf.clip_by_value(tf.round(x / s), -qp - 1, qp) * s - x)
        err = tf.reduce_sum(sq if mask is None else sq * mask, axis=axes)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = tf.where(better, err, best_err), tf.where(better, s, best_s)
    return best_s


def mse_scale(x: tf.Tensor, mask: tf.Tensor, qp: int, candidates: int = 48,
              max_samples: int = 1 << 18) -> tf.Tensor:
    """The symmetric per-tensor activation scale ``c * max|x| / qp`` (``c`` on a grid in (0, 1])
    with the least squared rounding + clipping error over the masked entries of ``x``.

    Why: pretrained LLMs carry activation outliers; LSQ's ``2 mean|x| / sqrt(Qp)`` clips them to
    ruin, and max-scaling leaves the bulk of the values a code or two. Evaluated on at most
    ``max_samples`` evenly strided entries.
    """
    x = tf.reshape(tf.cast(x, tf.float32), [-1])
    m = tf.reshape(tf.cast(mask, tf.float32), [-1])
    stride = tf.maximum(tf.size(x) // max_samples, 1)
    x, m = x[::stride], m[::stride]
    amax = tf.reduce_max(tf.abs(x) * m)
    amax = tf.where(amax > 0, amax, tf.reduce_max(tf.abs(x)) + _EPS)
    return clip_search_scale(x, amax, qp, tf.linspace(1.0 / candidates, 1.0, candidates), mask=m)


def _unbroadcast(grad: tf.Tensor, like: tf.Tensor) -> tf.Tensor:
    """Sum ``grad`` over the axes along which ``like`` was broadcast, back to ``like``'s shape."""
    _, axes = tf.raw_ops.BroadcastGradientArgs(s0=tf.shape(grad), s1=tf.shape(like))
    return tf.reshape(tf.reduce_sum(grad, axis=axes), tf.shape(like))


def fake_quant(
    x: tf.Tensor,
    scale: tf.Tensor,
    qmin: tf.Tensor,
    qmax: tf.Tensor,
    grad_scale: tf.Tensor,
    zero_point: Optional[tf.Tensor] = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """LSQ fake quantization; returns ``(x_hat, codes)``, codes as float32 integers.

    All arguments are float32 and broadcastable to ``x``; ``scale`` must be positive and
    ``zero_point`` integer-valued (it is rounded straight-through by the caller). Gradients go
    to ``x``, ``scale`` and ``zero_point`` only (see the module docstring).
    """
    z = tf.zeros([], tf.float32) if zero_point is None else zero_point
    qmin = tf.cast(qmin, tf.float32)
    qmax = tf.cast(qmax, tf.float32)
    grad_scale = tf.cast(grad_scale, tf.float32)
    v = x / scale
    codes = tf.clip_by_value(tf.round(v) + z, qmin, qmax)

    @tf.custom_gradient
    def _fq(x_, s_, z_):
        y = (codes - z_) * s_

        def grad(dy):
            inside = tf.logical_and(v + z_ >= qmin, v + z_ <= qmax)
            dx = tf.where(inside, dy, tf.zeros_like(dy))
            ds = dy * grad_scale * (codes - z_ - tf.where(inside, v, tf.zeros_like(v)))
            dz = dy * grad_scale * tf.where(inside, tf.zeros_like(v), -s_ * tf.ones_like(v))
            return dx, _unbroadcast(ds, s_), _unbroadcast(dz, z_)

        return y, grad

    return _fq(x, scale, z), codes


def _positive(raw: tf.Tensor) -> tf.Tensor:
    return tf.maximum(tf.abs(raw), _EPS)


def _round_ste(z: tf.Tensor) -> tf.Tensor:
    return z + tf.stop_gradient(tf.round(z) - z)


class _LazyInit(keras.layers.Layer):
    """Shared data-dependent-init plumbing: store on the first training call, else compute."""

    def _make_flag(self) -> None:
        self.initialized = self.add_weight(
            name="initialized", shape=(), dtype="bool", initializer="zeros", trainable=False
        )

    def _state(self, init_fn, stored_vars, training) -> list[tf.Tensor]:
        if not stored_vars:
            return []
        flag = tf.convert_to_tensor(self.initialized)
        if training:
            def _assign():
                for var, value in zip(stored_vars, init_fn()):
                    var.assign(tf.reshape(tf.cast(value, var.dtype), var.shape))
                self.initialized.assign(True)
                return tf.constant(True)

            tf.cond(flag, lambda: tf.constant(False), _assign)
            return [tf.convert_to_tensor(v) for v in stored_vars]
        return list(
            tf.cond(
                flag,
                lambda: [tf.convert_to_tensor(v) for v in stored_vars],
                lambda: [
                    tf.reshape(tf.cast(val, tf.float32), v.shape)
                    for v, val in zip(stored_vars, init_fn())
                ],
            )
        )


@keras.saving.register_keras_serializable(package="tfqat")
class WeightQuantizer(_LazyInit):
    """Symmetric LSQ weight quantizer for a kernel ``[in, out]``: one scale per output channel
    (last axis), per tensor, or per output channel and group of ``group_size`` inputs (the
    llama.cpp Q4_0 / GPTQ-g128 layout; the last group of an ``in`` that ``group_size`` does not
    divide is shorter).

    Example:
        >>> wq = WeightQuantizer(bits=4)
        >>> w_hat = wq(tf.random.normal([16, 8]), training=True)
        >>> codes, scales = wq.export(tf.random.normal([16, 8]))  # int8 [8, 16], float32 [8]
        >>> WeightQuantizer(4, "group", 32).export(tf.random.normal([40, 8]))[1].shape
        (8, 2)
    """

    def __init__(self, bits: int = 4, granularity: str = "channel", group_size: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = WeightQuantSpec(bits=bits, granularity=granularity, group_size=group_size)
        self.qmin, self.qmax = qrange(self.spec.bits, True)

    def groups(self, k: int) -> int:
        """Groups along an input axis of ``k`` (1 unless grouped)."""
        return -(-k // self.spec.group_size) if self.spec.group_size else 1

    def build(self, input_shape) -> None:
        k, n = int(input_shape[-2]), int(input_shape[-1])
        shape = {"channel": (n,), "tensor": (), "group": (self.groups(k), n)}[self.spec.granularity]
        self.scale = self.add_weight(name="scale", shape=shape, initializer="ones", trainable=True)
        self._make_flag()
        numel = {"channel": k, "tensor": k * n, "group": min(k, self.spec.group_size)}[self.spec.granularity]
        self._grad_scale = 1.0 / math.sqrt(numel * self.qmax)

    def _grouped(self, w: tf.Tensor) -> tf.Tensor:
        """``[K, N]`` -> ``[ng, G, N]``, zero-padded along K (padding quantizes to 0 and is cut)."""
        g, k = self.spec.group_size, int(w.shape[0])
        pad = self.groups(k) * g - k
        if pad:
            w = tf.pad(w, [[0, pad], [0, 0]])
        return tf.reshape(w, (self.groups(k), g, int(w.shape[-1])))

    def _init_values(self, w: tf.Tensor) -> list[tf.Tensor]:
        if self.spec.granularity == "group":
            k = int(w.shape[0])
            mean_abs = tf.reduce_sum(tf.abs(self._grouped(w)), axis=1)  # (ng, N)
            sizes = tf.constant([min(self.spec.group_size, k - i * self.spec.group_size)
                                 for i in range(self.groups(k))], tf.float32)
            mean_abs = mean_abs / sizes[:, None]
        else:
            axes = list(range(w.shape.rank - 1)) if self.spec.granularity == "channel" else None
            mean_abs = tf.reduce_mean(tf.abs(w), axis=axes)
        return [2.0 * mean_abs / math.sqrt(self.qmax)]

    def _quantize(self, kernel, training) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        w = tf.cast(tf.convert_to_tensor(kernel), tf.float32)
        (raw,) = self._state(lambda: self._init_values(w), [self.scale], training)
        s = _positive(raw)
        if self.spec.granularity != "group":
            w_hat, codes = fake_quant(w, s, self.qmin, self.qmax, self._grad_scale)
            return w_hat, codes, s
        k = int(w.shape[0])
        w_hat, codes = fake_quant(self._grouped(w), s[:, None, :], self.qmin, self.qmax, self._grad_scale)
        flat = lambda t: tf.reshape(t, (-1, t.shape[-1]))[:k]  # noqa: E731  (ng*G, N) -> (K, N)
        return flat(w_hat), flat(codes), s

    def call(self, kernel, training=None):
        w_hat, _, _ = self._quantize(kernel, bool(training))
        return tf.cast(w_hat, kernel.dtype)

    def export(self, kernel) -> tuple[np.ndarray, np.ndarray]:
        """Integer codes ``[out, in]`` (one row per output channel) and float32 scales ``[out]``
        (``[out, ceil(in / group_size)]`` when grouped).

        Codes are int8 for bits <= 8 (int4 values stay in ``[-8, 7]``; packing is the
        exporter's) and int16 at 16 bits. Dequantizing codes with their scales equals
        ``call(kernel)`` exactly.
        """
        if len(kernel.shape) != 2:
            raise ValueError(
                f"WeightQuantizer.export: kernel must be [in, out], got shape {kernel.shape}"
            )
        if not self.built:
            self.build(kernel.shape)
        _, codes, s = self._quantize(kernel, False)
        out = int(kernel.shape[-1])
        s = s.numpy().astype(np.float32)
        scales = s.T.copy() if self.spec.granularity == "group" else np.broadcast_to(s, (out,)).copy()
        return codes.numpy().T.astype(_code_dtype(self.spec.bits, True)), scales

    def get_config(self) -> dict:
        return {**super().get_config(), **dataclasses.asdict(self.spec)}


@keras.saving.register_keras_serializable(package="tfqat")
class ActQuantizer(_LazyInit):
    """Activation fake-quant: static learnable per-tensor (LSQ / LSQ+) or dynamic per-token.

    ``call(x, bits=None)``: with ``adaptive=True``, ``bits`` is an int tensor broadcastable to
    ``x`` whose last axis is 1 (e.g. ``[B, T, 1]`` for ``x [B, T, C]``); tokens where
    ``bits == self.bits`` use the high-precision scale and range, all others the ``low_bits``
    ones. ``bits=None`` means every token is high precision.

    Example:
        >>> aq = ActQuantizer(bits=8, adaptive=True)
        >>> y = aq(tf.random.normal([2, 5, 8]), bits=tf.constant([[[8], [4], [8], [4], [4]]] * 2),
        ...        training=True)
        >>> bool(aq.export()["scale4"] > 0)
        True
    """

    def __init__(
        self,
        bits: int = 8,
        granularity: str = "tensor",
        signed: bool = True,
        asymmetric: bool = False,
        adaptive: bool = False,
        low_bits: int = 4,
        init: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = ActQuantSpec(bits, granularity, signed, asymmetric, adaptive, low_bits, init)
        self.hi = qrange(self.spec.bits, self.spec.signed)
        self.lo = qrange(self.spec.low_bits, self.spec.signed) if self.spec.adaptive else self.hi

    def build(self, input_shape) -> None:
        self._make_flag()
        self._stored = []
        if self.spec.granularity == "tensor":
            self.scale = self.add_weight(name="scale", shape=(), initializer="ones")
            self._stored.append(self.scale)
            if self.spec.adaptive:
                self.scale_low = self.add_weight(name="scale_low", shape=(), initializer="ones")
                self._stored.append(self.scale_low)
            if self.spec.asymmetric:
                self.zero_point = self.add_weight(name="zero_point", shape=(), initializer="zeros")
                self._stored.append(self.zero_point)

    def _high_mask(self, x: tf.Tensor, bits) -> tf.Tensor:
        if bits is None or not self.spec.adaptive:
            return tf.ones([1] * x.shape.rank, tf.bool)
        return tf.equal(tf.cast(bits, tf.int32), self.spec.bits)

    # Set by :func:`tfqat.quant.qat.calibrate` for the duration of one calibration pass:
    # "mse" replaces the LSQ init of signed symmetric scales by the least-squares clip.
    calib_override: Optional[str] = None

    def _init_values(self, x: tf.Tensor, high: tf.Tensor) -> list[tf.Tensor]:
        spec = self.spec
        if self.calib_override == "mse" and spec.signed and not spec.asymmetric:
            mask = tf.cast(tf.broadcast_to(high, tf.shape(x)), tf.float32)
            return [mse_scale(x, m, qp) for m, (_, qp) in ((mask, self.hi), (1.0 - mask, self.lo))[: 1 + spec.adaptive]]
        if spec.init_method == "minmax" and spec.asymmetric:
            lo_x = tf.minimum(tf.reduce_min(x), 0.0)
            hi_x = tf.maximum(tf.reduce_max(x), 0.0)
            s = tf.maximum((hi_x - lo_x) / float(self.hi[1] - self.hi[0]), _EPS)
            z = tf.clip_by_value(self.hi[0] - tf.round(lo_x / s), self.hi[0], self.hi[1])
            return [s, z]
        mask = tf.cast(tf.broadcast_to(high, tf.shape(x)), tf.float32)
        values = []
        for m, (_, qp) in ((mask, self.hi), (1.0 - mask, self.lo))[: 1 + spec.adaptive]:
            ax = tf.abs(x) if spec.signed else tf.nn.relu(x)
            n = tf.reduce_sum(m)
            if spec.init_method == "lsq":
                group_mean = tf.reduce_sum(ax * m) / tf.maximum(n, 1.0)
                stat = tf.where(n > 0, group_mean, tf.reduce_mean(ax))
                values.append(2.0 * stat / math.sqrt(qp))
            else:
                stat = tf.where(n > 0, tf.reduce_max(ax * m), tf.reduce_max(ax))
                values.append(stat / float(qp))
        return values

    def _quantize(self, x, bits, training, token_axis=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        spec = self.spec
        x = tf.cast(x, tf.float32)
        high = self._high_mask(x, bits)
        qmin = tf.where(high, float(self.hi[0]), float(self.lo[0]))
        qmax = tf.where(high, float(self.hi[1]), float(self.lo[1]))
        if spec.granularity != "tensor":
            # "token": one scale per token over every other axis but batch, what TFQAT_QUANTIZE
            # and the attention kernels' per-position scales compute ([B, H, T, D] -> [B, 1, T, 1]);
            # "row": over the last axis only ([B, H, T, S] -> [B, H, T, 1])
            axes = [a for a in range(1, x.shape.rank) if a != (token_axis or x.shape.rank - 2) % x.shape.rank]
            if spec.granularity == "row":
                axes = [x.shape.rank - 1]
            peak = tf.reduce_max(tf.abs(x), axis=axes or [-1], keepdims=True)
            # a true division, as the kernels do (grappler turns x / constant into x * (1 / constant))
            q = tf.broadcast_to(qmax, tf.shape(peak)) if qmax.shape.rank else tf.fill(tf.shape(peak), qmax)
            s = tf.stop_gradient(tf.where(peak > 0, tf.math.divide_no_nan(peak, q), tf.ones_like(peak)))
            x_hat, codes = fake_quant(x, s, qmin, qmax, 0.0)
            return x_hat, codes, s, tf.zeros([])
        state = self._state(lambda: self._init_values(x, high), self._stored, training)
        s_hi = _positive(state[0])
        s_lo = _positive(state[1]) if spec.adaptive else s_hi
        z = _round_ste(state[-1]) if spec.asymmetric else None
        s = tf.where(high, s_hi, s_lo)
        # LSQ's gradient scale counts the whole batch's elements: a replica that sees 1/R of the
        # global batch multiplies its count by R, so R workers take the one-worker step
        count_hi = tf.reduce_sum(tf.cast(tf.broadcast_to(high, tf.shape(x)), tf.float32)) * _replicas()
        count_lo = tf.cast(tf.size(x), tf.float32) * _replicas() - count_hi
        g = tf.where(
            high,
            tf.math.rsqrt(tf.maximum(count_hi, 1.0) * float(self.hi[1])),
            tf.math.rsqrt(tf.maximum(count_lo, 1.0) * float(self.lo[1])),
        )
        x_hat, codes = fake_quant(x, s, qmin, qmax, g, z)
        return x_hat, codes, s, (tf.zeros([]) if z is None else z)

    def call(self, x, bits=None, training=None, token_axis=None):
        """``token_axis``: where tokens are in ``x`` (default: the second to last axis, i.e.
        ``[..., T, C]``); a dynamic quantizer takes one scale per token over all other axes."""
        x_hat, _, _, _ = self._quantize(x, bits, bool(training), token_axis)
        return tf.cast(x_hat, x.dtype)

    def initialize(self, x, bits=None) -> None:
        """Calibrate now from ``x`` (what the first training call would do)."""
        x = tf.convert_to_tensor(x)
        if not self.built:
            self.build(x.shape)
        if self._stored:
            x32 = tf.cast(x, tf.float32)
            for var, value in zip(self._stored, self._init_values(x32, self._high_mask(x32, bits))):
                var.assign(tf.reshape(value, var.shape))
        self.initialized.assign(True)

    def codes(self, x, bits=None, token_axis=None) -> tuple[np.ndarray, np.ndarray]:
        """Integer codes of ``x`` and the scale per element (broadcastable), as a kernel sees them.

        Inference-mode math, so ``(codes - zero_point) * scale`` equals ``call(x)`` exactly.
        """
        x = tf.convert_to_tensor(x)
        if not self.built:
            self.build(x.shape)
        _, codes, s, _ = self._quantize(x, bits, False, token_axis)
        return codes.numpy().astype(_code_dtype(self.spec.bits, self.spec.signed)), s.numpy()

    def export(self) -> dict:
        """What a kernel needs: bits, signedness, granularity and the learned scales.

        Static per-tensor: ``scale`` (or ``scale{bits}`` / ``scale{low_bits}`` when adaptive,
        the kernels' ``static_scales[0]`` and ``[1]``), ``zero_point`` (int) when asymmetric.
        Dynamic per-token: no scales (the kernel computes ``max|x| / qmax`` per token).

        Raises:
            ValueError: a static quantizer that was never initialized (its scale is a placeholder).
        """
        spec = self.spec
        out: dict[str, Any] = {
            "bits": spec.bits, "signed": spec.signed, "granularity": spec.granularity
        }
        if spec.adaptive:
            out["low_bits"] = spec.low_bits
        if spec.granularity != "tensor":
            return out
        if not self.built or not bool(self.initialized.numpy()):
            raise ValueError(
                f"{self.name}: export of an uninitialized static quantizer; run a training step "
                f"or call initialize(x) first"
            )
        s_hi = np.float32(_positive(tf.convert_to_tensor(self.scale)).numpy())
        if spec.adaptive:
            out[f"scale{spec.bits}"] = s_hi
            out[f"scale{spec.low_bits}"] = np.float32(
                _positive(tf.convert_to_tensor(self.scale_low)).numpy()
            )
        else:
            out["scale"] = s_hi
        if spec.asymmetric:
            out["zero_point"] = int(np.round(self.zero_point.numpy()))
        return out

    def get_config(self) -> dict:
        return {**super().get_config(), **dataclasses.asdict(self.spec)}
