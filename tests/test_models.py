"""Model tests: numerics against float64 numpy, causality, GQA, internals, QAT slots, config."""

from __future__ import annotations

import functools
import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfqat.config import ModelConfig  # noqa: E402
from tfqat.models import MODELS, build_model, param_count  # noqa: E402
from tfqat.models.rope import RotaryEmbedding  # noqa: E402

TINY = dict(vocab_size=32, hidden=16, layers=2, heads=4, ffn=24, max_positions=12)
ARCHS = {
    "llama": ModelConfig(arch="llama", kv_heads=2, **TINY),
    "gpt2": ModelConfig(arch="gpt2", **TINY),
}


def tokens(b=2, t=7, seed=0, vocab=TINY["vocab_size"]):
    return tf.constant(np.random.default_rng(seed).integers(0, vocab, (b, t)), tf.int32)


def model_for(cfg, seed=0):
    keras.utils.set_random_seed(seed)
    return build_model(cfg)


@functools.lru_cache(maxsize=None)
def shared(arch):
    """One model per arch for tests that leave it as they found it (building costs ~1 s)."""
    return model_for(ARCHS[arch])


# -- numpy float64 reference ------------------------------------------------------------------
def np_forward(model, toks):
    """Whole-model forward in float64 numpy from the model's weights (independent of its code)."""
    cfg = model.config
    w = {v.path.split("/", 1)[1]: np.asarray(v.numpy(), np.float64) for v in model.weights}
    h_, k_, d = cfg.heads, cfg.num_kv_heads, cfg.head_dim
    toks = np.asarray(toks)
    b, t = toks.shape
    x = w["embed_tokens/embeddings"][toks]
    if cfg.arch == "gpt2":
        x = x + w["embed_positions/embeddings"][:t]

    def norm(x, p):
        if cfg.arch == "llama":
            return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.norm_eps) * w[p + "/scale"]
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.norm_eps) * w[p + "/gamma"] + w[p + "/beta"]

    def lin(x, p):
        return x @ w[p + "/kernel"] + w.get(p + "/bias", 0.0)

    def rope(x):  # (b, heads, t, d), pairs (i, i + d/2)
        ang = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(0, d, 2) / d)  # (t, d/2)
        c, s = np.cos(ang), np.sin(ang)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    for i in range(cfg.layers):
        p = f"block_{i}"
        a = norm(x, p + "/attn_norm")
        q = lin(a, p + "/attn/q_proj").reshape(b, t, h_, d).transpose(0, 2, 1, 3)
        k = lin(a, p + "/attn/k_proj").reshape(b, t, k_, d).transpose(0, 2, 1, 3)
        v = lin(a, p + "/attn/v_proj").reshape(b, t, k_, d).transpose(0, 2, 1, 3)
        k, v = np.repeat(k, h_ // k_, axis=1), np.repeat(v, h_ // k_, axis=1)
        if cfg.arch == "llama":
            q, k = rope(q), rope(k)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = (pr @ v).transpose(0, 2, 1, 3).reshape(b, t, h_ * d)
        x = x + lin(o, p + "/attn/o_proj")
        m = norm(x, p + "/mlp_norm")
        if cfg.arch == "llama":
            g = lin(m, p + "/mlp/gate_proj")
            hid = g / (1 + np.exp(-g)) * lin(m, p + "/mlp/up_proj")
            x = x + lin(hid, p + "/mlp/down_proj")
        else:
            f = lin(m, p + "/mlp/fc_in")
            hid = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f**3)))
            x = x + lin(hid, p + "/mlp/fc_out")
    x = norm(x, "final_norm")
    if cfg.tie_embeddings:
        return x @ w["embed_tokens/embeddings"].T
    return x @ w["lm_head/kernel"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tie", [False, True])
def test_forward_matches_numpy_float64(arch, tie):
    cfg = ARCHS[arch].model_copy(update={"tie_embeddings": tie})
    model = model_for(cfg)
    toks = tokens()
    logits = model(toks)
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == tf.float32
    np.testing.assert_allclose(logits.numpy(), np_forward(model, toks), atol=2e-5, rtol=1e-4)


# -- causality, RoPE, GQA ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_causal(arch):
    model = shared(arch)
    a = tokens(t=9).numpy()
    b = a.copy()
    b[:, 6] = (b[:, 6] + 1) % TINY["vocab_size"]
    la, lb = model(tf.constant(a)).numpy(), model(tf.constant(b)).numpy()
    np.testing.assert_array_equal(la[:, :6], lb[:, :6])
    assert np.abs(la[:, 6:] - lb[:, 6:]).max() > 1e-6


def test_rope_matches_numpy_reference():
    d, p, theta = 8, 16, 500.0
    x = np.random.default_rng(1).normal(size=(2, 3, 10, d))
    want = np.empty_like(x)
    for pos in range(10):
        for i in range(d // 2):
            a = pos * theta ** (-2.0 * i / d)
            x1, x2 = x[:, :, pos, i], x[:, :, pos, i + d // 2]
            want[:, :, pos, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[:, :, pos, i + d // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    rope = RotaryEmbedding(d, p, theta)
    got = rope(tf.constant(x, tf.float32)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # explicit positions (decode): rows 3..5 of the same tables
    got = rope(tf.constant(x[:, :, 3:6], tf.float32), positions=tf.range(3, 6)).numpy()
    np.testing.assert_allclose(got, want[:, :, 3:6], atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv():
    gqa_cfg = ModelConfig(arch="llama", kv_heads=2, **TINY)
    gqa, mha = model_for(gqa_cfg), model_for(gqa_cfg.model_copy(update={"kv_heads": None}))
    groups, d = gqa_cfg.heads // 2, gqa_cfg.head_dim
    for src, dst in zip(gqa.weights, mha.weights):
        value = src.numpy()
        if src.path.endswith(("k_proj/kernel", "v_proj/kernel")):
            c = value.shape[0]  # (C, K*D) -> (C, K, D) -> (C, H, D): kv head k serves heads k*G..
            value = np.repeat(value.reshape(c, 2, d), groups, axis=1).reshape(c, -1)
        dst.assign(value)
    toks = tokens()
    np.testing.assert_allclose(gqa(toks).numpy(), mha(toks).numpy(), atol=1e-5)


# -- internals --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_internals(arch):
    cfg = ARCHS[arch]
    model = shared(arch)
    b, t, h, kv, d = 2, 7, cfg.heads, cfg.num_kv_heads, cfg.head_dim
    logits, inner = model(tokens(b, t), return_internals=True)
    assert np.allclose(logits.numpy(), model(tokens(b, t)).numpy())
    assert set(inner) == {"q", "k", "scores", "probs", "importance"}
    assert all(len(v) == cfg.layers for v in inner.values())
    future = ~np.tril(np.ones((t, t), bool))
    for l in range(cfg.layers):
        assert inner["q"][l].shape == (b, h, t, d)
        assert inner["k"][l].shape == (b, kv, t, d)
        scores, probs = inner["scores"][l].numpy(), inner["probs"][l].numpy()
        assert scores.shape == probs.shape == (b, h, t, t)
        assert np.all(scores[..., future] <= -1e8)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert np.all(probs[..., future] == 0)
        np.testing.assert_allclose(inner["importance"][l].numpy(), probs[..., 0].sum(1), atol=1e-6)
    # query 0 sees only token 0: importance h (one per head)
    np.testing.assert_allclose(inner["importance"][0].numpy()[:, 0], h, atol=1e-5)


# -- QAT slots --------------------------------------------------------------------------------
class Recorder(keras.layers.Layer):
    """Activation 'quantizer' that records the bits it received and returns x unchanged."""

    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record  # a function: Keras would copy a dict attribute into a TrackedDict

    def call(self, x, bits=None, token_axis=None):
        self.record(tuple(x.shape), None if bits is None else bits.numpy())
        return x


def test_token_bits_threading():
    cfg = ARCHS["llama"]
    model = model_for(cfg)
    b, t = 2, 6
    log, seen = {}, []
    for l, block in enumerate(model.blocks):
        for name, point in block.quant_points().items():
            point.set_quantizer(Recorder(lambda *seen_, key=(l, name): log.__setitem__(key, seen_)))

    def token_bits(importance):  # a different, recognisable pattern per layer
        seen.append(importance.numpy())
        n = len(seen)
        pattern = tf.where((tf.range(t) + n) % 3 == 0, 8, 4)  # (T,)
        return pattern[None, :] + tf.zeros_like(importance, tf.int32)  # (B, T)

    _, inner = model(tokens(b, t), return_internals=True, token_bits=token_bits)
    layer_bits = [x.numpy() for x in inner["bits"]]
    assert len(seen) == cfg.layers and not np.array_equal(layer_bits[0], layer_bits[1])
    for l in range(cfg.layers):
        np.testing.assert_array_equal(seen[l], inner["importance"][l].numpy())

    def received(l, name):
        shape, bits = log[(l, name)]
        if bits is not None:  # broadcastable to x, with T on the token axis
            assert bits.ndim == len(shape) and bits.shape[0] == b
            bits = bits.reshape(b, t)
        return bits

    for name in ("attn_in", "q", "k"):
        np.testing.assert_array_equal(received(0, name), np.full((b, t), 8))
        np.testing.assert_array_equal(received(1, name), layer_bits[0])
    for l in range(cfg.layers):
        for name in ("v", "mlp_in", "mlp_act"):
            np.testing.assert_array_equal(received(l, name), layer_bits[l])
        assert received(l, "probs") is None
        assert received(l, "o_in") is None  # o_proj's input: one bit width for every token
    assert log[(0, "q")][0] == (b, cfg.heads, t, cfg.head_dim)
    assert model.blocks[0].quant_points()["k"] is model.blocks[0].k

    # without token_bits every point gets bits=None
    log.clear()
    model(tokens(b, t))
    assert all(bits is None for _, bits in log.values())


class Zero(keras.layers.Layer):
    """Weight 'quantizer' with a learnable variable: kernel * scale, scale starting at 0."""

    def build(self, shape):
        self.scale = self.add_weight(name="scale", shape=(shape[-1],), initializer="zeros")

    def call(self, kernel):
        return kernel * self.scale


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_quantizer_slot(arch):
    model = shared(arch)
    toks = tokens()
    before = model(toks).numpy()
    n_weights = len(model.trainable_weights)
    lin = model.blocks[1].linears()["o_proj"]
    assert lin.weight_quantizer is None and lin.kernel.shape == (16, 16)
    lin.set_weight_quantizer(Zero())
    zeroed = model(toks).numpy()
    assert np.abs(zeroed - before).max() > 1e-6
    # same as removing o_proj's kernel contribution by hand (bias, if any, stays)
    kernel = lin.kernel.numpy()
    lin.set_weight_quantizer(None)
    lin.kernel.assign(np.zeros_like(kernel))
    np.testing.assert_allclose(model(toks).numpy(), zeroed, atol=1e-6)
    lin.kernel.assign(kernel)
    # the quantizer's variable is tracked (trains and checkpoints with the model), then dropped
    lin.set_weight_quantizer(Zero())
    model(toks)
    assert len(model.trainable_weights) == n_weights + 1
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(toks))
    assert tape.gradient(loss, lin.weight_quantizer.scale) is not None
    lin.set_weight_quantizer(None)
    assert len(model.trainable_weights) == n_weights
    np.testing.assert_allclose(model(toks).numpy(), before, atol=1e-6)


def test_tf_function_matches_eager():
    model = shared("llama")

    def token_bits(importance):  # top half of tokens by importance -> 8 bits
        k = tf.shape(importance)[1] // 2
        thresh = tf.math.top_k(importance, k).values[:, -1:]
        return tf.where(importance >= thresh, 8, 4)

    step = tf.function(
        lambda x: model(x, return_internals=True, token_bits=token_bits),
        input_signature=[tf.TensorSpec((None, None), tf.int32)],
        jit_compile=False,
    )
    toks = tokens()
    (lg, ig), (le, ie) = step(toks), model(toks, return_internals=True, token_bits=token_bits)
    np.testing.assert_allclose(lg.numpy(), le.numpy(), atol=1e-5)
    np.testing.assert_array_equal(ig["bits"][1].numpy(), ie["bits"][1].numpy())


# -- config, limits, size ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trip(arch):
    model = shared(arch)
    clone = type(model).from_config(model.get_config())
    assert clone.config == model.config and clone.name == model.name
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert type(again) is MODELS[arch] and again.config == model.config
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(tokens()).numpy(), model(tokens()).numpy())


@pytest.mark.parametrize("arch", ARCHS)
def test_too_long_raises_one_line(arch):
    model = shared(arch)
    with pytest.raises(ValueError) as err:
        model(tf.zeros((1, 13), tf.int32))
    assert str(err.value) == (
        "sequence length 13 exceeds model.max_positions 12; "
        "shorten the input or raise max_positions"
    )
    model(tf.zeros((1, 12), tf.int32))  # exactly max_positions is fine


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="llama", kv_heads=2, **TINY),
        ModelConfig(arch="llama", tie_embeddings=True, **TINY),
        ModelConfig(arch="gpt2", **TINY),
        ModelConfig(arch="gpt2", tie_embeddings=True, **TINY),
    ],
    ids=["llama-gqa", "llama-tied", "gpt2", "gpt2-tied"],
)
def test_param_count(cfg):
    assert model_for(cfg).count_params() == param_count(cfg)


def test_param_count_reference_sizes():
    # EdgeQAT's LLaMA-58M (METHOD.md section 6), untied embeddings, with the analytic formula
    cfg = ModelConfig(vocab_size=16000, hidden=512, layers=16, heads=8, ffn=1024, max_positions=256)
    assert param_count(cfg) == 2 * 16000 * 512 + 16 * (4 * 512**2 + 3 * 512 * 1024 + 2 * 512) + 512
    assert 55e6 < param_count(cfg) < 60e6
