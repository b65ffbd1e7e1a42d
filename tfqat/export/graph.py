"""The inference graph of an export and its conversion to ``.tflite`` bytes.

The graph is written here explicitly, not converted from the training graph (DESIGN.md, Export):
:class:`InferenceModule` is a plain ``tf.Module`` whose ``tf.Variable`` s hold integer weight
codes (int8, or int4 packed two per byte as uint8) and float32 scales taken from the
quantizers' ``export()`` (through :class:`~tfqat.export.spec.ModelSpec`); every quantized matmul,
activation quantization, token-bit selection and attention matmul is a composite of
:mod:`tfqat.export.composites`, which the converter turns into one CUSTOM ``TFQAT_*`` node.
Norms, RoPE, softmax, residuals, embedding and lm_head stay float builtins, as in training
(METHOD.md sec. 1). One :class:`DecoderLayer` serves both files: the spec's precision decides
whether its projections and attention run float (``model_float.tflite``) or integer
(``model.tflite``).

Signatures (batch 1, one sequence):

- ``prefill(tokens int32 [T])``, ``1 <= T <= max_positions``, positions ``0..T-1`` (the cache
  starts empty): ``logits [T, V]`` and, per layer ``l``, the cache rows of the T tokens:
  ``k_l``/``v_l`` (int8 ``[Hkv, T, D]``, or uint8 ``[Hkv, T, D/2]`` packed int4 when that
  point is uniformly 4-bit), ``ks_l float32 [T]`` (K scale per position), ``vb_l int32 [T]``
  (V row bits: which of the two V scales a row uses) and, token-adaptive recipes only,
  ``thresholds float32 [L]`` (the decode rule's per-layer importance threshold).
- ``decode(token int32 [1], position int32 [1], k_cache_l, ks_cache_l, v_cache_l, vb_cache_l
  [, thresholds])`` with caches of capacity ``S_cap = max_positions`` holding positions
  ``0..position-1``: ``logits [1, V]`` and the new token's rows ``k_l, ks_l, v_l, vb_l`` (the
  graph inserts them at ``position`` itself before attending, so the caller only writes them
  into its cache afterwards). The cache's format: :mod:`tfqat.export.kv_cache`.
- ``prefill_last(tokens int32 [T])``: ``prefill`` for generation: the same outputs, but
  ``logits [1, V]`` of the last position only, so the head (``V x C`` per token, the largest
  matmul of a small model) runs once instead of T times. ``prefill`` keeps every position's
  logits for scoring (perplexity, BLiMP). Its logits equal the last row of ``prefill``'s: every
  op before the head is the same graph on the same tokens, and the head is per row (bit for bit
  with the int8 head, which our delegate runs; within float rounding of XNNPACK's GEMM for a
  float head).

Decode bit rule (METHOD.md sec. 3, :mod:`tfqat.quant.token_bits`): prefill selects the top
``rho * T`` tokens per layer (TFQAT_SELECT_BITS mode 0) and returns, per layer, the smallest
selected importance (= ``prefill_threshold``); decode gives the new token 8 bits when its
importance clears that threshold (mode 1). Cached rows keep the bits they were written with.
"""

from __future__ import annotations

import math
import tempfile
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from tfqat.export.composites import (
    attn_pv_op, attn_qk_op, qlinear_op, quantize_op, select_bits_threshold_op, select_bits_topk_op,
)
from tfqat.export.kv_cache import as_uint8, cache_bits, decode_cache_specs, store_rows, write_rows
from tfqat.export.spec import ExportError, ModelSpec, QLinearSpec
from tfqat.models.rope import rope_tables


def _var(a, name: str) -> tf.Variable:
    return tf.Variable(np.ascontiguousarray(a), trainable=False, name=name)


def _norm_vars(params: dict, prefix: str) -> dict:
    return {k: _var(v, f"{prefix}_{k}") for k, v in params.items() if k != "eps"}


def _norm(x, params: dict, eps: float):
    """LayerNorm (``gamma``, ``beta``) or RMSNorm (``scale``) over the last axis."""
    if "gamma" in params:
        mean, var_ = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(var_ + eps) * params["gamma"] + params["beta"]
    ms = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
    return x * tf.math.rsqrt(ms + eps) * params["scale"]


class Rope(tf.Module):
    """Rotary position embedding (LLaMA): cos/sin tables gathered at each token's position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__(name="rope")
        cos, sin = rope_tables(head_dim, max_positions, theta)
        self.cos = _var(cos.astype(np.float32), "rope_cos")
        self.sin = _var(sin.astype(np.float32), "rope_sin")

    def __call__(self, x, positions):  # x [T, heads, D]
        cos = tf.gather(self.cos, positions)[:, None, :]
        sin = tf.gather(self.sin, positions)[:, None, :]
        x1, x2 = tf.split(x, 2, axis=-1)
        return x * cos + tf.concat([-x2, x1], axis=-1) * sin


class LayerOut(NamedTuple):
    """What one :class:`DecoderLayer` call returns."""

    x: tf.Tensor  # [T, C] the residual stream after the layer
    rows: dict  # the T tokens' cache rows: k, v (float); k, ks, v, vb, vs (quantized)
    bits: Optional[tf.Tensor]  # [T] token-adaptive: the bits selected here, the next layer's input bits
    threshold: Optional[tf.Tensor]  # prefill, token-adaptive: the smallest importance given 8 bits
    importance: tf.Tensor  # [T] attention paid to token 0, summed over heads (Eq. 14; token pruning)


class DecoderLayer(tf.Module):
    """One decoder block, float or quantized as its spec is.

    Shared by both precisions: the norms, the q/k/v split, RoPE, the residuals and the MLP.
    :meth:`_project` runs a projection as a float matmul or as TFQAT_QLINEARs, by what the spec
    holds for it; attention is float (:meth:`_attend_float`) or the integer path over the
    int8/int4 cache (:meth:`_attend_quant`).
    """

    def __init__(self, i: int, spec: ModelSpec, rope: Optional[Rope]):
        super().__init__(name=f"layer_{i}")
        cfg, ls = spec.cfg, spec.layers[i]
        self.index, self.layer_spec, self.quantized, self.rope = i, ls, spec.quantized, rope
        self.rho = spec.rho if spec.quantized else None  # not None: token-adaptive bits
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.head_dim
        self.capacity, self.gated = cfg.max_positions, cfg.arch == "llama"
        self.points = ls.points
        self.eps = {n: p["eps"] for n, p in ls.norms.items()}
        self.norms = {n: _norm_vars(p, f"l{i}_{n}") for n, p in ls.norms.items()}
        lin = {}
        for g, p in ls.linears.items():
            if p is None:
                continue
            if isinstance(p, QLinearSpec):
                lin[g] = {"w": _var(p.stored(), f"l{i}_{g}_w"), "ws": _var(p.scales, f"l{i}_{g}_ws"),
                          "b": None if p.bias is None else _var(p.bias, f"l{i}_{g}_b")}
            else:
                lin[g] = _var(p, f"l{i}_{g}")
        self.lin = lin
        self.act = {n: _var(a.scales, f"l{i}_{n}_scales") for n, a in ls.points.items()}
        if "probs" in ls.points:
            self.ps = _var(ls.points["probs"].scales[:1], f"l{i}_probs_scale")

    def __call__(self, x, positions, bits=None, cache=None, thresholds=None, rope_positions=None) -> LayerOut:
        """The layer over ``x``: norms, projections, attention against the cache, MLP.

        Args:
            x: [T, C] float32, the residual stream.
            positions: int32 [T] where the rows go: prefill ``0..T-1`` (the cache starts empty);
                decode [1], the cache row the new token takes (attention covers rows 0..that).
            bits: int32 [T] the previous layer's selected bits (token-adaptive; None elsewhere).
            cache: decode only: this layer's cache tensors (``k``, ``v``; quantized also ``ks``, ``vb``).
            thresholds: decode, token-adaptive: float32 [L], the prefill's per-layer thresholds.
            rope_positions: the positions RoPE rotates by, when they differ from ``positions``
                (a pruned decode: the cache row is ``kv_len[l]``, the angle the true position).
        """
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        t = tf.shape(x)[0]
        h = _norm(x, self.norms["attn_norm"], self.eps["attn_norm"])
        qkv = self._project("qkv", h, self._bits("attn_in", bits, t), "attn_in")
        q = tf.reshape(qkv[:, : H * D], [t, H, D])
        k = tf.reshape(qkv[:, H * D: (H + Hkv) * D], [t, Hkv, D])
        v = qkv[:, (H + Hkv) * D:]  # quantized: the [T, Hkv*D] rows TFQAT_QUANTIZE takes
        if not self.quantized:
            v = tf.reshape(v, [t, Hkv, D])
        if self.rope is not None:
            at = positions if rope_positions is None else rope_positions
            q, k = self.rope(q, at), self.rope(k, at)
        attend = self._attend_quant if self.quantized else self._attend_float
        o, rows, importance, own, thr = attend(q, k, v, t, positions, bits, cache, thresholds)
        x = x + self._o_proj(o, t)
        h = _norm(x, self.norms["mlp_norm"], self.eps["mlp_norm"])
        a = self._mlp_act(self._project("gate_up", h, self._bits("mlp_in", own, t), "mlp_in"))
        x = x + self._project("down", a, self._bits("mlp_act", own, t), "mlp_act")
        return LayerOut(x, rows, own, thr, importance)

    # -- pieces ---------------------------------------------------------------------------------
    def _bits(self, point: str, bits, t):
        """int32 [T] bits at a quant point: ``bits`` when the point is token-adaptive and a
        selection exists, else the point's one width for every token. None in the float layer."""
        if not self.quantized:
            return None
        p = self.points[point]
        return bits if (p.adaptive and bits is not None) else tf.fill([t], tf.constant(p.bits, tf.int32))

    def _project(self, group: str, x, bits=None, point: Optional[str] = None):
        """``x`` through one projection group: a float matmul (+ bias) when the spec holds a
        float kernel ``[in, out]`` for it, else one TFQAT_QLINEAR per part (a group whose parts
        differ in weight bits is split into ``group:part`` entries) with activations quantized as
        ``point`` says (None: dynamic per-token, its scales input unread)."""
        ls = self.layer_spec
        if group in ls.linears and not isinstance(ls.linears[group], QLinearSpec):
            y = tf.matmul(x, self.lin[group])
            return y + self.lin[group + "_bias"] if group + "_bias" in self.lin else y
        outs = []
        for g in [g for g in ls.linears if g == group or g.startswith(group + ":")]:
            p, v = ls.linears[g], self.lin[g]
            grouped = {"group_size": p.group_size} if p.group_size else {}
            mode = 1 if point is None else int(self.points[point].dynamic)
            outs.append(qlinear_op(x, bits, self.act[point or "attn_in"], v["w"], v["ws"], v["b"],
                                   w_bits=p.w_bits, k=p.k, act_mode=mode, **grouped))
        return outs[0] if len(outs) == 1 else tf.concat(outs, axis=-1)

    def _o_proj(self, o, t):
        """o_proj: a float matmul in the float model, and quantized with ``oproj="float"``
        (``o_float``: dequantized weights); else a TFQAT_QLINEAR on o_in's trained quantization,
        or on dynamic per-token 8-bit activations (``oproj="dynamic8"``)."""
        if not self.quantized:
            return self._project("o", o)
        if "o_float" in self.lin:
            return self._project("o_float", o)
        if "o_in" in self.points:
            return self._project("o", o, self._bits("o_in", None, t), "o_in")
        return self._project("o", o, tf.fill([t], tf.constant(8, tf.int32)), None)

    def _mlp_act(self, gu):
        if self.gated:
            g, u = tf.split(gu, 2, axis=-1)
            return tf.nn.silu(g) * u
        return tf.nn.gelu(gu, approximate=True)

    # -- attention --------------------------------------------------------------------------------
    def _attend_float(self, q, k, v, t, positions, bits, cache, thresholds):
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        G, S_cap = H // Hkv, self.capacity
        k_new = tf.transpose(k, [1, 0, 2])  # [Hkv, T, D]
        v_new = tf.transpose(v, [1, 0, 2])
        if cache is None:
            kc, vc, s = k_new, v_new, t
            valid = tf.range(t)[None, :] <= tf.range(t)[:, None]  # [T, S]
        else:
            pos = positions[0]
            kc = write_rows(cache["k"], k_new, pos)
            vc = write_rows(cache["v"], v_new, pos)
            s = S_cap
            valid = tf.range(S_cap)[None, :] <= positions[:, None]
        qg = tf.reshape(tf.transpose(q, [1, 0, 2]), [Hkv, G * t, D])
        scores = tf.matmul(qg, kc, transpose_b=True) / math.sqrt(D)  # [Hkv, G*T, S]
        scores = tf.reshape(scores, [H, t, s])
        scores = tf.where(valid[None], scores, -1e9)
        p = tf.nn.softmax(scores, axis=-1)
        importance = tf.reduce_sum(p[:, :, 0], axis=0)
        o = tf.matmul(tf.reshape(p, [Hkv, G * t, s]), vc)  # [Hkv, G*T, D]
        o = tf.reshape(tf.transpose(tf.reshape(o, [H, t, D]), [1, 0, 2]), [t, H * D])
        return o, {"k": k_new, "v": v_new}, importance, None, None

    def _attend_quant(self, q, k, v, t, positions, bits, cache, thresholds):
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        pts, act = self.points, self.act
        k_bits, v_bits = cache_bits(pts["k"]), cache_bits(pts["v"])
        qc, qs = quantize_op(tf.reshape(q, [t, H * D]), self._bits("q", bits, t), act["q"],
                             int(pts["q"].dynamic))
        kc, ks = quantize_op(tf.reshape(k, [t, Hkv * D]), self._bits("k", bits, t), act["k"],
                             int(pts["k"].dynamic))
        qc = tf.reshape(qc, [t, H, D])  # ATTN_QK q_layout=1 reads [T, H, D] as it is
        k_new = store_rows(tf.transpose(tf.reshape(kc, [t, Hkv, D]), [1, 0, 2]), k_bits)
        if cache is None:
            k_all, ks_all, length = k_new, ks, tf.reshape(t, [1])
        else:
            pos = positions[0]
            k_all = write_rows(cache["k"], k_new, pos)
            ks_all = write_rows(cache["ks"], ks, pos)
            length = positions + 1
        scores = attn_qk_op(qc, qs * np.float32(1.0 / math.sqrt(D)), as_uint8(k_all, k_bits), ks_all, length,
                            kv_bits=k_bits, d=D, q_layout=1)
        p = tf.nn.softmax(scores, axis=-1)  # [H, T, S]
        ps = self.ps
        pmax = float(2 ** pts["probs"].bits - 1)
        # unsigned codes, one scale (or one per (head, query) row: p_mode 1); ATTN_PV (p_max)
        # quantizes the whole of p itself, only column 0 is needed here
        if pts["probs"].dynamic:
            # the row scales ATTN_PV (p_mode 1) computes, needed here before it runs: entries past
            # the valid part are exactly 0 after softmax(-inf); divide_no_nan is a true division
            # (grappler rewrites x / constant into a multiply by the reciprocal, an ulp off)
            m = tf.reduce_max(p, axis=-1)  # [H, T]
            p_row = tf.where(m > 0.0, tf.math.divide_no_nan(m, tf.fill(tf.shape(m), pmax)), tf.ones_like(m))
        else:
            p_row = ps[0]
        p0_codes = tf.clip_by_value(tf.round(p[:, :, 0] / p_row), 0.0, pmax)  # [H, T]
        importance = tf.reduce_sum(p0_codes * p_row, axis=0)  # [T], with the codes ATTN_PV uses
        own = thr = None
        if self.rho is not None:
            if cache is None:
                own = select_bits_topk_op(importance, self.rho)
                inf = tf.constant(np.inf, tf.float32)
                thr = tf.reduce_min(tf.where(tf.equal(own, 8), importance, inf))
            else:
                own = select_bits_threshold_op(importance, thresholds[self.index: self.index + 1])
        vb = self._bits("v", own, t)
        # vs (the scale each V row used) is redundant with vb + v_scales, but it is returned:
        # an output no node consumes is left unallocated by the delegate partitioning
        # (TFQAT_QUANTIZE would write through a null pointer).
        vc, vs = quantize_op(v, vb, act["v"])
        v_new = store_rows(tf.transpose(tf.reshape(vc, [t, Hkv, D]), [1, 0, 2]), v_bits)
        if cache is None:
            v_all, vb_all = v_new, vb
        else:
            v_all = write_rows(cache["v"], v_new, positions[0])
            vb_all = write_rows(cache["vb"], vb, positions[0])
        o = attn_pv_op(p, ps, as_uint8(v_all, v_bits), vb_all, act["v"], length, kv_bits=v_bits, d=D,
                       p_max=int(pmax), **({"p_mode": 1} if pts["probs"].dynamic else {}))  # [H, T, D]
        o = tf.reshape(tf.transpose(o, [1, 0, 2]), [t, H * D])
        return o, {"k": k_new, "ks": ks, "v": v_new, "vb": vb, "vs": vs}, importance, own, thr


class InferenceModule(tf.Module):
    """The exported model: embedding, :class:`DecoderLayer` s and head over the variables of a
    :class:`~tfqat.export.spec.ModelSpec`, with the ``prefill`` and ``decode`` signatures (see
    the module docstring). A variant (the pruned prefill of :mod:`tfqat.agile.prune_export`)
    overrides :meth:`_prefill`, :meth:`_decode` and :meth:`_decode_inputs`."""

    def __init__(self, spec: ModelSpec):
        super().__init__(name="tfqat_inference")
        cfg = spec.cfg
        self.spec = spec
        self.quantized = spec.quantized
        self.adaptive = spec.quantized and spec.rho is not None
        self.head_int8 = spec.head == "int8"
        if self.head_int8:  # int8 rows + per-row scales; tied: one table serves both
            self.embed = _var(spec.embed_q.codes, "embed_codes")
            self.embed_s = _var(spec.embed_q.scales, "embed_scales")
            if spec.head_q is spec.embed_q:
                self.head_w, self.head_ws = self.embed, self.embed_s
            else:
                self.head_w = _var(spec.head_q.codes, "lm_head_codes")
                self.head_ws = _var(spec.head_q.scales, "lm_head_scales")
            self.head_b = None if spec.head_q.bias is None else _var(spec.head_q.bias, "lm_head_b")
            self.head_act = _var(np.ones(2, np.float32), "lm_head_act_scales")  # unread (dynamic)
            self.lm_head = None
        else:
            self.embed = _var(spec.embed, "embed")
            self.lm_head = None if spec.lm_head is None else _var(spec.lm_head, "lm_head")
        self.positions = None if spec.positions is None else _var(spec.positions, "positions")
        self.final_norm = _norm_vars(spec.final_norm, "final_norm")
        self.rope = Rope(cfg.head_dim, cfg.max_positions, cfg.rope_theta) if cfg.arch == "llama" else None
        self.layers = [DecoderLayer(i, spec, self.rope) for i in range(cfg.layers)]
        inputs = self._decode_inputs()
        self._decode_names = tuple(s.name for s in inputs)
        self.prefill = tf.function(self._prefill,
                                   input_signature=[tf.TensorSpec([None], tf.int32, name="tokens")])
        self.prefill_last = tf.function(self._prefill_last,
                                        input_signature=[tf.TensorSpec([None], tf.int32, name="tokens")])
        self.decode = tf.function(self._decode, input_signature=inputs)

    def _embed(self, tokens, positions):
        x = tf.gather(self.embed, tokens)  # [T, C]
        if self.head_int8:  # GATHER of int8 rows, dequantized with their row scales
            x = tf.cast(x, tf.float32) * tf.gather(self.embed_s, tokens)[:, None]
        if self.positions is not None:
            x = x + tf.gather(self.positions, positions)
        return x

    def _logits(self, x):
        x = _norm(x, self.final_norm, self.spec.final_norm["eps"])
        if self.head_int8:  # w8 QLINEAR, dynamic per-token int8 activations
            bits = tf.fill([tf.shape(x)[0]], tf.constant(8, tf.int32))
            return qlinear_op(x, bits, self.head_act, self.head_w, self.head_ws, self.head_b,
                              w_bits=8, k=self.spec.head_q.k, act_mode=1)
        if self.lm_head is None:
            return tf.matmul(x, self.embed, transpose_b=True)
        return tf.matmul(x, self.lm_head)

    def _layer_cache(self, feeds: dict, i: int) -> dict:
        keys = ("k", "ks", "v", "vb") if self.quantized else ("k", "v")
        return {k: feeds[f"{k}_cache_{i}"] for k in keys}

    def run(self, tokens, positions, cache_in=None, thresholds=None, last_only: bool = False) -> dict:
        """Every layer over ``tokens`` at ``positions``: ``{"logits", "<row>_<l>", ["thresholds"]}``;
        ``last_only``: the logits of the last position alone (``[1, V]``)."""
        x = self._embed(tokens, positions)
        outs: dict = {}
        bits, thrs = None, []
        if self.adaptive:
            bits = tf.fill(tf.shape(tokens), tf.constant(8, tf.int32))  # layer 0: 8-bit
        for i, layer in enumerate(self.layers):
            out = layer(x, positions, bits, None if cache_in is None else cache_in[i], thresholds)
            x = out.x
            if self.adaptive:
                bits = out.bits
                if out.threshold is not None:
                    thrs.append(out.threshold)
            for key, val in out.rows.items():
                outs[f"{key}_{i}"] = val
        if last_only:  # [1, V] with a static 1 (the int8 head's custom op loses it otherwise)
            logits = self._logits(tf.expand_dims(x[-1], 0))
            outs["logits"] = tf.reshape(logits, [1, logits.shape[-1] if logits.shape[-1] is not None else -1])
        else:
            outs["logits"] = self._logits(x)
        if thrs:
            outs["thresholds"] = tf.stack(thrs)
        return outs

    # -- signatures -------------------------------------------------------------------------------
    def _decode_inputs(self) -> list:
        return [tf.TensorSpec([1], tf.int32, name="token"), tf.TensorSpec([1], tf.int32, name="position")] + [
            tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype in decode_cache_specs(self.spec)]

    def _prefill(self, tokens):
        return self.run(tokens, tf.range(tf.shape(tokens)[0]))

    def _prefill_last(self, tokens):
        return self.run(tokens, tf.range(tf.shape(tokens)[0]), last_only=True)

    def has_prefill_last(self) -> bool:
        """Whether ``prefill_last`` is this module's ``prefill`` with one row of logits: not for a
        variant that replaces :meth:`_prefill` (the pruned prefill keeps its own signatures)."""
        return type(self)._prefill is InferenceModule._prefill

    def _decode(self, *args):
        feeds = dict(zip(self._decode_names, args))
        cache_in = [self._layer_cache(feeds, i) for i in range(len(self.layers))]
        return self.run(feeds["token"], feeds["position"], cache_in, feeds.get("thresholds"))


def build_module(spec: ModelSpec) -> InferenceModule:
    """The ``tf.Module`` with ``prefill`` and ``decode`` (see the module docstring)."""
    return InferenceModule(spec)


def convert(spec: ModelSpec, module: Optional[InferenceModule] = None, what: str = "") -> bytes:
    """The .tflite bytes of ``spec`` (SavedModel with the signatures ``prefill``, ``decode`` and,
    unless the module replaces its prefill, ``prefill_last`` -> TFLite converter; the signatures
    share every constant buffer); ``module``: an already built variant of
    :class:`InferenceModule` (e.g. a pruned prefill).

    Raises:
        ExportError: the converter failed (its first line; ``what`` names the variant).
    """
    module = module if module is not None else build_module(spec)
    with tempfile.TemporaryDirectory(prefix="tfqat-export-") as tmp:
        signatures = {"prefill": module.prefill.get_concrete_function(),
                      "decode": module.decode.get_concrete_function()}
        if module.has_prefill_last():
            signatures["prefill_last"] = module.prefill_last.get_concrete_function()
        tf.saved_model.save(module, tmp, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.allow_custom_ops = spec.quantized
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return converter.convert()
        except Exception as e:  # the converter's messages are pages long
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"TFLite conversion{what} failed: {first}") from e
