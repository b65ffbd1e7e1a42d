"""QAT: recipes, quantize_model slots, 16-bit parity, RTN calibration, token-adaptive bits, the QAT
loss going down, save/load of a student, size accounting, report atomicity, QATConfig errors."""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfqat.config import ConfigError, ModelConfig, QATLossConfig, load_config  # noqa: E402
from tfqat.models import build_model, param_count  # noqa: E402
from tfqat.quant import ActQuantizer, WeightQuantizer, select_token_bits  # noqa: E402
from tfqat.qat_stage import load_student  # noqa: E402
from tfqat.quant.qat import (  # noqa: E402
    ACT_SLOTS, calibrate, model_size_bytes, qat_loss, quantize_model, quantizers,
)
from tfqat.quant.recipes import RECIPES, RecipeError, get_recipe  # noqa: E402

CFG = ModelConfig(arch="llama", vocab_size=48, hidden=32, layers=2, heads=4, kv_heads=2, ffn=48,
                  max_positions=24)
GPT2 = ModelConfig(arch="gpt2", vocab_size=48, hidden=32, layers=2, heads=4, ffn=48, max_positions=24)
FULL16 = {"name": "w16a16", "w_bits": 16, "a_bits": 16, "kv_bits": 16, "probs_bits": 16}


@functools.lru_cache(maxsize=None)
def teacher(arch="llama"):
    keras.utils.set_random_seed(0)
    return build_model(CFG if arch == "llama" else GPT2, name="teacher")


def batch(b=4, t=16, seed=0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.integers(0, CFG.vocab_size, (b, t)), tf.int32),
            tf.constant(rng.integers(0, CFG.vocab_size, (b, t)), tf.int32))


# -- recipes ---------------------------------------------------------------------------------


def test_named_recipes_and_kv_bits():
    assert {"w8a8", "w4a8", "w4a4", "w4a4-8", "w4a16", "w6a6"} <= set(RECIPES)
    assert [get_recipe(n).kv_bits for n in ("w8a8", "w4a8", "w4a4", "w4a4-8", "w6a6", "w4a16")] == \
        [8, 8, 4, 8, 6, None]
    r = get_recipe("w4a4-8")
    assert r.adaptive and r.rho == 0.5 and r.low_bits == 4 and r.act_bits_mean == 6.0
    assert r.with_rho(0.25).rho == 0.25 and r.with_rho(0.25).name == "w4a4-8-rho0.25"


def test_custom_recipes_from_dict_and_yaml(tmp_path):
    r = get_recipe({"base": "w4a8", "name": "w3a8", "w_bits": 3})
    assert (r.w_bits, r.a_bits, r.kv_bits) == (3, 8, 8)
    path = tmp_path / "mine.yaml"
    path.write_text("w_bits: 5\na_bits: 8\nkv_bits: 8\n")
    r = get_recipe(str(path))
    assert (r.name, r.w_bits) == ("mine", 5)


@pytest.mark.parametrize("spec, words", [
    ("w3a3", ["unknown recipe 'w3a3'", "w8a8"]),
    ({"name": "x", "w_bits": 9}, ["w_bits=9", "2..8"]),
    ({"name": "x", "a_bits": 4.0}, ["a_bits=4.0"]),
    ({"name": "x", "wbits": 4}, ["unknown key 'wbits'", "w_bits"]),
    ({"name": "x", "adaptive": True, "a_bits": 8, "kv_bits": 4}, ["kv_bits == a_bits"]),
    ({"name": "x", "adaptive": True, "a_bits": 4, "kv_bits": 4}, ["low_bits < a_bits"]),
    ("missing.yaml", ["does not exist"]),
])
def test_recipe_errors_are_one_line(spec, words):
    with pytest.raises(RecipeError) as e:
        get_recipe(spec)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_quantize_model_rejects_bad_recipe():
    with pytest.raises(RecipeError, match="unknown recipe"):
        quantize_model(teacher(), "w4a2")


# -- quantize_model ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_slot_gets_its_quantizer(name):
    recipe = get_recipe(name)
    t = teacher()
    student = quantize_model(t, name)
    assert t.blocks[0].attn.q_proj.weight_quantizer is None  # the teacher is untouched
    assert len(student.weights) > len(t.weights)
    for block in student.blocks:
        for lin in block.linears().values():
            assert isinstance(lin.weight_quantizer, WeightQuantizer)
            assert lin.weight_quantizer.spec.bits == recipe.w_bits
        for point_name, point in block.quant_points().items():
            o_in = min(8, recipe.a_bits) if "o_in" in recipe.dynamic else None
            bits = {"act": recipe.a_bits, "kv": recipe.kv_bits, "probs": recipe.probs_bits,
                    "o_in": o_in}[ACT_SLOTS[point_name]]
            if bits is None:
                assert point.quantizer is None
                continue
            q = point.quantizer
            assert isinstance(q, ActQuantizer) and q.spec.bits == bits
            assert q.spec.signed == (point_name != "probs")
            assert q.spec.adaptive == (recipe.adaptive and point_name not in ("probs", "o_in"))
            want = ("tensor" if point_name not in recipe.dynamic else "row" if point_name == "probs" else "token")
            assert q.spec.granularity == want
    assert (student.token_bits is not None) == recipe.adaptive


def test_gpt2_slots_too():
    student = quantize_model(teacher("gpt2"), "w4a8")
    assert len(quantizers(student)) == 2 * (6 + 7)  # 6 projections + 7 points per block


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_16_bit_student_matches_fp(arch):
    t = teacher(arch)
    x, _ = batch()
    student = quantize_model(t, FULL16)
    calibrate(student, [x])
    ref = t(x).numpy()
    got = student(x).numpy()
    # Each 16-bit quantizer errs by <= scale / 2 = max|x| / 65534 (quantizer test); a few
    # dozen of them in sequence stay within 1e-3 of the logits' range.
    np.testing.assert_allclose(got, ref, atol=1e-3 * np.abs(ref).max())
    assert not np.array_equal(got, ref)  # the quantizers did act


def test_rtn_calibration_initialises_every_scale_and_orders_errors():
    t = teacher()
    x, _ = batch()
    ref = t(x).numpy()
    errs = {}
    for name in ("w8a8", "w4a8", "w4a4"):
        student = quantize_model(t, name)
        calibrate(student, [x[:2], x[2:]])
        assert all(bool(q.initialized.numpy()) for q in quantizers(student).values())
        errs[name] = float(np.abs(student(x, token_bits=student.token_bits).numpy() - ref).mean())
    assert errs["w8a8"] < errs["w4a8"] < errs["w4a4"], errs
    assert errs["w8a8"] < 0.05 * np.abs(ref).mean(), errs


# -- token-adaptive bits ------------------------------------------------------------------------


def test_token_selection_on_crafted_attention_map():
    # (B=1, H=2, T=6, S=6) causal softmax rows with crafted attention to token 0.
    to_first = np.array([[1.0, 0.1, 0.7, 0.2, 0.6, 0.05], [1.0, 0.3, 0.4, 0.1, 0.5, 0.05]])
    probs = np.zeros((1, 2, 6, 6), np.float32)
    for h in range(2):
        for i in range(6):
            probs[0, h, i, 0] = to_first[h, i]
            if i:
                probs[0, h, i, 1:i + 1] = (1 - to_first[h, i]) / i
    importance = tf.reduce_sum(probs[:, :, :, 0], axis=1)  # as Attention computes it
    np.testing.assert_allclose(importance.numpy()[0], [2.0, 0.4, 1.1, 0.3, 1.1, 0.1], rtol=1e-6)
    bits = select_token_bits(importance, 0.5).numpy()[0]
    assert bits.tolist() == [8, 4, 8, 4, 8, 4]  # top 3; the tie at 1.1 keeps both
    assert select_token_bits(importance, 0.25).numpy()[0].tolist() == [8, 4, 8, 4, 4, 4]  # lower index wins


def test_token_adaptive_student_end_to_end():
    t = teacher()
    x, _ = batch(b=2, t=12)
    student = quantize_model(t, get_recipe("w4a4-8").with_rho(0.25))
    calibrate(student, [x])
    _, inner = student(x, return_internals=True, token_bits=student.token_bits)
    for layer in range(CFG.layers):
        bits = inner["bits"][layer].numpy()
        expect = select_token_bits(inner["importance"][layer], 0.25).numpy()
        np.testing.assert_array_equal(bits, expect)
        assert ((bits == 8).sum(axis=1) == 3).all()  # round(0.25 * 12) per sequence
    # separate learnable scales per bit width, both initialised from their own tokens
    v = student.blocks[1].attn.v.quantizer
    assert float(v.scale_low.numpy()) > float(v.scale.numpy()) > 0
    # the bits matter: all-8-bit tokens give a different (closer-to-FP) output
    all8 = student(x, token_bits=lambda imp: tf.fill(tf.shape(imp), 8)).numpy()
    mixed = student(x, token_bits=student.token_bits).numpy()
    ref = t(x).numpy()
    assert np.abs(all8 - ref).mean() < np.abs(mixed - ref).mean()


# -- QAT loss and steps -------------------------------------------------------------------------


def test_a_few_qat_steps_lower_the_loss():
    losses = QATLossConfig()
    t = teacher()
    x, y = batch(seed=1)
    student = quantize_model(t, "w4a4-8")
    calibrate(student, [x])
    fn = qat_loss(student, t, losses)
    opt = keras.optimizers.Adam(3e-3)
    variables = student.trainable_variables

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss, metrics = fn(x, y, True)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, metrics

    first, metrics = step()
    assert set(metrics) == {"distill", "ce"} | ({"entropy"} if losses.entropy else set()) \
        | ({"distribution"} if losses.distribution else set())
    for _ in range(5):
        loss, _ = step()
    assert np.isfinite(float(loss)) and float(loss) < float(first)
    assert not t.trainable and all(v.trainable is False or v not in variables for v in t.weights)


def test_two_teachers_are_averaged():
    t = teacher()
    x, y = batch()
    student = quantize_model(t, "w8a8")
    calibrate(student, [x])
    one = qat_loss(student, [t], QATLossConfig(entropy=0, distribution=0))(x, y, False)[0]
    two = qat_loss(student, [t, t], QATLossConfig(entropy=0, distribution=0))(x, y, False)[0]
    np.testing.assert_allclose(float(one), float(two), rtol=1e-6)
    # the ablation forms run too: reference entropy, the paper's sign of the distribution loss
    loss, m = qat_loss(student, t, QATLossConfig(entropy_form="reference", distribution_form="paper"))(x, y, True)
    assert np.isfinite(float(loss)) and set(m) == {"distill", "ce", "entropy", "distribution"}


def test_student_save_and_load_student(tmp_path):
    t = teacher()
    x, _ = batch()
    student = quantize_model(t, "w4a4-8")
    calibrate(student, [x])
    student.save_weights(str(tmp_path / "student.weights.h5"))
    (tmp_path / "recipe.json").write_text(json.dumps(student.recipe.to_dict()))
    cfg = load_config("tiny").model_copy(update={"model": CFG})
    loaded = load_student(cfg, tmp_path)
    assert loaded.recipe == student.recipe
    np.testing.assert_array_equal(loaded(x, token_bits=loaded.token_bits).numpy(),
                                  student(x, token_bits=student.token_bits).numpy())
    with pytest.raises(FileNotFoundError, match="no trained student"):
        load_student(cfg, tmp_path / "nothing")


def test_model_size_bytes():
    fp = model_size_bytes(CFG)["total"]
    assert fp == 4 * param_count(CFG)
    sizes = {n: model_size_bytes(CFG, n) for n in ("w8a8", "w4a8", "w4a4-8", "w4a16")}
    assert sizes["w4a8"]["total"] < sizes["w8a8"]["total"] < fp
    assert sizes["w4a8"]["projections"] * 2 == sizes["w8a8"]["projections"]
    proj = sum(v.numpy().size for b in teacher().blocks for v in
               [lin.kernel for lin in b.linears().values()])
    assert sizes["w8a8"]["projections"] == proj
    # adaptive points keep two scales
    assert sizes["w4a4-8"]["scales"] > sizes["w4a8"]["scales"] > sizes["w4a16"]["scales"]


# -- report atomicity ---------------------------------------------------------------------------


def test_report_files_are_written_atomically(tmp_path, monkeypatch):
    from tfqat import report

    rows = [{"method": "FP", "recipe": "fp32", "perplexity": 10.0, "blimp": 0.6, "size_mb": 1.0}]
    report.write_report(tmp_path, "t", rows, {}, {"FP": [{"step": 1, "loss": 2.0}]}, {})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {"report.md", "report.json", "loss_curves.png", "perplexity.png"} <= set(before)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would, not 0600

    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(report.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    rows2 = [dict(rows[0], perplexity=99.0)]
    with pytest.raises(OSError, match="simulated"):
        report.write_report(tmp_path, "t2", rows2, {}, {}, {})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.endswith(".png")}
    assert after == {k: v for k, v in before.items() if not k.endswith(".png")}  # old, whole, no temp


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    ({"qat.recipe": "w9a9"}, "qat.recipe"),
    ({"qat.ptq_recipes": ["w8a8", "nope"]}, "qat.ptq_recipes"),
    ({"qat.recipe": "w8a8", "qat.rho": 0.3}, "qat.rho"),
    ({"qat.rho": 1.5}, "qat.rho"),
    ({"qat.train.lr": -1}, "qat.train.lr"),
    ({"qat.losses.entropy_form": "mine"}, "qat.losses.entropy_form"),
    ({"qat.losses.gamma": 2}, "qat.losses.gamma"),
    ({"qat.stepz": 3}, "qat.stepz"),
])
def test_qat_config_errors_are_one_line(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert "\n" not in msg and "tiny.yaml" in msg and f": {key}: " in msg, msg


def test_qat_config_defaults_and_tiny():
    cfg = load_config("tiny")
    assert cfg.qat.recipe == "w4a4-8" and cfg.qat.rho == 0.5
    assert cfg.qat.losses.entropy > 0 and cfg.qat.losses.distribution > 0
    assert load_config("tiny", {"qat.train.steps": 3}).qat.train.lr == cfg.qat.train.lr
