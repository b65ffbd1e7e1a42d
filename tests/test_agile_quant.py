"""Agile-Quant post-training pieces: TRIP, fold, log2 probs, GPTQ, token pruning."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from tfqat.quant.gptq import gptq, hessian, output_error, rtn
from tfqat.agile.log2 import Log2Quantizer
from tfqat.agile.pruning import drop_counts, forward_pruned, parse_schedule, pruned_perplexity, select_keep
from tfqat.agile.trip import K_MAX, TripQuantizer, best_factors, candidate_ratios, fold_student, search_trip
from tfqat.config import ModelConfig
from tfqat.models import build_model
from tfqat.quant.quantizers import qrange


def _tiny_model(seed=0):
    tf.random.set_seed(seed)
    return build_model(ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64))


def test_trip_factors_match_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)) * np.array([0.1, 1.0, 4.0, 20.0])  # channels with outliers
    s, k = search_trip(x, bits=8)
    qmin, qmax = qrange(8, True)

    def err(s, ks):
        step = s * 2.0 ** np.asarray(ks)
        return ((np.clip(np.round(x / step), qmin, qmax) * step - x) ** 2).sum()

    peak = np.abs(x).max()
    best = min((err(float(np.float32(peak * r / (2 ** K_MAX * qmax))), ks), float(np.float32(peak * r / (2 ** K_MAX * qmax))), ks)
               for r in candidate_ratios() for ks in itertools.product(range(K_MAX + 1), repeat=4))
    assert np.isclose(err(s, k), best[0], rtol=1e-12)
    assert s == pytest.approx(best[1]) and tuple(k) == best[2]
    assert k[3] > k[0]  # the outlier channel takes the larger factor
    kk, _ = best_factors(x, s)
    np.testing.assert_array_equal(kk, k)


def test_trip_quantizer_matches_numpy():
    x = np.random.default_rng(1).normal(size=(2, 8, 6)).astype(np.float32) * np.array([1, 1, 1, 1, 8, 30], np.float32)
    q = TripQuantizer(8)
    q.initialize(x)
    step = float(q.scale.numpy()) * 2.0 ** q.k.numpy()
    np.testing.assert_allclose(q(tf.constant(x)).numpy(), np.clip(np.round(x / step), -128, 127) * step, rtol=1e-6)


def test_fold_leaves_float_and_quantized_output_unchanged():
    model = _tiny_model()
    x = np.random.default_rng(2).integers(0, 64, (2, 12)).astype(np.int32)
    ref = model(x).numpy()
    # float: fold arbitrary factors into norms / up_proj and the next rows, no quantizer
    from tfqat.agile.trip import fold_trip

    rng = np.random.default_rng(3)
    for block in model.blocks:
        fold_trip(block, "attn_in", rng.integers(0, 4, 32))
        fold_trip(block, "mlp_in", rng.integers(0, 4, 32))
        fold_trip(block, "mlp_act", rng.integers(0, 4, 64))
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-5)
    # quantized: a TRIP student folded into per-tensor quantizers computes the same logits
    from tfqat.agile.build import agile_student

    st = agile_student(_tiny_model(), [x], "rtn")
    before = st(x).numpy()
    assert fold_student(st) == 6
    np.testing.assert_allclose(st(x).numpy(), before, atol=1e-5)


def test_log2_quantizer_values():
    p = tf.constant([1.0, 0.5, 0.3, 0.25, 0.7, 2.0 ** -14, 2.0 ** -15, 1e-9, 0.0])
    q = Log2Quantizer(4)
    np.testing.assert_array_equal(q.codes(p), [0, 1, 2, 2, 1, 14, 15, 15, 15])
    np.testing.assert_allclose(q(p).numpy(), [1, 0.5, 0.25, 0.25, 0.5, 2.0 ** -14, 0, 0, 0])
    # 0.3: -log2 = 1.74 -> 2; 0.7: 0.51 -> 1 (log-domain rounding)


def test_gptq_beats_rtn_on_output_error():
    rng = np.random.default_rng(4)
    n, d_in, d_out = 2048, 256, 64
    # correlated inputs with a few large channels: where error compensation pays
    x = rng.normal(size=(n, 32)) @ rng.normal(size=(32, d_in)) + 0.1 * rng.normal(size=(n, d_in))
    x[:, :4] *= 10
    w = rng.normal(size=(d_in, d_out)).astype(np.float32) * 0.05
    w_rtn = rtn(w, 4, 128)
    w_gptq, g_idx = gptq(w, hessian(x), 4, 128, act_order=True)
    assert output_error(x, w, w_gptq) < 0.7 * output_error(x, w, w_rtn)
    assert sorted(np.bincount(g_idx)) == [128, 128]
    # every group of every column holds 4-bit values on a per-(row, group) grid
    for g in range(2):
        cols = w_gptq[g_idx == g]  # (128, out)
        for o in range(d_out):
            assert len(np.unique(np.round(cols[:, o], 7))) <= 16  # at most 2^4 levels


def test_pruning_keeps_the_right_tokens():
    imp = tf.constant([[5.0, 0.1, 0.9, 0.2, 0.8, 0.05, 0.3, 1.0]])
    prunable = np.array([[False, True, True, True, True, False, False, False]])  # last 3 scored
    keep = select_keep(imp, prunable, 2).numpy()
    np.testing.assert_array_equal(keep, [[0, 2, 4, 5, 6, 7]])  # 1 (0.1) and 3 (0.2) go; 5 is kept though lowest
    assert drop_counts([0.25, 0.25, 0], 6) == [1, 2, 0]
    assert parse_schedule("progressive:0.5", 3) == [0.25, 0.25, 0.0]
    with pytest.raises(ValueError):
        parse_schedule("0.2,0.2,0.2", 3)


def test_pruned_forward_and_perplexity_consistent():
    model = _tiny_model()
    ids = np.random.default_rng(5).integers(0, 64, 200).astype(np.int32)
    x = ids[None, :16]
    logits, pos, counts = forward_pruned(model, x, np.zeros((1, 16), bool), [0, 0])
    np.testing.assert_allclose(logits.numpy(), model(x).numpy(), atol=1e-5)
    # crafted: after layer 0 only the 4 least important prunable tokens go, positions kept
    _, inner = model(x, return_internals=True)
    imp = inner["importance"][0].numpy()[0]
    prunable = np.zeros((1, 16), bool)
    prunable[0, 1:8] = True
    _, pos, counts = forward_pruned(model, x, prunable, [4, 0])
    dropped = set(range(16)) - set(pos.numpy()[0].tolist())
    assert dropped == set((np.argsort(imp[1:8]) + 1)[:4].tolist()) and counts == [16, 12]
    _, pos, _ = forward_pruned(model, x, prunable, [4, 0], order="most")  # control: the opposite tokens
    assert set(range(16)) - set(pos.numpy()[0].tolist()) == set((np.argsort(imp[1:8]) + 1)[-4:].tolist())
    _, pos, _ = forward_pruned(model, x, prunable, [4, 0], order="random")
    assert pos.shape[1] == 12 and 0 in pos.numpy()[0]
    from tfqat.evaluate import keras_logprob_fn, perplexity

    ref = perplexity(keras_logprob_fn(model), ids, 16, batch_size=4, progress=False)["perplexity"]
    got = pruned_perplexity(model, ids, 16, [0.0, 0.0], batch_size=4)
    assert got["perplexity"] == pytest.approx(ref, rel=1e-5)
    pr = pruned_perplexity(model, ids, 16, [0.5, 0.0], batch_size=4)
    assert pr["tokens"] == got["tokens"] and pr["mean_tokens_per_layer"][1] < 16


def _ops_lib():
    import os
    from pathlib import Path

    for cand in (os.environ.get("TFQAT_OPS_LIB"), Path(__file__).resolve().parents[1] / "tfqat" / "_lib" / "libtfqat_ops.so",
                 Path(__file__).resolve().parents[1] / "build" / "delegate-host" / "libtfqat_ops.so"):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.skip("no libtfqat_ops.so built (pip install -e .)")


def test_pruned_export_prefill_and_decode_match_keras(tmp_path):
    """The exported pruned prefill == forward_pruned (same kept tokens, positions, logits within the
    export's 1e-4 bound), and decode after it (rows at kv_len, RoPE at the true position) ==
    the Keras pruned forward of prompt + continuation (only prompt tokens prunable)."""
    from tfqat.agile.prune_export import PrunedLiteModel
    from tfqat.config import ModelConfig
    from tfqat.export import ExportError, export_models
    from tfqat.quant.qat import calibrate, quantize_model

    lib = _ops_lib()
    tf.random.set_seed(0)
    student = quantize_model(build_model(ModelConfig(vocab_size=64, hidden=32, layers=3, heads=4, kv_heads=2,
                                                     ffn=48, max_positions=64)), "w4a8")
    rng = np.random.default_rng(0)
    calibrate(student, [rng.integers(0, 64, (4, 32)).astype(np.int32)])
    with pytest.raises(ExportError, match="prune schedule") as e:
        export_models(student, None, tmp_path / "bad", prune="0.6,0.6,0")
    assert "\n" not in str(e.value)
    res = export_models(student, None, tmp_path, prune="0.3,0.3")
    assert res["manifest_data"]["prune"]["ratios"] == [0.3, 0.3, 0.0]
    ops = res["manifest_data"]["files"]["model"]["signatures"]["prefill"]["ops"]
    assert ops["TOPK_V2"] == 2 and ops["WHERE"] == 2 and "SORT" not in ops
    m = PrunedLiteModel(res["model"], lib=lib)
    x = rng.integers(0, 64, 30).astype(np.int32)
    drops = drop_counts([0.3, 0.3, 0.0], 28)
    prunable = np.zeros((1, 30), bool)
    prunable[0, 1:-1] = True
    got = m.prefill(x)
    want, pos, counts = forward_pruned(student, x[None], prunable, drops)
    assert m.kv_len.tolist() == counts == [30, 22, 14]
    np.testing.assert_array_equal(m.logit_positions, pos.numpy()[0])
    assert m.logit_positions[0] == 0 and m.logit_positions[-1] == 29
    assert np.abs(got - want.numpy()[0]).max() <= 1e-4
    cont = rng.integers(0, 64, 4).astype(np.int32)
    steps = np.stack([m.decode(int(t)) for t in cont])
    prunable = np.zeros((1, 34), bool)
    prunable[0, 1:29] = True
    full, _, _ = forward_pruned(student, np.concatenate([x, cont])[None], prunable, drops)
    assert np.abs(steps - full.numpy()[0][-4:]).max() <= 1e-4
    assert m.kv_len.tolist() == [34, 26, 18]


def test_channel_gptq_codes_in_original_order():
    """group_size None: one scale per output channel of the folded kernel, act-order allowed;
    float32(codes) * scale == kernel_hat * 2^k exactly."""
    from tfqat.agile.build import channel_quantize

    rng = np.random.default_rng(6)
    x = rng.normal(size=(512, 48)) * np.r_[np.ones(44), [8, 8, 16, 30]]
    w = rng.normal(size=(48, 16)).astype(np.float32) * 0.05
    f = 2.0 ** rng.integers(0, 4, 48)
    k_hat, s = channel_quantize(w, x, f, "gptq", 4, act_order=True)
    folded = k_hat * f.astype(np.float32)[:, None]
    codes = np.round(folded / s[None, :])
    np.testing.assert_allclose(folded / s[None, :], codes, atol=1e-5)
    assert codes.max() <= 7 and codes.min() >= -8
    np.testing.assert_array_equal(np.round(codes).astype(np.float32) * s[None, :], folded)
    # GPTQ's error compensation beats per-channel RTN on the same folded grid
    k_rtn, _ = channel_quantize(w, x, f, "rtn", 4)
    assert output_error(x, w, k_hat) < output_error(x, w, k_rtn)


def test_agile_channel_student_exports_with_parity(tmp_path):
    """Agile per-channel student (TRIP, per-channel GPTQ, linear 8-bit probs): folding keeps the
    Keras logits, and the TFLite export (int4 packed QLINEARs, per-tensor activation scales) matches
    the folded student within the export's 1e-4 bound (tests/test_export.py)."""
    from tfqat.agile.build import agile_student
    from tfqat.agile.exportable import export_agile, fold_for_export
    from tfqat.runtime import LiteModel

    lib = _ops_lib()
    tf.random.set_seed(0)
    teacher = build_model(ModelConfig(vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
                                      max_positions=64))
    rng = np.random.default_rng(7)
    calib = [rng.integers(0, 64, (4, 32)).astype(np.int32)]
    st = agile_student(teacher, calib, "gptq", group_size=None, log2_probs=False)
    assert any(q.k.numpy().max() > 0 for b in st.blocks for q in
               (b.quant_points()[p].quantizer for p in ("attn_in", "mlp_in", "mlp_act")))
    x = rng.integers(0, 64, (2, 24)).astype(np.int32)
    before = st(x).numpy()
    g128 = agile_student(teacher, calib, "rtn")  # the default row stays unexportable
    with pytest.raises(ValueError, match="per-channel"):
        fold_for_export(g128)
    res = export_agile(st, None, tmp_path)
    assert st.agile_exportable == {"points_folded": 6, "linears": 14}
    np.testing.assert_allclose(st(x).numpy(), before, atol=1e-5)  # folded == unfolded
    q = res["manifest_data"]["files"]["model"]
    assert q["ops"]["TFQAT_QLINEAR"] > 0 and res["manifest_data"]["agile"]["group_size"] is None
    from pathlib import Path

    from tfqat.export import inspect_tflite

    info = inspect_tflite(Path(res["model"]).read_bytes())
    assert info["qlinear"] and all(l["attrs"]["w_bits"] == 4 and l["w_type"] == "uint8" for l in info["qlinear"])
    m = LiteModel(res["model"], lib=lib)
    tokens = x[0]
    got = m.prefill(tokens[:20])
    want = st(tokens[None]).numpy()[0]
    assert np.abs(got - want[:20]).max() <= 1e-4
    steps = np.stack([m.decode(int(t)) for t in tokens[20:]])
    assert np.abs(steps - want[20:]).max() <= 1e-4
