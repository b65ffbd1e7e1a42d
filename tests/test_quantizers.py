"""Quantizers vs numpy references: values, LSQ gradients, export parity, init, serialisation."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfqat.quant import ActQuantizer, WeightQuantizer
from tfqat.quant.token_bits import select_token_bits


def ref_fq(x, s, qmin, qmax, z=0.0):
    """Kernel math in float32 (true division, half-even); returns (x_hat, codes, v)."""
    x = np.asarray(x, np.float32)
    s = np.asarray(s, np.float32)
    v = x / s
    q = np.clip(np.round(v) + np.float32(z), qmin, qmax).astype(np.float32)
    return (q - np.float32(z)) * s, q, v


def rng(seed=0):
    return np.random.default_rng(seed)


def test_weight_per_channel_values_and_init():
    w = rng().normal(size=(12, 5)).astype(np.float32)
    wq = WeightQuantizer(bits=4, granularity="channel")
    y = wq(w, training=True).numpy()
    s = wq.scale.numpy()
    np.testing.assert_allclose(s, 2 * np.abs(w.astype(np.float64)).mean(0) / np.sqrt(7), rtol=1e-6)
    expect, q, _ = ref_fq(w, s, -8, 7)
    np.testing.assert_array_equal(y, expect)
    assert q.min() >= -8 and q.max() <= 7


def test_weight_per_tensor_values():
    w = rng(1).normal(size=(9, 4)).astype(np.float32)
    wq = WeightQuantizer(bits=3, granularity="tensor")
    y = wq(w, training=True).numpy()
    s = wq.scale.numpy()
    assert s.shape == ()
    np.testing.assert_allclose(s, 2 * np.abs(w.astype(np.float64)).mean() / np.sqrt(3), rtol=1e-6)
    np.testing.assert_array_equal(y, ref_fq(w, s, -4, 3)[0])


@pytest.mark.parametrize("bits,gran", [(4, "channel"), (8, "channel"), (2, "tensor"), (6, "tensor")])
def test_weight_export_matches_forward_exactly(bits, gran):
    w = rng(bits).normal(size=(20, 6)).astype(np.float32)
    wq = WeightQuantizer(bits=bits, granularity=gran)
    wq(w, training=True)
    wq.scale.assign(wq.scale.numpy() * 1.37)  # a "trained" scale, not the init
    codes, scales = wq.export(w)
    assert codes.dtype == np.int8 and codes.shape == (6, 20) and scales.shape == (6,)
    assert scales.dtype == np.float32
    np.testing.assert_array_equal(codes.T * scales, wq(w).numpy())
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.min() >= lo and codes.max() <= hi


def test_weight_lsq_gradients():
    w = rng(2).normal(size=(10, 3)).astype(np.float32)
    w[0, 0], w[1, 1] = 50.0, -50.0  # far outside the clip range
    r = rng(3).normal(size=w.shape).astype(np.float32)
    wq = WeightQuantizer(bits=4)
    wq(w, training=True)
    wt = tf.constant(w)
    with tf.GradientTape() as tape:
        tape.watch(wt)
        loss = tf.reduce_sum(wq(wt, training=True) * r)
    dw, ds = tape.gradient(loss, [wt, wq.scale])
    s = wq.scale.numpy()
    _, q, v = ref_fq(w, s, -8, 7)
    inside = (v >= -8) & (v <= 7)
    np.testing.assert_array_equal(dw.numpy(), np.where(inside, r, 0))
    assert dw.numpy()[0, 0] == 0 and dw.numpy()[1, 1] == 0
    g = 1 / np.sqrt(10 * 7)  # numel per channel = in features
    expect = g * (r.astype(np.float64) * (q - np.where(inside, v, 0))).sum(0)
    np.testing.assert_allclose(ds.numpy(), expect, rtol=1e-5, atol=1e-7)


def test_act_per_tensor_lsq_and_gradient():
    x = rng(4).normal(size=(2, 6, 8)).astype(np.float32) * 3
    x[0, 0, :2] = [40.0, -40.0]  # outliers beyond the clip range
    r = rng(5).normal(size=x.shape).astype(np.float32)
    aq = ActQuantizer(bits=4)
    aq(x, training=True)
    s = aq.scale.numpy()
    np.testing.assert_allclose(s, 2 * np.abs(x.astype(np.float64)).mean() / np.sqrt(7), rtol=1e-6)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = aq(xt, training=True)
        loss = tf.reduce_sum(y * r)
    dx, ds = tape.gradient(loss, [xt, aq.scale])
    expect, q, v = ref_fq(x, s, -8, 7)
    np.testing.assert_array_equal(y.numpy(), expect)
    inside = (v >= -8) & (v <= 7)
    assert (~inside).any()
    np.testing.assert_array_equal(dx.numpy(), np.where(inside, r, 0))
    g = 1 / np.sqrt(x.size * 7)
    expect_ds = g * (r.astype(np.float64) * (q - np.where(inside, v, 0))).sum()
    np.testing.assert_allclose(ds.numpy(), expect_ds, rtol=1e-5)


def test_act_per_token_dynamic_with_zero_row():
    x = rng(6).normal(size=(2, 4, 8)).astype(np.float32)
    x[1, 2] = 0.0
    aq = ActQuantizer(bits=8, granularity="token")
    y = aq(x, training=True).numpy()
    peak = np.abs(x).max(-1, keepdims=True)
    s = np.where(peak > 0, peak / np.float32(127), np.float32(1))
    np.testing.assert_array_equal(y, ref_fq(x, s, -128, 127)[0])
    codes, scales = aq.codes(x)
    np.testing.assert_array_equal(scales, s)
    np.testing.assert_array_equal(codes, ref_fq(x, s, -128, 127)[1].astype(np.int8))
    assert aq.trainable_variables == []
    assert aq.export() == {"bits": 8, "signed": True, "granularity": "token"}


def test_act_per_token_adaptive_bits():
    x = rng(7).normal(size=(2, 5, 8)).astype(np.float32)
    bits = np.array([[8, 4, 4, 8, 4], [4, 4, 8, 8, 8]], np.int32)[..., None]
    aq = ActQuantizer(bits=8, granularity="token", adaptive=True)
    y = aq(x, bits=tf.constant(bits)).numpy()
    qmax = np.where(bits == 8, np.float32(127), np.float32(7))
    s = np.abs(x).max(-1, keepdims=True) / qmax
    expect, q, _ = ref_fq(x, s, np.where(bits == 8, -128, -8), qmax)
    np.testing.assert_array_equal(y, expect)
    assert np.abs(q[np.broadcast_to(bits == 4, q.shape)]).max() <= 8


def test_act_unsigned_probabilities():
    logits = rng(8).normal(size=(1, 2, 5, 5)).astype(np.float32) * 3
    p = tf.nn.softmax(logits).numpy()
    aq = ActQuantizer(bits=8, signed=False, init="minmax")
    y = aq(p, training=True).numpy()
    s = aq.scale.numpy()
    np.testing.assert_allclose(s, p.max() / 255, rtol=1e-6)
    expect, q, _ = ref_fq(p, s, 0, 255)
    np.testing.assert_array_equal(y, expect)
    codes, _ = aq.codes(p)
    assert codes.dtype == np.uint8 and codes.max() == 255
    neg = ActQuantizer(bits=8, signed=False)
    neg(p, training=True)
    assert (neg(-p).numpy() == 0).all()  # negatives clip at code 0


def test_act_asymmetric_zero_point_and_gradients():
    x = (rng(9).random(size=(3, 4, 6)).astype(np.float32) * 5) - 1  # range [-1, 4]
    aq = ActQuantizer(bits=8, asymmetric=True)
    aq(x, training=True)
    s, z = aq.scale.numpy(), aq.zero_point.numpy()
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    np.testing.assert_allclose(s, (hi - lo) / 255, rtol=1e-6)
    assert z == np.clip(-128 - np.round(lo / s), -128, 127)
    aq.scale.assign(s * 0.8)  # force some clipping
    s = aq.scale.numpy()
    r = rng(10).normal(size=x.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        y = aq(x, training=True)
        loss = tf.reduce_sum(y * r)
    ds, dz = tape.gradient(loss, [aq.scale, aq.zero_point])
    expect, q, v = ref_fq(x, s, -128, 127, z)
    np.testing.assert_array_equal(y.numpy(), expect)
    inside = (v + z >= -128) & (v + z <= 127)
    assert (~inside).any()
    g = 1 / np.sqrt(x.size * 127)
    r64 = r.astype(np.float64)
    expect_ds = g * (r64 * (q - z - np.where(inside, v, 0))).sum()
    np.testing.assert_allclose(ds.numpy(), expect_ds, rtol=1e-5)
    np.testing.assert_allclose(dz.numpy(), g * (r64 * np.where(inside, 0, -s)).sum(), rtol=1e-5)
    exp = aq.export()
    assert exp["zero_point"] == int(z) and exp["scale"] == s
    codes, scale = aq.codes(x)
    np.testing.assert_array_equal((codes.astype(np.float32) - np.float32(z)) * scale, aq(x).numpy())


def test_act_adaptive_static_scales_and_gradients():
    x = rng(11).normal(size=(2, 6, 4)).astype(np.float32) * 2
    imp = tf.constant(rng(12).random(size=(2, 6)).astype(np.float32))
    bits = select_token_bits(imp, 0.5)[..., None].numpy()  # (B, T, 1)
    aq = ActQuantizer(bits=8, adaptive=True)
    aq(x, bits=bits, training=True)
    hi = np.broadcast_to(bits == 8, x.shape)
    ax = np.abs(x.astype(np.float64))
    np.testing.assert_allclose(aq.scale.numpy(), 2 * ax[hi].mean() / np.sqrt(127), rtol=1e-6)
    np.testing.assert_allclose(aq.scale_low.numpy(), 2 * ax[~hi].mean() / np.sqrt(7), rtol=1e-6)
    s8, s4 = aq.scale.numpy(), aq.scale_low.numpy()
    r = rng(13).normal(size=x.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        y = aq(x, bits=bits, training=True)
        loss = tf.reduce_sum(y * r)
    d8, d4 = tape.gradient(loss, [aq.scale, aq.scale_low])
    s = np.where(hi, s8, s4)
    expect, q, v = ref_fq(x, s, np.where(hi, -128, -8), np.where(hi, 127, 7))
    np.testing.assert_array_equal(y.numpy(), expect)
    inside = (v >= np.where(hi, -128, -8)) & (v <= np.where(hi, 127, 7))
    term = r.astype(np.float64) * (q - np.where(inside, v, 0))
    np.testing.assert_allclose(d8.numpy(), term[hi].sum() / np.sqrt(hi.sum() * 127), rtol=1e-5)
    np.testing.assert_allclose(d4.numpy(), term[~hi].sum() / np.sqrt((~hi).sum() * 7), rtol=1e-5)
    exp = aq.export()
    assert exp["scale8"] == s8 and exp["scale4"] == s4 and exp["low_bits"] == 4
    codes, scale = aq.codes(x, bits=bits)
    np.testing.assert_array_equal(codes * scale, aq(x, bits=bits).numpy())
    # [B, H, T, D] with bits [B, 1, T, 1] (the KV-cache layout)
    xh = rng(14).normal(size=(2, 3, 6, 4)).astype(np.float32)
    yh = aq(xh, bits=bits[:, None]).numpy()
    hh = np.broadcast_to(bits[:, None] == 8, xh.shape)
    expect_h = ref_fq(xh, np.where(hh, s8, s4), np.where(hh, -128, -8), np.where(hh, 127, 7))[0]
    np.testing.assert_array_equal(yh, expect_h)


def test_16_bit_is_identity_to_rounding():
    w = rng(15).normal(size=(32, 16)).astype(np.float32)
    wq = WeightQuantizer(bits=16)
    y = wq(w, training=True).numpy()
    assert (np.abs(y - w) <= wq.scale.numpy() / 2 * (1 + 1e-6)).all()
    np.testing.assert_allclose(y, w, atol=2e-3 * np.abs(w).max())
    codes, scales = wq.export(w)
    assert codes.dtype == np.int16
    np.testing.assert_array_equal(codes.T * scales, y)
    x = rng(16).normal(size=(4, 8)).astype(np.float32)
    aq = ActQuantizer(bits=16, init="minmax")
    np.testing.assert_allclose(aq(x, training=True).numpy(), x, atol=np.abs(x).max() / 32767)


def test_lazy_init_inference_first_then_training_graph_mode():
    x1 = rng(17).normal(size=(2, 4, 8)).astype(np.float32)
    x2 = 10 * x1
    aq = ActQuantizer(bits=8)
    y0 = aq(x1, training=False).numpy()  # uninitialized: init from this batch, not stored
    assert not aq.initialized.numpy() and aq.scale.numpy() == 1.0
    s1 = np.float32(2 * np.abs(x1).mean() / np.sqrt(127))
    np.testing.assert_allclose(y0, ref_fq(x1, s1, -128, 127)[0], rtol=1e-6)

    step = tf.function(lambda x: aq(x, training=True))
    step(x2)
    assert aq.initialized.numpy()
    s2 = aq.scale.numpy()
    np.testing.assert_allclose(s2, 2 * np.abs(x2.astype(np.float64)).mean() / np.sqrt(127), rtol=1e-6)
    step(x1)  # later batches never re-initialize
    assert aq.scale.numpy() == s2


def test_weight_quantizer_in_a_model_saves_and_loads(tmp_path):
    class Tiny(keras.Model):
        def __init__(self):
            super().__init__()
            self.kernel = self.add_weight(shape=(8, 4), initializer="random_normal", name="kernel")
            self.wq = WeightQuantizer(bits=4, name="wq")
            self.aq = ActQuantizer(bits=8, adaptive=True, name="aq")

        def call(self, x, training=None):
            return self.aq(x, training=training) @ self.wq(self.kernel, training=training)

    x = rng(18).normal(size=(3, 8)).astype(np.float32)
    a = Tiny()
    a(x, training=True)
    path = str(tmp_path / "m.weights.h5")
    a.save_weights(path)
    b = Tiny()
    b(np.zeros_like(x))
    b.load_weights(path)
    assert b.wq.initialized.numpy() and b.aq.initialized.numpy()
    np.testing.assert_array_equal(b(x).numpy(), a(x).numpy())
    assert {v.name for v in a.aq.weights} == {"scale", "scale_low", "initialized"}


@pytest.mark.parametrize(
    "layer",
    [
        WeightQuantizer(bits=3, granularity="tensor", name="w"),
        ActQuantizer(bits=6, granularity="token", signed=False, name="a"),
        ActQuantizer(bits=8, asymmetric=True, init="lsq", name="b"),
        ActQuantizer(bits=8, adaptive=True, low_bits=2, name="c"),
    ],
)
def test_config_round_trip(layer):
    cfg = layer.get_config()
    clone = type(layer).from_config(cfg)
    assert clone.get_config() == cfg and clone.spec == layer.spec
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.spec == layer.spec and type(restored) is type(layer)


@pytest.mark.parametrize("bits", [0, 1, 9, 12, 32, 4.0, True])
def test_bad_bits_one_line_error(bits):
    for make in (lambda: WeightQuantizer(bits=bits), lambda: ActQuantizer(bits=bits)):
        with pytest.raises(ValueError, match=r"bits=.*use an int in 2\.\.8") as err:
            make()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"granularity": "channel"}, "granularity"),
        ({"asymmetric": True, "granularity": "token"}, "asymmetric"),
        ({"adaptive": True, "bits": 16}, "adaptive"),
        ({"adaptive": True, "low_bits": 8}, "adaptive"),
        ({"adaptive": True, "asymmetric": True}, "adaptive"),
        ({"init": "mse"}, "init"),
    ],
)
def test_bad_act_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActQuantizer(**kwargs)


def test_export_uninitialized_static_act_raises():
    aq = ActQuantizer()
    aq(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="initialize"):
        aq.export()
    aq.initialize(np.ones((2, 3), np.float32))
    assert aq.export()["scale"] > 0


def test_half_even_ties_match_kernel():
    s = np.float32(0.5)
    x = np.array([-1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 3.75], np.float32)  # x / s = k + 0.5
    aq = ActQuantizer(bits=8)
    aq.initialize(x)
    aq.scale.assign(s)
    codes, _ = aq.codes(x)
    np.testing.assert_array_equal(codes, [-2, -2, 0, 0, 2, 2, 8])


@pytest.mark.parametrize("jit", [False, True])
def test_graph_and_xla_match_eager(jit):
    x = rng(19).normal(size=(2, 5, 8)).astype(np.float32)
    x[0, 0, 0] = 30.0
    bits = np.array([[8, 4, 8, 4, 4], [4, 8, 8, 4, 8]], np.int32)[..., None]
    aq = ActQuantizer(bits=8, adaptive=True)
    aq.initialize(x, bits=bits)

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = aq(x, bits=bits, training=True)
            loss = tf.reduce_sum(y * y)
        return [y] + tape.gradient(loss, [x, aq.scale, aq.scale_low])

    eager = step(tf.constant(x))
    graph = tf.function(step, jit_compile=jit)(tf.constant(x))
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(graph[0].numpy(), eager[0].numpy())


def test_mse_scale_matches_numpy_grid_search():
    """The activation MSE clip against a float64 brute force over the same grid, with outliers."""
    from tfqat.quant.quantizers import mse_scale

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 33, 24))
    x[0, 5, 7] = 80.0  # one massive activation, as pretrained LLMs have
    mask = (rng.random((4, 33, 1)) < 0.6).astype(np.float64) * np.ones_like(x)
    for qp in (7, 127):
        got = float(mse_scale(tf.constant(x, tf.float32), tf.constant(mask, tf.float32), qp, candidates=48))
        amax = np.abs(x * mask).max()
        best, best_err = None, np.inf
        for c in np.linspace(1 / 48, 1.0, 48):
            s = c * amax / qp
            err = (((np.clip(np.round(x / s), -qp - 1, qp) * s - x) ** 2) * mask).sum()
            if err < best_err:
                best, best_err = s, err
        assert got == pytest.approx(best, rel=1e-5)
        lsq = 2 * np.abs(x[mask > 0]).mean() / np.sqrt(qp)
        assert got != pytest.approx(lsq, rel=0.05)


def test_calibrate_mse_beats_lsq_on_outliers():
    """calibrate(act_init="mse") picks scales with lower output error than LSQ's init when the
    activations carry outliers; the override is gone afterwards."""
    from tfqat.quant.qat import calibrate, quantize_model, quantizers
    from tfqat.config import ModelConfig
    from tfqat.models import build_model

    model = build_model(ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                                    max_positions=32), name="teacher")
    x = np.random.default_rng(0).integers(0, 64, (4, 16)).astype(np.int32)
    model(x)
    emb = model.weights[0]
    emb.assign(emb.numpy() * np.where(np.arange(32) == 3, 60.0, 1.0))  # an outlier channel
    ref = model(x).numpy()
    errs = {}
    for init in ("lsq", "mse"):
        st = quantize_model(model, "w8a8", name=f"s_{init}")
        calibrate(st, [x], act_init=init)
        errs[init] = float(np.mean((st(x).numpy() - ref) ** 2))
        assert all(getattr(q, "calib_override", None) is None for q in quantizers(st).values())
    assert errs["mse"] < errs["lsq"], errs
    with pytest.raises(ValueError, match="act_init"):
        calibrate(st, [x], act_init="max")
