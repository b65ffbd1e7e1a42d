"""Losses and token bit selection vs float64 numpy references."""

import numpy as np
import pytest
import tensorflow as tf

from tfqat.quant import (
    decode_rule_token_bits,
    distillation_loss,
    distribution_loss,
    entropy_loss,
    prefill_threshold,
    select_token_bits,
    threshold_token_bits,
)


def rng(seed=0):
    return np.random.default_rng(seed)


def f32(xs):
    return [tf.constant(x, tf.float32) for x in xs]


# ---- token bits -----------------------------------------------------------------------------


def ref_select(imp, rho):
    """The kernel's select_bits_topk per row: n8 in double from float32 rho, ties -> lower index,
    NaN lowest."""
    imp = np.asarray(imp, np.float64)
    t = imp.shape[-1]
    n8 = int(min(max(np.floor(np.float64(np.float32(rho)) * t + 0.5), 0), t))
    out = np.full(imp.shape, 4, np.int32)
    for b, row in enumerate(imp):
        key = sorted(range(t), key=lambda i: (np.isnan(row[i]), -np.nan_to_num(row[i], nan=0.0), i))
        out[b, key[:n8]] = 8
    return out


TIES = np.array(
    [
        [0.1, 0.5, 0.5, 0.2, 0.5, 0.0, 0.3, 0.3],
        [0.9, 0.1, 0.1, 0.1, 0.1, 0.8, np.nan, 0.1],
        [0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
    ],
    np.float32,
)


@pytest.mark.parametrize("rho", [0.0, 0.0625, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0])
def test_select_token_bits_ties_and_rho(rho):
    got = select_token_bits(tf.constant(TIES), rho).numpy()
    np.testing.assert_array_equal(got, ref_select(TIES, rho))
    n8 = int(np.floor(np.float64(np.float32(rho)) * 8 + 0.5))
    assert ((got == 8).sum(-1) == n8).all()


def test_select_is_per_sequence_and_tie_breaks_low_index():
    got = select_token_bits(tf.constant(TIES), 0.25).numpy()  # n8 = 2
    np.testing.assert_array_equal(got[0], [4, 8, 8, 4, 4, 4, 4, 4])  # third 0.5 at index 4 loses
    np.testing.assert_array_equal(got[1], [8, 4, 4, 4, 4, 8, 4, 4])
    np.testing.assert_array_equal(got[2], [8, 8, 4, 4, 4, 4, 4, 4])


def test_n8_rounds_half_up():
    imp = tf.constant(rng(1).random((1, 5)).astype(np.float32))
    assert (select_token_bits(imp, 0.5).numpy() == 8).sum() == 3  # floor(2.5 + 0.5)
    assert (select_token_bits(imp, 0.1).numpy() == 8).sum() == 1  # floor(0.5 + 0.5)
    assert (select_token_bits(imp, float("nan")).numpy() == 4).all()  # kernel: NaN rho -> 0


def test_dynamic_t_under_tf_function():
    fn = tf.function(
        lambda imp, rho: select_token_bits(imp, rho),
        input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.float32)],
    )
    for t in (1, 7, 16):
        imp = rng(t).random((3, t)).astype(np.float32)
        np.testing.assert_array_equal(fn(imp, 0.5).numpy(), ref_select(imp, 0.5))


def test_threshold_rules():
    imp = rng(2).random((4, 12)).astype(np.float32)  # no ties
    for rho in (0.0, 0.25, 0.5, 1.0):
        thr = prefill_threshold(tf.constant(imp), rho)
        assert thr.shape == (4, 1)
        np.testing.assert_array_equal(threshold_token_bits(imp, thr).numpy(), ref_select(imp, rho))
    assert np.isinf(prefill_threshold(imp, 0.0).numpy()).all()
    np.testing.assert_array_equal(threshold_token_bits(np.array([0.3, np.nan, 0.2]), 0.25), [8, 4, 4])


def test_decode_rule_bits():
    imp = rng(3).random((2, 10)).astype(np.float32)
    got = decode_rule_token_bits(tf.constant(imp), 0.5, 6).numpy()
    np.testing.assert_array_equal(got[:, :6], ref_select(imp[:, :6], 0.5))
    thr = np.sort(imp[:, :6], -1)[:, ::-1][:, 2:3]
    np.testing.assert_array_equal(got[:, 6:], np.where(imp[:, 6:] >= thr, 8, 4))


# ---- distillation -----------------------------------------------------------------------------


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_distill(s, teachers, labels, gamma, temp, mask=None):
    t = np.mean(teachers, 0)
    ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1)[..., 0]
    lpt, lps = log_softmax(t / temp), log_softmax(s / temp)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1)
    m = np.ones_like(ce) if mask is None else mask.astype(np.float64)
    return (1 - gamma) * (ce * m).sum() / m.sum() + gamma * temp**2 * (kl * m).sum() / m.sum()


def test_distillation_one_and_several_teachers_and_mask():
    r = rng(4)
    s = r.normal(size=(2, 5, 11))
    teachers = [r.normal(size=(2, 5, 11)) for _ in range(3)]
    labels = r.integers(0, 11, size=(2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    (st,), ts = f32([s]), f32(teachers)
    got = distillation_loss(st, ts[0], labels).numpy()
    np.testing.assert_allclose(got, ref_distill(s, teachers[:1], labels, 0.5, 2.0), rtol=1e-5)
    got = distillation_loss(st, ts, labels, gamma=0.3, temperature=1.5)
    np.testing.assert_allclose(got.numpy(), ref_distill(s, teachers, labels, 0.3, 1.5), rtol=1e-5)
    labels_m = np.where(mask == 1, labels, -100)  # ignored ids under the mask are fine
    got = distillation_loss(st, ts[1], labels_m, mask=mask).numpy()
    np.testing.assert_allclose(got, ref_distill(s, teachers[1:2], labels, 0.5, 2.0, mask), rtol=1e-5)


def test_distillation_teacher_gets_no_gradient():
    s = tf.Variable(rng(5).normal(size=(1, 3, 7)).astype(np.float32))
    t = tf.Variable(rng(6).normal(size=(1, 3, 7)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = distillation_loss(s, t, np.zeros((1, 3), np.int32))
    ds, dt = tape.gradient(loss, [s, t])
    assert dt is None and np.isfinite(ds.numpy()).all()


# ---- entropy ------------------------------------------------------------------------------------


def qk_layers(seed, layers=2, b=2, h=4, hkv=2, t=5, d=6):
    r = rng(seed)
    qs = [r.normal(size=(b, h, t, d)) * (l + 1) for l in range(layers)]
    ks = [r.normal(size=(b, hkv, t, d)) * 0.5 for _ in range(layers)]
    return qs, ks


def test_entropy_paper_form_with_gqa():
    qs, ks = qk_layers(7)
    total = 0.0
    for q, k in zip(qs, ks):
        h, hkv = q.shape[1], k.shape[1]
        for b in range(q.shape[0]):
            for head in range(h):
                vq = q[b, head].var()
                vk = k[b, head // (h // hkv)].var()
                total += np.log1p(vq * vk) / q.shape[0]
    got = entropy_loss(f32(qs), f32(ks))
    np.testing.assert_allclose(got.numpy(), -np.log(total), rtol=1e-5)


def test_entropy_reference_form():
    qs, ks = qk_layers(8)
    total = 0.0
    for q, k in zip(qs, ks):
        k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
        per = np.log1p(q.var(-1, ddof=1)).sum(1) + np.log1p(k.var(-1, ddof=1)).sum(1)  # (B, T)
        total += per.mean()
    got = entropy_loss(f32(qs), f32(ks), "reference")
    np.testing.assert_allclose(got.numpy(), -np.log(total), rtol=1e-5)


def test_entropy_falls_as_spread_grows():
    qs, ks = qk_layers(9)
    vals = [
        entropy_loss(f32([q * a for q in qs]), f32(ks)).numpy()
        for a in (0.5, 1.0, 2.0)
    ]
    assert vals[0] > vals[1] > vals[2]


# ---- distribution ---------------------------------------------------------------------------------


def causal_scores(seed, b=2, h=3, t=6, fill=-np.inf):
    s = rng(seed).normal(size=(b, h, t, t))
    return np.where(np.tril(np.ones((t, t), bool)), s, fill)


def ref_cos(a, b):
    keep = np.tril(np.ones(a.shape[-2:], bool))
    a, b = np.where(keep, a, 0), np.where(keep, b, 0)
    a, b = a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1)
    return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def test_distribution_cos_and_paper_vs_numpy():
    studs = [causal_scores(10), causal_scores(11, fill=-1e9)]
    teach = [causal_scores(12), causal_scores(13)]
    cos = np.stack([ref_cos(s, t) for s, t in zip(studs, teach)])
    got = distribution_loss(f32(studs), f32(teach)).numpy()
    np.testing.assert_allclose(got, (1 - cos).mean(), rtol=1e-5)
    shifted = [s + 3 for s in studs[:1]]  # positive cosines so the literal log is defined
    cos_p = ref_cos(shifted[0], teach[0] + 3)
    got = distribution_loss(f32(shifted), f32([teach[0] + 3]), form="paper").numpy()
    np.testing.assert_allclose(got, np.log(cos_p.sum()), rtol=1e-5)


def test_distribution_falls_as_maps_align():
    s, t = causal_scores(14), causal_scores(15)
    finite = np.isfinite(s)
    s0, t0 = np.where(finite, s, 0), np.where(finite, t, 0)
    mixed = lambda a: np.where(finite, (1 - a) * s0 + a * t0, -np.inf)  # noqa: E731
    vals = [
        distribution_loss(tf.constant(mixed(a), tf.float32), tf.constant(t, tf.float32)).numpy()
        for a in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    assert all(x > y for x, y in zip(vals, vals[1:]))
    assert abs(vals[-1]) < 1e-6


def test_no_nan_with_masked_inf_inputs_and_zero_maps():
    s = tf.Variable(causal_scores(16).astype(np.float32))
    t = tf.constant(causal_scores(17).astype(np.float32))
    zero = tf.Variable(np.where(np.isfinite(causal_scores(16)), 0.0, -np.inf).astype(np.float32))
    for form in ("cos", "paper"):
        with tf.GradientTape() as tape:
            loss = distribution_loss([s, zero], [t, t], form=form)
        grads = tape.gradient(loss, [s, zero])
        assert np.isfinite(loss.numpy())
        assert all(np.isfinite(g.numpy()).all() for g in grads)
        assert (grads[0].numpy()[..., np.triu_indices(6, 1)[0], np.triu_indices(6, 1)[1]] == 0).all()


def test_bad_forms_raise():
    x = tf.zeros((1, 1, 2, 2))
    with pytest.raises(ValueError, match="form"):
        distribution_loss(x, x, form="kl")
    with pytest.raises(ValueError, match="form"):
        entropy_loss(x, x, form="other")
