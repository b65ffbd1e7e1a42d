"""Rotations (QuaRot / SpinQuant): an orthogonal change of basis folded into the float weights,
so the model computes the same function while its activations lose their outlier channels.

Why: a pretrained LM's residual stream carries a few channels hundreds of times larger than the
rest; a per-token activation scale is then set by them and every other channel keeps a few
levels (4-bit activations do not survive). RMSNorm is rotation-invariant (``|x Q| = |x|``), so
with each norm's scale folded into the projections that read it, the whole stream can live in a
rotated basis ``x Q``: outliers are spread over all channels. Nothing is added at run time.

What :func:`rotate_model` folds (LLaMA: RMSNorm, no biases on the stream):

- embedding ``E -> E Q``; every projection reading the stream (q/k/v, gate/up) ``W -> Q^T diag(g) W``
  with its norm's scale ``g`` set to 1; every projection writing it (o_proj, down_proj) ``W -> W Q``;
- the head ``Q^T diag(g_final) E^T``: no longer the embedding's transpose, so the rotated model is
  untied (``tie_embeddings: false``; the exported file holds both matrices);
- per attention head, V and o_proj's input in a Hadamard basis of ``head_dim`` (V's columns
  ``W_v H`` per kv head, o_proj's rows ``H^T W_o`` per query head: attention is linear in V), which
  flattens the V cache and o_proj's input the same way.

``Q`` is a Walsh-Hadamard matrix of the largest power-of-two factor of ``hidden`` times a random
orthogonal matrix of the rest (576 = 64 x 9), with random signs: every output channel mixes every
input channel with equal weight, which is what spreads a single outlier channel best.
"""

from __future__ import annotations

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Walsh-Hadamard matrix of order ``n`` (a power of two), orthonormal, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: order {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotation_matrix(n: int, seed: int = 0) -> np.ndarray:
    """An orthogonal ``(n, n)`` float64 matrix: random signs x (Hadamard of n's power-of-two part
    (x) a random orthogonal matrix of the odd part)."""
    rng = np.random.default_rng(seed)
    p = n & -n  # largest power of two dividing n
    m = n // p
    odd = np.linalg.qr(rng.normal(size=(m, m)))[0] if m > 1 else np.ones((1, 1))
    q = np.kron(odd, hadamard(p))
    return q * rng.choice([-1.0, 1.0], size=n)[:, None]


def rotated_config(config):
    """The model config a rotated model is built from (untied head)."""
    return config.model_copy(update={"tie_embeddings": False})


def rotate_model(model, seed: int = 0):
    """A new float model computing ``model``'s function in a rotated basis (see module doc).

    Raises:
        ValueError: a model whose norms are not RMSNorm (a LayerNorm subtracts the mean, which a
            rotation does not preserve) or whose stream projections have biases.
    """
    from tfqat.models import build_model
    from tfqat.models.norms import RMSNorm

    cfg = model.config
    if not all(isinstance(n, RMSNorm) for b in model.blocks for n in (b.attn_norm, b.mlp_norm)):
        raise ValueError(f"rotate: arch {cfg.arch!r} uses LayerNorm; rotations need RMSNorm (llama)")
    if any(lin.use_bias for b in model.blocks for lin in b.linears().values()):
        raise ValueError("rotate: projections with biases are not supported (llama has none)")
    out = build_model(rotated_config(cfg), name=model.name)
    q = rotation_matrix(cfg.hidden, seed)
    d = cfg.head_dim
    hd = hadamard(d) if d & (d - 1) == 0 else rotation_matrix(d, seed + 1)
    f64 = lambda v: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float64)  # noqa: E731
    emb = f64(model.embed_tokens.embeddings)
    out.embed_tokens.embeddings.assign((emb @ q).astype(np.float32))
    for src, dst in zip(model.blocks, out.blocks):
        s_lin, d_lin = src.linears(), dst.linears()
        for norm_name, readers in (("attn_norm", ("q_proj", "k_proj", "v_proj")),
                                   ("mlp_norm", ("gate_proj", "up_proj"))):
            g = f64(getattr(src, norm_name).scale)
            for name in readers:
                d_lin[name].kernel.assign((q.T @ (g[:, None] * f64(s_lin[name].kernel))).astype(np.float32))
            getattr(dst, norm_name).scale.assign(np.ones_like(g, np.float32))
        wv = f64(d_lin["v_proj"].kernel).reshape(cfg.hidden, cfg.num_kv_heads, d)
        d_lin["v_proj"].kernel.assign(np.einsum("ckd,de->cke", wv, hd).reshape(cfg.hidden, -1).astype(np.float32))
        wo = f64(s_lin["o_proj"].kernel).reshape(cfg.heads, d, cfg.hidden)
        wo = np.einsum("ed,hdc->hec", hd.T, wo).reshape(cfg.heads * d, cfg.hidden)
        d_lin["o_proj"].kernel.assign((wo @ q).astype(np.float32))  # every query head: one basis
        d_lin["down_proj"].kernel.assign((f64(s_lin["down_proj"].kernel) @ q).astype(np.float32))
    g = f64(model.final_norm.scale)
    head = emb.T if model.lm_head is None else f64(model.lm_head.kernel)  # (C, V)
    out.lm_head.kernel.assign((q.T @ (g[:, None] * head)).astype(np.float32))
    out.final_norm.scale.assign(np.ones_like(g, np.float32))
    out.rotated = True  # quantize_model builds a rotated recipe's student from it as it is
    return out
