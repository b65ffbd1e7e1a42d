"""Rotations folded into the float model (tfqat.quant.rotate): same function, flatter activations."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfqat.config import ModelConfig
from tfqat.models import build_model
from tfqat.quant.rotate import hadamard, rotate_model, rotation_matrix

LLAMA = ModelConfig(arch="llama", vocab_size=48, hidden=96, layers=2, heads=4, kv_heads=2, ffn=80,
                    max_positions=24)


def _model(cfg, tied=True):
    keras.utils.set_random_seed(0)
    m = build_model(cfg.model_copy(update={"tie_embeddings": tied}), name="teacher")
    rng = np.random.default_rng(0)
    for block in m.blocks:  # a pretrained model's norms: uneven, with a few huge channels
        for norm in (block.attn_norm, block.mlp_norm):
            g = rng.uniform(0.5, 1.5, cfg.hidden)
            g[[3, 17]] = 30.0
            norm.scale.assign(g.astype(np.float32))
    m.final_norm.scale.assign(rng.uniform(0.5, 2.0, cfg.hidden).astype(np.float32))
    return m


@pytest.mark.parametrize("n", [1, 2, 64, 96, 576, 40])
def test_rotation_matrices_are_orthogonal(n):
    q = rotation_matrix(n, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    if n & (n - 1) == 0:
        h = hadamard(n)
        np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
        assert np.allclose(np.abs(h), 1 / np.sqrt(n))  # every output mixes every input equally
    with pytest.raises(ValueError, match="not a power of two"):
        hadamard(12)


@pytest.mark.parametrize("tied", [True, False])
def test_rotated_model_computes_the_same_function(tied):
    m = _model(LLAMA, tied)
    r = rotate_model(m, seed=1)
    assert r.lm_head is not None and not r.config.tie_embeddings
    x = tf.constant(np.random.default_rng(1).integers(0, 48, (3, 20)), tf.int32)
    a, b = m(x).numpy().astype(np.float64), r(x).numpy().astype(np.float64)
    np.testing.assert_allclose(b, a, atol=2e-4 * np.abs(a).max())
    for blk in r.blocks:  # the norms' scales moved into the projections
        np.testing.assert_array_equal(blk.attn_norm.scale.numpy(), 1.0)


def test_rotation_spreads_an_outlier_channel():
    m = _model(LLAMA)
    r = rotate_model(m, seed=1)
    x = tf.constant(np.random.default_rng(1).integers(0, 48, (3, 20)), tf.int32)

    def peak_to_rms(model):  # q/k/v's input in block 1, what a per-token scale sees
        blk = model.blocks[1]
        h = model.blocks[0](model.embed(x))[0]
        xn = blk.attn_norm(h).numpy().astype(np.float64)
        w = blk.attn.q_proj.kernel.numpy()  # what multiplies it: the matmul is the same function
        return np.abs(xn).max(-1) / np.sqrt((xn ** 2).mean(-1)), xn @ w

    pm, ym = peak_to_rms(m)
    pr, yr = peak_to_rms(r)
    np.testing.assert_allclose(yr, ym, atol=1e-3 * np.abs(ym).max())
    assert pr.mean() < 0.5 * pm.mean()  # 30x channels no longer set the scale


def test_rotation_refuses_layernorm_models():
    gpt2 = build_model(ModelConfig(arch="gpt2", vocab_size=48, hidden=64, layers=1, heads=4, ffn=96,
                                   max_positions=24), name="g")
    with pytest.raises(ValueError, match="rotations need RMSNorm"):
        rotate_model(gpt2)


def test_a_rotated_recipe_builds_an_untied_student_of_the_same_float_function():
    from tfqat.quant.qat import quantize_model
    from tfqat.quant.recipes import RecipeError, get_recipe
    from tfqat.quant.smooth import detached_quantizers

    m = _model(LLAMA)
    r = get_recipe({"base": "w4a8-dyn", "name": "w4a8-rot", "rotate": True})
    assert "rotate" not in get_recipe("w4a8-dyn").to_dict()  # unrotated fingerprints unchanged
    assert r.to_dict()["rotate"] is True and "rotated" in r.describe()
    student = quantize_model(m, r)
    assert student.lm_head is not None and not student.config.tie_embeddings
    x = tf.constant(np.random.default_rng(2).integers(0, 48, (2, 20)), tf.int32)
    with detached_quantizers(student):
        got = student(x).numpy()
    want = m(x).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    again = quantize_model(rotate_model(m), r)  # an already rotated model is not rotated twice
    np.testing.assert_array_equal(again.embed_tokens.embeddings.numpy(), rotate_model(m).embed_tokens.embeddings.numpy())
    with pytest.raises(RecipeError, match="rotate='yes' must be true or false"):
        get_recipe({"base": "w4a8-dyn", "rotate": "yes"})
