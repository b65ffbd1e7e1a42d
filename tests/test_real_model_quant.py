"""What a pretrained model's quantization needs, each against an independent reference: group-wise
weight scales and per-token dynamic activation scales vs numpy, the SmoothQuant fold leaving the
float model unchanged, GPTQ static groups and GPTQ as a student's weight init, the -dyn recipes
and their load-time errors."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfqat.config import ModelConfig  # noqa: E402
from tfqat.models import build_model  # noqa: E402
from tfqat.quant import ActQuantizer, WeightQuantizer  # noqa: E402
from tfqat.quant.gptq import gptq, gptq_student, hessian, output_error  # noqa: E402
from tfqat.quant.qat import calibrate, quantize_model, quantizers  # noqa: E402
from tfqat.quant.recipes import Recipe, RecipeError, get_recipe  # noqa: E402
from tfqat.quant.smooth import activation_peaks, smooth_student  # noqa: E402

LLAMA = ModelConfig(arch="llama", vocab_size=48, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96,
                    max_positions=24)
GPT2 = ModelConfig(arch="gpt2", vocab_size=48, hidden=64, layers=2, heads=4, ffn=96, max_positions=24)


def _model(cfg, seed=0, outliers=True):
    keras.utils.set_random_seed(seed)
    m = build_model(cfg, name="teacher")
    m(tf.zeros((1, 2), tf.int32))
    if outliers:  # a pretrained model's few huge channels, in the norms feeding q/k/v and gate/up
        for block in m.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                v = norm.scale if hasattr(norm, "scale") else norm.gamma
                g = np.ones(v.shape, np.float32)
                g[[3, 17]] = 40.0
                v.assign(g)
    return m


def _tokens(b=6, t=20, seed=1):
    return tf.constant(np.random.default_rng(seed).integers(0, 48, (b, t)), tf.int32)


# -- quantizers vs numpy float64 -------------------------------------------------------------------

@pytest.mark.parametrize("k,g", [(64, 32), (70, 32), (31, 32), (128, 64), (33, 32)])
def test_group_weight_quantizer_vs_numpy(k, g):
    w = np.random.default_rng(k).normal(size=(k, 5)).astype(np.float32)
    wq = WeightQuantizer(4, "group", g)
    wq(w, training=True)
    ng = -(-k // g)
    assert wq.scale.shape == (ng, 5)
    scale = np.abs(wq.scale.numpy()).astype(np.float64) * np.exp(np.random.default_rng(1).normal(0, 0.2, (ng, 5)))
    wq.scale.assign(scale.astype(np.float32))
    s = wq.scale.numpy().astype(np.float32)
    # reference: group of input i is i // g; float32 true division, half-even, clip [-8, 7]
    s_full = s[np.arange(k) // g]  # (K, N)
    codes = np.clip(np.round(w / s_full), -8, 7)
    np.testing.assert_array_equal(wq(w).numpy(), (codes * s_full).astype(np.float32))
    c, sc = wq.export(w)
    assert c.shape == (5, k) and sc.shape == (5, ng)
    np.testing.assert_array_equal(c, codes.T.astype(np.int8))
    np.testing.assert_array_equal(sc, s.T)
    # LSQ init per group: 2 mean|w_group| / sqrt(7), the last group over its own length
    fresh = WeightQuantizer(4, "group", g)
    fresh(w, training=True)
    want = np.stack([np.abs(w[j:j + g].astype(np.float64)).mean(0) for j in range(0, k, g)]) * 2 / np.sqrt(7)
    np.testing.assert_allclose(fresh.scale.numpy(), want, rtol=1e-5)


def test_group_quantizer_gradients_reach_every_group():
    w = tf.constant(np.random.default_rng(0).normal(size=(70, 3)).astype(np.float32))
    wq = WeightQuantizer(4, "group", 32)
    wq(w, training=True)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = tf.reduce_sum(wq(w, training=True) * tf.random.stateless_normal((70, 3), seed=(1, 2)))
    dw, ds = tape.gradient(y, [w, wq.scale])
    assert dw.shape == w.shape and ds.shape == (3, 3)
    assert np.all(np.abs(ds.numpy()) > 0)


@pytest.mark.parametrize("shape,axis", [((2, 5, 8), 1), ((2, 3, 5, 4), 2)])
def test_dynamic_per_token_scale_spans_heads(shape, axis):
    """One scale per token over every other axis: what TFQAT_QUANTIZE computes on [T, H*D] rows."""
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    x[0, ..., 0] *= 30.0  # an outlier channel
    aq = ActQuantizer(8, granularity="token")
    y = aq(x, token_axis=axis).numpy()
    other = tuple(a for a in range(1, len(shape)) if a != axis)
    peak = np.abs(x).max(axis=other, keepdims=True).astype(np.float32)
    s = np.where(peak > 0, peak / np.float32(127), 1).astype(np.float32)
    np.testing.assert_array_equal(y, (np.clip(np.round(x / s), -128, 127) * s).astype(np.float32))


def test_dynamic_adaptive_token_bits():
    x = np.random.default_rng(4).normal(size=(1, 4, 6)).astype(np.float32)
    bits = tf.constant([[[8], [4], [4], [8]]])
    y = ActQuantizer(8, granularity="token", adaptive=True)(x, bits=bits, token_axis=1).numpy()
    qmax = np.array([127, 7, 7, 127], np.float32)[None, :, None]
    s = (np.abs(x).max(-1, keepdims=True) / qmax).astype(np.float32)
    np.testing.assert_array_equal(y, (np.clip(np.round(x / s), -qmax - 1, qmax) * s).astype(np.float32))


# -- SmoothQuant fold ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_smooth_fold_leaves_the_float_model_unchanged(cfg):
    teacher = _model(cfg)
    x = _tokens()
    ref = teacher(x).numpy().astype(np.float64)
    student = quantize_model(teacher, Recipe("s", w_bits=8, a_bits=8, kv_bits=8, smooth=0.5))
    before = activation_peaks(student, [x])
    folded = smooth_student(student, [x], 0.5)
    assert {p for _, p in folded} == ({"attn_in", "o_in", "mlp_in", "mlp_act"} if cfg is LLAMA
                                      else {"attn_in", "o_in", "mlp_in"})
    after = activation_peaks(student, [x])
    from tfqat.quant.smooth import detached_quantizers

    with detached_quantizers(student):
        got = student(x).numpy().astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4 * np.abs(ref).max())
    # the outlier channels are flattened: the spread of per-channel peaks shrinks
    spread = lambda p: p.max() / np.median(p)  # noqa: E731
    assert spread(after[(0, "attn_in")]) < 0.5 * spread(before[(0, "attn_in")])


def test_smooth_factors_formula():
    from tfqat.quant.smooth import smooth_factors

    a = np.array([1.0, 8.0, 0.0, 2.0])
    w1 = np.array([[1.0, -4.0], [0.5, 0.5], [1.0, 1.0], [0.0, 0.0]])
    w2 = np.array([[2.0], [0.25], [3.0], [0.0]])
    s = smooth_factors(a, [w1, w2], 0.5)
    np.testing.assert_allclose(s, [np.sqrt(1.0) / np.sqrt(4.0), np.sqrt(8.0) / np.sqrt(0.5), 1.0, 1.0])


# -- GPTQ ------------------------------------------------------------------------------------------

def test_gptq_static_groups_codes_in_original_order():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 70)) * rng.uniform(0.1, 5, 70)
    k = rng.normal(size=(70, 9))
    h = hessian(x)
    k_hat, g_idx, s = gptq(k, h, 4, 32, act_order=True, return_scales=True, static_groups=True)
    assert s.shape == (9, 3)
    np.testing.assert_array_equal(g_idx, np.arange(70) // 32)
    codes = k_hat.astype(np.float64).T / s[:, g_idx]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(np.round(codes)).max() <= 8
    from tfqat.quant.gptq import rtn

    assert output_error(x, k, k_hat) < output_error(x, k, rtn(k, 4, 32))


def test_gptq_student_sets_codes_the_quantizer_reproduces():
    teacher = _model(LLAMA, outliers=False)
    x = _tokens()
    rtn_student = quantize_model(teacher, Recipe("r", w_bits=4, a_bits=8, kv_bits=8, weight_group_size=32,
                                                 dynamic=("attn_in", "mlp_in", "mlp_act")))
    calibrate(rtn_student, [x])
    g_student = quantize_model(teacher, Recipe("g", w_bits=4, a_bits=8, kv_bits=8, weight_group_size=32,
                                               dynamic=("attn_in", "mlp_in", "mlp_act"), weight_init="gptq"))
    calibrate(g_student, [x])
    for block in g_student.blocks:
        for lin in block.linears().values():
            k = lin.kernel.numpy()
            np.testing.assert_array_equal(lin.weight_quantizer(tf.constant(k)).numpy(), k)  # on its grid
    ref = teacher(x).numpy()
    err = lambda m: float(np.mean((m(x, token_bits=m.token_bits).numpy() - ref) ** 2))  # noqa: E731
    assert err(g_student) < err(rtn_student)


# -- recipes ---------------------------------------------------------------------------------------

def test_dyn_recipes():
    r = get_recipe("w4a8-dyn")
    assert r.weight_group_size == 32 and r.weight_init == "gptq" and "o_in" in r.dynamic and r.smooth == 0.5
    assert "v" not in r.dynamic
    assert get_recipe({"base": "w4a8-dyn", "dynamic": ["q", "k"]}).dynamic == ("q", "k")
    st = quantize_model(_model(LLAMA, outliers=False), "w4a4-8-dyn")
    qs = quantizers(st)
    assert qs["block_0/o_in"].spec.granularity == "token" and not qs["block_0/o_in"].spec.adaptive
    assert qs["block_0/v"].spec.granularity == "tensor"
    assert qs["block_0/q"].spec.granularity == "token" and qs["block_0/q"].spec.adaptive
    assert qs["block_0/q_proj"].spec.group_size == 32
    assert qs["block_0/probs"].spec.granularity == "row" and not qs["block_0/probs"].spec.signed


@pytest.mark.parametrize("spec,words", [
    ({"base": "w4a8", "dynamic": ["v"]}, "V cannot be dynamic"),
    ({"base": "w4a8", "dynamic": ["mlp_out"]}, "dynamic point 'mlp_out' is not supported"),
    ({"base": "w4a8", "weight_group_size": 48}, "multiple of 32"),
    ({"base": "w4a8", "smooth": 1.5}, "SmoothQuant alpha"),
    ({"base": "w4a8", "weight_init": "awq"}, "weight_init='awq' is unknown"),
    ({"base": "w4a8-dyn", "act_asymmetric": True}, "symmetric"),
])
def test_recipe_refuses_what_the_kernels_cannot_do(spec, words):
    with pytest.raises(RecipeError, match=words) as e:
        get_recipe(spec)
    assert "\n" not in str(e.value)


# -- block-wise reconstruction ---------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["w4a8-dyn", "w4a4-8-dyn"])
def test_blockwise_reconstruction_lowers_each_block_loss_and_resumes(recipe, tmp_path):
    from tfqat.blockwise import reconstruct

    teacher = _model(LLAMA)
    x = _tokens(8, 20)
    student = quantize_model(teacher, recipe)
    calibrate(student, [x])
    before = float(np.mean((student(x, token_bits=student.token_bits).numpy() - teacher(x).numpy()) ** 2))
    saved = []
    state = reconstruct(student, teacher, x.numpy(), tmp_path, steps_per_block=25, batch_size=4, lr=1e-4,
                        scale_lr=1e-5, progress=False, save=lambda m: saved.append(m.get_weights()))
    assert state["done"] == LLAMA.layers and len(saved) == LLAMA.layers
    for b in state["blocks"]:
        assert b["loss_after"] < b["loss_before"]
    after = float(np.mean((student(x, token_bits=student.token_bits).numpy() - teacher(x).numpy()) ** 2))
    assert after < before
    # resume after block 0: a fresh student loaded with the block-0 save continues at block 1 only
    (tmp_path / "progress.json").write_text(
        __import__("json").dumps({"done": 1, "blocks": state["blocks"][:1]}))
    resumed = quantize_model(teacher, recipe)
    resumed.set_weights(saved[0])
    state2 = reconstruct(resumed, teacher, x.numpy(), tmp_path, steps_per_block=25, batch_size=4, lr=1e-4,
                         scale_lr=1e-5, progress=False)
    assert [b["block"] for b in state2["blocks"]] == [0, 1]
    w0 = [v.numpy() for v in resumed.blocks[0].trainable_variables]
    s0 = quantize_model(teacher, recipe)
    s0.set_weights(saved[0])
    for a, b in zip(w0, [v.numpy() for v in s0.blocks[0].trainable_variables]):
        np.testing.assert_array_equal(a, b)  # block 0 untouched by the resumed run


def test_blockwise_next_objective_is_the_error_through_the_teachers_next_norms(tmp_path):
    """loss="next" measures a block's error as the next norms see it (numpy float64 reference), so a
    massive channel the RMSNorm divides away does not dominate; it trains like "mse"; a bad name is
    one line."""
    from tfqat.blockwise import _distance, reconstruct

    teacher = _model(LLAMA)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 5, 64)).astype(np.float32)
    b = a + 0.1 * rng.normal(size=a.shape).astype(np.float32)
    a[..., 7] += 300.0  # a massive channel, identical in both: plain MSE is blind to it,
    b[..., 7] += 303.0  # but it shifts the RMS every other channel is divided by

    def rms_norm(x, scale, eps):
        x = x.astype(np.float64)
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale.astype(np.float64)

    def ref(bi):
        views = ([teacher.blocks[bi + 1].attn_norm, teacher.blocks[bi + 1].mlp_norm]
                 if bi + 1 < LLAMA.layers else [teacher.final_norm])
        return sum(((rms_norm(a, v.scale.numpy(), v.eps) - rms_norm(b, v.scale.numpy(), v.eps)) ** 2).mean()
                   for v in views)

    for bi in range(LLAMA.layers):
        got = float(_distance(teacher, bi, "next")(tf.constant(a), tf.constant(b)))
        np.testing.assert_allclose(got, ref(bi), rtol=1e-4)
    mse = float(_distance(teacher, 0, "mse")(tf.constant(a), tf.constant(b)))
    np.testing.assert_allclose(mse, ((a.astype(np.float64) - b) ** 2).mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="use 'mse' or 'next'"):
        _distance(teacher, 0, "l1")
    x = _tokens(8, 20)
    student = quantize_model(teacher, "w4a8-dyn")
    calibrate(student, [x])
    state = reconstruct(student, teacher, x.numpy(), tmp_path, steps_per_block=25, batch_size=4, lr=1e-3,
                        scale_lr=1e-4, progress=False, loss="next")
    assert all(b["loss_after"] < b["loss_before"] for b in state["blocks"])


def test_blimp_interval_and_report_table():
    from tfqat.report import blimp_interval, results_table

    lo, hi = blimp_interval(0.78, 6700)
    assert lo < 0.78 < hi and abs((hi - lo) / 2 - 1.96 * np.sqrt(0.78 * 0.22 / 6700)) < 1e-3
    lo1, hi1 = blimp_interval(1.0, 10)  # Wilson stays inside [0, 1] where the normal interval would not
    assert 0.6 < lo1 < 0.75 and hi1 <= 1.0 + 1e-12
    table = results_table([{"method": "FP", "perplexity": 27.4, "blimp": 0.78, "blimp_pairs": 6700},
                           {"method": "PTQ", "recipe": "w8a8-dyn", "perplexity": 27.6, "blimp": 0.775,
                            "blimp_pairs": 6700}])
    assert "78.0 (77.0-79.0)" in table and "chance level: 50.0%" in table and "| 1.007 |" in table
