"""Export a QAT student to ``model.tflite`` (TFQAT_* custom ops) and its FP teacher to
``model_float.tflite`` (builtin ops only), plus ``manifest.json``.

``python -m tfqat.export --run runs/<name>`` (also the last stage of the default job, through
:func:`export_run`).

The inference graph is written here explicitly, not converted from the training graph
(DESIGN.md, Export): :class:`InferenceModule` is a plain ``tf.Module`` whose ``tf.Variable`` s
hold integer weight codes (int8, or int4 packed two per byte as uint8) and float32 scales taken
from the quantizers' ``export()``; every quantized matmul, activation quantization, token-bit
selection and attention matmul is a ``tfl_fusable_op`` composite (``@tf.function(
experimental_implements=...)``) whose TF body is the exact integer reference of
``tflite_ops/OPS.md``; the converter turns each into one CUSTOM ``TFQAT_*`` node that
``libtfqat_ops.so`` runs. Norms, RoPE, softmax, residuals, embedding and lm_head stay float
builtins, as in training (METHOD.md sec. 1).

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
  into its cache afterwards).

KV cache as tensors in and out, not TFLite resource variables: (1) the state stays with the
caller, so one interpreter serves several conversations, and a cache can be forked, rewound
(speculative decoding, beam search) or saved; (2) resource variables need the converter's
experimental resource-variable path (VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE), which
XNNPACK and external delegates do not claim, and our ATTN ops would read a copy anyway; (3) the
graph returns only the new rows (T rows, not the whole cache), and :mod:`tfqat.runtime` keeps
the cache in the decode signature's own input buffers and writes the rows there in place, so
a decode step copies the cache once (the in-graph DYNAMIC_UPDATE_SLICE), not three times.

Decode bit rule (METHOD.md sec. 3, :mod:`tfqat.quant.token_bits`): prefill selects the top
``rho * T`` tokens per layer (TFQAT_SELECT_BITS mode 0) and returns, per layer, the smallest
selected importance (= ``prefill_threshold``); decode gives the new token 8 bits when its
importance clears that threshold (mode 1). Cached rows keep the bits they were written with.

o_proj: training quantizes no activation before o_proj (there is no quant point there), so by
default (``oproj="float"``) the export runs it exactly as training does: a float matmul with the
dequantized weights (codes * scales, stored float32: 8x the bytes of that one matrix). With
``oproj="dynamic8"`` it is a TFQAT_QLINEAR with dynamic per-token 8-bit activations
(``act_mode=1``): integer everywhere and smaller, at the price of one rounding training never
saw (about 3% of the logit spread on an untrained micro model). A QuantPoint before o_proj in
the model would make the integer path exact.

Embedding and lm_head (``head``): training keeps both float, so by default (``head="float"``)
the export does too (float32 GATHER and FULLY_CONNECTED): exact, but on a small model they are
most of the file (llama-58m: 64 of ~100 MB) and the lm_head GEMV is most of a decode step (a
32 MB float matrix read per token). ``head="int8"`` stores each as symmetric per-row int8
(``s_v = max|row v| / 127``, round-half-even; a tied table is stored once and serves both):
the embedding is a GATHER of int8 rows times a GATHER of their scales, and the lm_head a
TFQAT_QLINEAR ``w_bits=8, act_mode=1`` (dynamic per-token int8 activations, as o_proj's
dynamic8). Deviation from the exact export: the head alone is bounded per logit by
``|h|_1 s_v/2 + |w_v|_1 s_h/2 + K s_h s_v/4`` (h the final-norm output, ``s_h = max|h|/127``;
tests/test_export.py checks it), i.e. about 1/254 of ``|h|_1 max|w_v|``; the embedding's
rounding (at most ``s_v/2`` per element, 0.4% of the row's max) propagates through the network
like any input perturbation and has no closed bound, so it is measured: on the untrained micro
test model (nearly flat logits) max |dlogit| is 0.06-0.08 of the logit std, perplexity moves by
-5e-5 (relative), and teacher-forced greedy steps agree 97.5% (asserted: 0.15 std, 0.5% ppl).
Because that breaks exact greedy identity with the Keras model (the issue's parity criterion),
the default stays exact; ``--head int8 --oproj dynamic8`` is the deployment setting that meets
the size / speed goals (benchmarks/host_e2e.py ``--fast``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .atomic import write_bytes_atomic

FORMAT_VERSION = 1
TFQAT_OPS = ("TFQAT_QUANTIZE", "TFQAT_SELECT_BITS", "TFQAT_QLINEAR", "TFQAT_ATTN_QK",
             "TFQAT_ATTN_PV")


class ExportError(RuntimeError):
    """An export that cannot be produced or failed its checks: one line naming the problem."""


# ---- packing ------------------------------------------------------------------------------------

def pack_int4(codes: np.ndarray) -> np.ndarray:
    """``[..., L]`` int codes in ``[-8, 7]`` -> ``[..., ceil(L/2)]`` uint8 (OPS.md packed int4)."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ExportError(f"pack_int4: codes outside [-8, 7] (min {codes.min()}, max {codes.max()})")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), codes.dtype)], -1)
    nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 ``[..., length]``."""
    p = np.asarray(packed).astype(np.int16)
    nib = np.stack([p & 0xF, p >> 4], -1).reshape(p.shape[:-1] + (-1,))[..., :length]
    return (nib - 16 * (nib >= 8)).astype(np.int8)


# ---- what gets exported: plain numpy, read from a Keras model ------------------------------------

@dataclasses.dataclass
class QLinearSpec:
    """One TFQAT_QLINEAR: weights ``[N, K]`` codes (row = output channel) and scales ``[N]``."""

    codes: np.ndarray  # int8 [N, K]
    scales: np.ndarray  # float32 [N], or [N, ceil(K / group_size)] when grouped
    w_bits: int
    bias: Optional[np.ndarray] = None  # float32 [N]
    group_size: int = 0  # > 0: one scale per output channel and group_size inputs

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1])

    def stored(self) -> np.ndarray:
        return pack_int4(self.codes) if self.w_bits == 4 else self.codes.astype(np.int8)

    def dequantized(self) -> np.ndarray:
        """``codes * scales`` as float32 ``[N, K]`` (each group's scale repeated over its inputs)."""
        s = self.scales if self.scales.ndim == 1 else np.repeat(self.scales, self.group_size, 1)[:, :self.k]
        return self.codes.astype(np.float32) * (s[:, None] if s.ndim == 1 else s)


@dataclasses.dataclass
class ActSpec:
    """An activation quantization point as the kernels take it."""

    bits: int  # the high (or only) bit width
    adaptive: bool
    scales: np.ndarray  # float32 [2]: [8-bit scale, 4-bit scale] (equal when not adaptive)
    dynamic: bool = False  # per-token max|x| (act_mode=1)
    signed: bool = True


@dataclasses.dataclass
class LayerSpec:
    norms: dict  # name -> dict of float arrays
    linears: dict  # group name -> QLinearSpec (or float kernel [in, out] for the float model)
    points: dict  # point name -> ActSpec (quantized model only)


@dataclasses.dataclass
class ModelSpec:
    cfg: Any  # ModelConfig
    quantized: bool
    embed: np.ndarray  # [V, C]
    positions: Optional[np.ndarray]  # [P, C] (GPT-2)
    final_norm: dict
    lm_head: Optional[np.ndarray]  # [C, V]; None = tied
    layers: list
    rho: Optional[float] = None  # token-adaptive fraction; None = fixed bits
    oproj: str = "float"
    recipe: Optional[dict] = None
    head: str = "float"  # "float" or "int8" (see the module docstring)
    embed_q: Optional[QLinearSpec] = None  # head="int8": int8 embedding rows [V, C] + row scales
    head_q: Optional[QLinearSpec] = None  # head="int8": lm_head as a w8 QLINEAR [V, C]


HEADS = ("float", "int8")


def quantize_rows_int8(w: np.ndarray) -> QLinearSpec:
    """Symmetric per-row int8 of ``w [N, K]``: ``s = max|row| / 127`` (1.0 for a zero row),
    codes ``clamp(round_half_even(w / s), -127, 127)`` (the float32 division the kernels use)."""
    w = np.asarray(w, np.float32)
    m = np.abs(w).max(axis=1)
    s = np.where(m > 0, m / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(w / s[:, None]), -127, 127).astype(np.int8)
    return QLinearSpec(codes, s, 8)


def _np(v) -> np.ndarray:
    return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32)


def _norm_params(norm) -> dict:
    if hasattr(norm, "gamma"):
        return {"gamma": _np(norm.gamma), "beta": _np(norm.beta), "eps": float(norm.eps)}
    return {"scale": _np(norm.scale), "eps": float(norm.eps)}


def _act_spec(where: str, quantizer, kinds=("static", "dynamic")) -> ActSpec:
    if quantizer is None:
        raise ExportError(f"{where}: no activation quantizer; the TFQAT kernels need every "
                          "activation point quantized (recipes w8a8, w4a8, w4a4, w4a4-8)")
    spec = quantizer.spec
    if spec.asymmetric:
        raise ExportError(f"{where}: asymmetric activation quantization (zero point) is not "
                          "supported by the TFQAT kernels; retrain with act_asymmetric: false")
    bits_ok = (spec.bits in (4, 8)) if spec.signed else (2 <= spec.bits <= 8)
    if not bits_ok or (spec.adaptive and (spec.bits, spec.low_bits) != (8, 4)):
        raise ExportError(f"{where}: {spec.bits}-bit activations"
                          f"{f'/{spec.low_bits}' if spec.adaptive else ''} are not supported by the "
                          "TFQAT kernels; use 8, 4 or token-adaptive 8/4")
    if spec.granularity != "tensor":
        if ("dynamic" if spec.granularity == "token" else "row") not in kinds:
            raise ExportError(f"{where}: dynamic {spec.granularity} quantization is not supported at this "
                              "point; use a recipe whose dynamic list the kernels support")
        return ActSpec(spec.bits, spec.adaptive, np.ones(2, np.float32), dynamic=True, signed=spec.signed)
    ex = quantizer.export()  # raises on an uninitialised quantizer
    if spec.adaptive:
        scales = np.array([ex[f"scale{spec.bits}"], ex[f"scale{spec.low_bits}"]], np.float32)
    else:
        scales = np.array([ex["scale"], ex["scale"]], np.float32)
    return ActSpec(spec.bits, spec.adaptive, scales, signed=spec.signed)


def _weight_spec(where: str, linear) -> QLinearSpec:
    wq = linear.weight_quantizer
    if wq is None:
        raise ExportError(f"{where}: no weight quantizer; export needs a quantized student "
                          "(quantize_model) — the FP teacher goes to model_float.tflite")
    if wq.spec.bits not in (4, 8):
        raise ExportError(f"{where}: {wq.spec.bits}-bit weights are not supported by the TFQAT "
                          "kernels; use 4 or 8")
    codes, scales = wq.export(linear.kernel)
    bias = None if linear.bias is None else _np(linear.bias)
    return QLinearSpec(codes.astype(np.int8), scales.astype(np.float32), int(wq.spec.bits), bias,
                       int(wq.spec.group_size))


def _concat(parts: list) -> QLinearSpec:
    """One QLINEAR for several projections of the same input (q, k, v; gate, up)."""
    bias = None
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([p.bias if p.bias is not None else np.zeros(p.n, np.float32)
                               for p in parts])
    return QLinearSpec(np.concatenate([p.codes for p in parts]),
                       np.concatenate([p.scales for p in parts]), parts[0].w_bits, bias, parts[0].group_size)


def _rho_of(model, rho) -> Optional[float]:
    if rho is not None:
        return float(rho)
    recipe = getattr(model, "recipe", None)
    if recipe is not None and getattr(recipe, "adaptive", False):
        return float(recipe.rho)
    return None


def spec_from_model(model, quantized: bool = True, rho: Optional[float] = None,
                    oproj: str = "float", head: str = "float") -> ModelSpec:
    """Read everything the export needs from a Keras LLaMA / GPT-2 (student or teacher).

    Args:
        model: a :class:`~tfqat.models.CausalLM`; with ``quantized`` a student from
            ``quantize_model`` whose scales are initialised (calibrated or trained).
        rho: token-adaptive 8-bit fraction; default ``model.recipe.rho`` when adaptive.
        oproj: ``"dynamic8"`` or ``"float"`` (see the module docstring).
        head: ``"float"`` (exact, as trained) or ``"int8"`` (embedding and lm_head as per-row
            int8; see the module docstring). Ignored for the float model.

    Raises:
        ExportError: a slot the kernels cannot run (one line naming block and slot).
    """
    if oproj not in ("dynamic8", "float"):
        raise ExportError(f"oproj={oproj!r} is unknown; use 'dynamic8' or 'float'")
    if head not in HEADS:
        raise ExportError(f"head={head!r} is unknown; use 'float' or 'int8'")
    cfg = model.config
    layers = []
    rho = _rho_of(model, rho) if quantized else None
    for i, block in enumerate(model.blocks):
        norms = {"attn_norm": _norm_params(block.attn_norm), "mlp_norm": _norm_params(block.mlp_norm)}
        lin = block.linears()
        if cfg.arch == "llama":
            groups = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"],
                      "gate_up": ["gate_proj", "up_proj"], "down": ["down_proj"]}
        else:
            groups = {"qkv": ["q_proj", "k_proj", "v_proj"], "o": ["o_proj"],
                      "gate_up": ["fc_in"], "down": ["fc_out"]}
        linears, points = {}, {}
        if quantized:
            for g, names in groups.items():
                parts = [_weight_spec(f"block {i} {n}", lin[n]) for n in names]
                if len({(p.w_bits, p.group_size) for p in parts}) == 1:
                    linears[g] = _concat(parts)
                else:  # mixed weight bits in a group: one op each
                    for n, p in zip(names, parts):
                        linears[f"{g}:{n}"] = p
            qp = block.quant_points()
            for name in ("attn_in", "mlp_in", "mlp_act"):
                points[name] = _act_spec(f"block {i} {name}", qp[name].quantizer)
            for name in ("q", "k"):  # per-token scales: the quantize op's rows, ATTN_QK's q/k scales
                points[name] = _act_spec(f"block {i} {name}", qp[name].quantizer)
            points["v"] = _act_spec(f"block {i} v", qp["v"].quantizer, ("static",))
            probs = _act_spec(f"block {i} probs", qp["probs"].quantizer, ("static", "row"))
            if probs.signed:
                raise ExportError(f"block {i} probs: softmax probabilities must be quantized "
                                  "unsigned (uint8 codes for TFQAT_ATTN_PV)")
            points["probs"] = probs
            o_in = qp["o_in"].quantizer
            if o_in is not None:  # trained with o_proj's input quantized: the integer path is exact
                points["o_in"] = _act_spec(f"block {i} o_in", o_in)
                if not points["o_in"].dynamic or points["o_in"].adaptive:
                    raise ExportError(f"block {i} o_in: o_proj's input must be dynamic per-token with one "
                                      "bit width (the recipe's dynamic list)")
            elif oproj == "float":
                p = linears.pop("o")
                linears["o_float"] = p.dequantized().T.copy()
                linears["o_float_bias"] = p.bias
        else:
            for g, names in groups.items():
                linears[g] = np.concatenate([_np(lin[n].kernel) for n in names], axis=1)
                if lin[names[0]].bias is not None:
                    linears[g + "_bias"] = np.concatenate([_np(lin[n].bias) for n in names])
        layers.append(LayerSpec(norms, linears, points))
    o_in = {ls.points["o_in"].bits for ls in layers if "o_in" in ls.points}
    if o_in:  # o_proj's input was quantized in training: the integer o_proj is the exact one
        oproj = f"dynamic{max(o_in)}"
    recipe = getattr(model, "recipe", None)
    embed = _np(model.embed_tokens.embeddings)
    lm_head = None if model.lm_head is None else _np(model.lm_head.kernel)
    embed_q = head_q = None
    head = head if quantized else "float"
    if head == "int8":
        embed_q = quantize_rows_int8(embed)
        head_q = embed_q if lm_head is None else quantize_rows_int8(lm_head.T)
        if lm_head is not None and model.lm_head.bias is not None:
            head_q.bias = _np(model.lm_head.bias)
    return ModelSpec(
        cfg=cfg, quantized=quantized, embed=embed,
        positions=None if model.embed_positions is None else _np(model.embed_positions.embeddings),
        final_norm=_norm_params(model.final_norm),
        lm_head=lm_head, layers=layers, rho=rho, oproj=oproj,
        recipe=recipe.to_dict() if hasattr(recipe, "to_dict") else None,
        head=head, embed_q=embed_q, head_q=head_q,
    )


# ---- the TFQAT_* composites: TF bodies are the exact integer reference ---------------------------

_COMPOSITES: dict = {}


def _implements(name: str, **attrs) -> str:
    parts = [f'name: "{name}"', 'attr {key: "tfl_fusable_op" value {b: true}}']
    for key, value in attrs.items():
        kind = "f" if isinstance(value, float) else "i"
        parts.append(f'attr {{key: "{key}" value {{{kind}: {value}}}}}')
    return " ".join(parts)


def _composite(name: str, body, **attrs):
    """A cached ``tf.function`` that the converter fuses into one CUSTOM ``name`` op."""
    import tensorflow as tf

    key = (name, body.__name__, tuple(sorted(attrs.items())))
    if key not in _COMPOSITES:
        _COMPOSITES[key] = tf.function(body, experimental_implements=_implements(name, **attrs),
                                       autograph=False)
    return _COMPOSITES[key]


def _tf_unpack_int4(tf, packed, length: int):
    wi = tf.cast(packed, tf.int32)
    nib = tf.stack([tf.bitwise.bitwise_and(wi, 15), tf.bitwise.right_shift(wi, 4)], -1)
    shape = tf.concat([tf.shape(packed)[:-1], [-1]], 0)
    nib = tf.reshape(nib, shape)[..., :length]
    return nib - 16 * tf.cast(nib >= 8, tf.int32)


def _tf_quantize_rows(tf, x, bits, scales, dynamic: bool):
    is8 = tf.equal(bits, 8)
    qmax = tf.where(is8, 127.0, 7.0)  # [T]
    if dynamic:
        m = tf.reduce_max(tf.abs(x), axis=1)
        s = tf.where(m == 0.0, tf.ones_like(m), m / qmax)
    else:
        s = tf.where(is8, scales[0], scales[1])
    q = tf.clip_by_value(tf.round(x / s[:, None]), -qmax[:, None] - 1.0, qmax[:, None])
    return q, s


def qlinear_op(x, bits, act_scales, w, w_scales, bias=None, *, w_bits: int, k: int,
               act_mode: int = 0, group_size: int = 0):
    """TFQAT_QLINEAR (OPS.md): fused per-token quantize + int matmul + float epilogue.

    Args:
        group_size: 0 (default): ``w_scales`` is [N], one scale per output channel, and the
            epilogue is ``float(acc) * (xs * ws)``. G > 0, a multiple of 32: ``w_scales`` is
            [N, ceil(k / G)], one scale per output channel and group of G consecutive inputs (the
            last group may be partial), and the epilogue is the grouped one of OPS.md:
            ``s = 0; s = s + float(acc_g) * ws[:, g]`` for g in order, then ``* xs``, then ``+ bias``.
            Emitted as the op's ``group_size`` attr only when G > 0.

    Raises:
        ValueError: ``group_size`` is negative or not a multiple of 32.
    """
    import tensorflow as tf

    if group_size < 0 or group_size % 32:
        raise ValueError(f"qlinear_op: group_size={group_size} must be 0 (one scale per output "
                         "channel) or a positive multiple of 32")

    def body(x, bits, act_scales, w, w_scales, *rest):
        q, s = _tf_quantize_rows(tf, x, bits, act_scales, act_mode == 1)
        wi = _tf_unpack_int4(tf, w, k) if w_bits == 4 else tf.cast(w, tf.int32)
        qi = tf.cast(q, tf.int32)
        if group_size == 0:
            acc = tf.matmul(qi, wi, transpose_b=True)  # [T, N] exact int32
            y = tf.cast(acc, tf.float32) * (s[:, None] * w_scales[None, :])
        else:
            # Exact int32 sums per group (zero padding to whole groups adds nothing), then the
            # float32 sum over groups from 0.0 in group order. foldl is a loop, one add per step:
            # neither reduce_sum (no order promised) nor an unrolled chain of adds (grappler
            # rewrites it into AddN, which reorders, and drops the add of zeros) keeps that order.
            ng = -(-k // group_size)
            pad = [[0, 0], [0, ng * group_size - k]]
            qg = tf.transpose(tf.reshape(tf.pad(qi, pad), [-1, ng, group_size]), [1, 0, 2])
            wg = tf.transpose(tf.reshape(tf.pad(wi, pad), [-1, ng, group_size]), [1, 0, 2])
            acc = tf.matmul(qg, wg, transpose_b=True)  # [ng, T, N]
            p = tf.cast(acc, tf.float32) * tf.transpose(w_scales)[:, None, :]
            y = tf.foldl(lambda acc_s, p_g: acc_s + p_g, p, initializer=tf.zeros_like(p[0]))
            y = y * s[:, None]
        return y + rest[0][None, :] if rest else y

    body.__name__ = "qlinear_bias" if bias is not None else "qlinear"
    grouping = {"group_size": group_size} if group_size else {}
    fn = _composite("TFQAT_QLINEAR", body, w_bits=w_bits, k=k, act_mode=act_mode, **grouping)
    args = (x, bits, act_scales, w, w_scales) + ((bias,) if bias is not None else ())
    return fn(*args)


def quantize_op(x, bits, scales, mode: int = 0):
    """TFQAT_QUANTIZE: int8 codes [T, K] and the per-token scale [T]; ``mode`` 0 static (scales
    by bit width), 1 dynamic (``max|row| / qmax``; ``scales`` is then ignored)."""
    import tensorflow as tf

    def quantize(x, bits, scales):
        q, s = _tf_quantize_rows(tf, x, bits, scales, mode == 1)
        return tf.cast(q, tf.int8), s

    return _composite("TFQAT_QUANTIZE", quantize, mode=mode)(x, bits, scales)


def select_bits_topk_op(importance, rho: float):
    """TFQAT_SELECT_BITS mode 0: the top ``rho*T`` tokens get 8 bits (token_bits.select_token_bits)."""
    import tensorflow as tf

    from tfqat.quant.token_bits import select_token_bits

    def select_bits_topk(importance):
        return tf.cast(select_token_bits(importance[None, :], float(np.float32(rho)))[0], tf.int32)

    return _composite("TFQAT_SELECT_BITS", select_bits_topk, mode=0,
                      rho=float(np.float32(rho)))(importance)


def select_bits_threshold_op(importance, threshold):
    """TFQAT_SELECT_BITS mode 1: ``importance >= threshold ? 8 : 4``."""
    import tensorflow as tf

    def select_bits_threshold(importance, threshold):
        return tf.where(importance >= threshold[0], 8, 4)

    return _composite("TFQAT_SELECT_BITS", select_bits_threshold, mode=1)(importance, threshold)


def attn_qk_op(q_codes, q_scales, k_cache, k_scales, length, *, kv_bits: int, d: int,
               q_layout: int = 0):
    """TFQAT_ATTN_QK: scores [H, T, S_cap], -inf outside the causal valid part. ``q_layout=1``:
    q_codes is [T, H, D] (the quantize op's rows as they are; no TRANSPOSE in the graph)."""
    import tensorflow as tf

    def attn_qk(q, qs, kc, ks, length):
        if q_layout == 1:
            q = tf.transpose(q, [1, 0, 2])  # [H, T, D]
        h, t = tf.shape(q)[0], tf.shape(q)[1]
        k = _tf_unpack_int4(tf, kc, d) if kv_bits == 4 else tf.cast(kc, tf.int32)
        hkv, s_cap = tf.shape(k)[0], tf.shape(k)[1]
        qg = tf.reshape(tf.cast(q, tf.int32), [hkv, -1, d])  # [Hkv, G*T, D]
        acc = tf.reshape(tf.matmul(qg, k, transpose_b=True), [h, t, s_cap])
        scores = tf.cast(acc, tf.float32) * (qs[None, :, None] * ks[None, None, :])
        pos = length[0] - t + tf.range(t)  # absolute position of each query
        valid = tf.range(s_cap)[None, :] <= pos[:, None]  # [T, S_cap]
        return tf.where(valid[None], scores, tf.constant(-np.inf, tf.float32))

    attrs = {"q_layout": 1} if q_layout == 1 else {}
    return _composite("TFQAT_ATTN_QK", attn_qk, kv_bits=kv_bits, d=d, **attrs)(
        q_codes, q_scales, k_cache, k_scales, length)


def attn_pv_op(p_codes, p_scale, v_cache, v_rowbits, v_scales, length, *, kv_bits: int, d: int,
               p_max: int = 0, p_mode: int = 0, return_p_scales: bool = False):
    """TFQAT_ATTN_PV: [H, T, D] from uint8 probabilities and the (grouped) V cache. ``p_max > 0``:
    p_codes is the float32 softmax output and the op quantizes it, ``clamp(round(p / scale),
    0, p_max)`` (no ROUND / clip / CAST over [H, T, S] in the graph).

    Args:
        p_max: 0 (default): ``p_codes`` is uint8 codes. 1..255: float32 probabilities, quantized
            by the op to codes in [0, p_max].
        p_mode: 0 (default): one scale, ``p_scale`` [1], for every probability row. 1 (needs
            ``p_max``): a scale per row (h, t), ``m / p_max`` with ``m`` the row's max over the
            ``length`` valid positions (NaN and negative entries count as 0), or 1.0 when
            ``m == 0``; ``p_scale`` is then ignored and may be None. Emitted as the op's
            ``p_mode`` attr only when 1, so p_mode=0 exports are unchanged.
        return_p_scales: also return the op's output 1, the [H, T] float32 scale each
            probability row used (``p_scale[0]`` everywhere with p_mode=0), e.g. to weigh token
            importance with exactly the codes the op used.

    Returns:
        out [H, T, D] float32, or ``(out, p_scales)`` with ``return_p_scales``.

    Raises:
        ValueError: ``p_mode`` is not 0 or 1, or is 1 without ``p_max``.
    """
    import tensorflow as tf

    if p_mode not in (0, 1):
        raise ValueError(f"attn_pv_op: p_mode={p_mode} must be 0 (one static p_scale) or 1 (a "
                         "dynamic scale per probability row)")
    if p_mode == 1 and not 1 <= p_max <= 255:
        raise ValueError(f"attn_pv_op: p_mode=1 needs float probabilities in: set p_max in "
                         f"[1, 255], got p_max={p_max}")
    if p_scale is None:
        if p_mode == 0:
            raise ValueError("attn_pv_op: p_scale is required with p_mode=0")
        p_scale = tf.zeros([1], tf.float32)  # input 1 is not read with p_mode=1

    def attn_pv(p, ps, vc, rowbits, vs, length):
        h, t, s_cap = tf.shape(p)[0], tf.shape(p)[1], tf.shape(p)[2]
        valid = tf.range(s_cap) < length[0]
        if p_mode == 1:
            # p > 0 is false for NaN: NaN, negatives and positions >= length become 0, which
            # changes no max and quantizes to code 0 as the op's codes do.
            pv = tf.where(tf.logical_and(valid[None, None, :], p > 0.0), p, 0.0)
            m = tf.reduce_max(pv, axis=-1)  # [H, T]
            # divide_no_nan: grappler rewrites a division by a constant into a multiplication
            # by its reciprocal (not the true division of the contract); DivNoNan it leaves.
            rows = tf.where(m == 0.0, tf.ones_like(m), tf.math.divide_no_nan(m, float(p_max)))
            q = tf.round(pv / rows[:, :, None])
            p = tf.where(q > 0.0, tf.minimum(q, float(p_max)), 0.0)  # NaN (inf / inf) -> 0
            scale = rows[:, :, None]  # [H, T, 1]
        else:
            if p_max:
                q = tf.round(p / ps[0])
                p = tf.where(q > 0.0, tf.minimum(q, float(p_max)), 0.0)  # NaN -> 0, as the op
            rows = tf.fill([h, t], ps[0]) if return_p_scales else None
            scale = ps[0]
        v = _tf_unpack_int4(tf, vc, d) if kv_bits == 4 else tf.cast(vc, tf.int32)
        hkv = tf.shape(v)[0]
        g8 = tf.cast(tf.logical_and(valid, tf.equal(rowbits, 8)), tf.int32)
        g4 = tf.cast(tf.logical_and(valid, tf.equal(rowbits, 4)), tf.int32)
        pi = tf.reshape(tf.cast(p, tf.int32), [hkv, -1, s_cap])
        acc8 = tf.reshape(tf.matmul(pi * g8[None, None, :], v), [h, t, d])
        acc4 = tf.reshape(tf.matmul(pi * g4[None, None, :], v), [h, t, d])
        out = (tf.cast(acc8, tf.float32) * (scale * vs[0])
               + tf.cast(acc4, tf.float32) * (scale * vs[1]))
        return (out, rows) if return_p_scales else out

    if return_p_scales:  # a second output: another function under the same attrs
        attn_pv.__name__ = "attn_pv_with_p_scales"
    attrs = {"p_max": p_max} if p_max else {}
    if p_mode:
        attrs["p_mode"] = p_mode
    return _composite("TFQAT_ATTN_PV", attn_pv, kv_bits=kv_bits, d=d, **attrs)(
        p_codes, p_scale, v_cache, v_rowbits, v_scales, length)


# ---- the inference module ------------------------------------------------------------------------

def _kv_bits(point: ActSpec) -> int:
    """Cache storage: packed int4 only when every row of that point is 4-bit."""
    return 4 if (point.bits == 4 and not point.adaptive) else 8


def build_module(spec: ModelSpec):
    """The ``tf.Module`` with ``prefill`` and ``decode`` (see the module docstring)."""
    import tensorflow as tf

    from tfqat.models.rope import rope_tables

    cfg = spec.cfg
    H, Hkv, D = cfg.heads, cfg.num_kv_heads, cfg.head_dim
    G, L, S_cap = H // Hkv, cfg.layers, cfg.max_positions
    q_spec = spec.quantized
    adaptive = q_spec and spec.rho is not None

    class InferenceModule(tf.Module):
        def __init__(self):
            super().__init__(name="tfqat_inference")
            var = lambda a, name: tf.Variable(np.ascontiguousarray(a), trainable=False, name=name)  # noqa
            self.head_int8 = spec.head == "int8"
            if self.head_int8:  # int8 rows + per-row scales; tied: one table serves both
                self.embed = var(spec.embed_q.codes, "embed_codes")
                self.embed_s = var(spec.embed_q.scales, "embed_scales")
                if spec.head_q is spec.embed_q:
                    self.head_w, self.head_ws = self.embed, self.embed_s
                else:
                    self.head_w = var(spec.head_q.codes, "lm_head_codes")
                    self.head_ws = var(spec.head_q.scales, "lm_head_scales")
                self.head_b = None if spec.head_q.bias is None else var(spec.head_q.bias, "lm_head_b")
                self.head_act = var(np.ones(2, np.float32), "lm_head_act_scales")  # unused (dynamic)
                self.lm_head = None
            else:
                self.embed = var(spec.embed, "embed")
                self.lm_head = None if spec.lm_head is None else var(spec.lm_head, "lm_head")
            self.positions = None if spec.positions is None else var(spec.positions, "positions")
            self.final_norm = {k: var(v, f"final_norm_{k}") for k, v in spec.final_norm.items()
                               if k != "eps"}
            if cfg.arch == "llama":
                cos, sin = rope_tables(D, cfg.max_positions, cfg.rope_theta)
                self.cos = var(cos.astype(np.float32), "rope_cos")
                self.sin = var(sin.astype(np.float32), "rope_sin")
            self.layers = []
            for i, ls in enumerate(spec.layers):
                lv: dict = {"norms": {n: {k: var(v, f"l{i}_{n}_{k}") for k, v in p.items() if k != "eps"}
                                      for n, p in ls.norms.items()}}
                lin = {}
                for g, p in ls.linears.items():
                    if p is None:
                        continue
                    if isinstance(p, QLinearSpec):
                        lin[g] = {"w": var(p.stored(), f"l{i}_{g}_w"),
                                  "ws": var(p.scales, f"l{i}_{g}_ws"),
                                  "b": None if p.bias is None else var(p.bias, f"l{i}_{g}_b")}
                    else:
                        lin[g] = var(p, f"l{i}_{g}")
                lv["lin"] = lin
                lv["act"] = {n: var(a.scales, f"l{i}_{n}_scales") for n, a in ls.points.items()}
                if "probs" in ls.points:
                    lv["ps"] = var(ls.points["probs"].scales[:1], f"l{i}_probs_scale")
                self.layers.append(lv)

        # -- pieces -------------------------------------------------------------------------
        def _norm(self, x, params, eps):
            if "gamma" in params:
                mean, var_ = tf.nn.moments(x, axes=[-1], keepdims=True)
                return (x - mean) * tf.math.rsqrt(var_ + eps) * params["gamma"] + params["beta"]
            ms = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
            return x * tf.math.rsqrt(ms + eps) * params["scale"]

        def _rope(self, x, positions):  # x [T, heads, D]
            cos = tf.gather(self.cos, positions)[:, None, :]
            sin = tf.gather(self.sin, positions)[:, None, :]
            x1, x2 = tf.split(x, 2, axis=-1)
            return x * cos + tf.concat([-x2, x1], axis=-1) * sin

        def _qlin(self, i, group, x, bits, point):
            ls, lv = spec.layers[i], self.layers[i]
            outs = []
            names = [g for g in ls.linears if g == group or g.startswith(group + ":")]
            for g in names:
                p, v = ls.linears[g], lv["lin"][g]
                grouped = {"group_size": p.group_size} if p.group_size else {}
                if point is None:  # o_proj: dynamic per-token 8-bit
                    outs.append(qlinear_op(x, bits, lv["act"]["attn_in"], v["w"], v["ws"], v["b"],
                                           w_bits=p.w_bits, k=p.k, act_mode=1, **grouped))
                else:
                    a = ls.points[point]
                    outs.append(qlinear_op(x, bits, lv["act"][point], v["w"], v["ws"], v["b"],
                                           w_bits=p.w_bits, k=p.k, act_mode=int(a.dynamic), **grouped))
            return outs[0] if len(outs) == 1 else tf.concat(outs, axis=-1)

        def _flin(self, i, group, x):
            lin = self.layers[i]["lin"]
            y = tf.matmul(x, lin[group])
            return y + lin[group + "_bias"] if group + "_bias" in lin else y

        def _mlp_act(self, gu):
            if cfg.arch == "llama":
                g, u = tf.split(gu, 2, axis=-1)
                return tf.nn.silu(g) * u
            return tf.nn.gelu(gu, approximate=True)

        def _embed(self, tokens, positions):
            x = tf.gather(self.embed, tokens)  # [T, C]
            if self.head_int8:  # GATHER of int8 rows, dequantized with their row scales
                x = tf.cast(x, tf.float32) * tf.gather(self.embed_s, tokens)[:, None]
            if self.positions is not None:
                x = x + tf.gather(self.positions, positions)
            return x

        def _logits(self, x):
            x = self._norm(x, self.final_norm, spec.final_norm["eps"])
            if self.head_int8:  # w8 QLINEAR, dynamic per-token int8 activations
                bits = tf.fill([tf.shape(x)[0]], tf.constant(8, tf.int32))
                return qlinear_op(x, bits, self.head_act, self.head_w, self.head_ws, self.head_b,
                                  w_bits=8, k=spec.head_q.k, act_mode=1)
            if self.lm_head is None:
                return tf.matmul(x, self.embed, transpose_b=True)
            return tf.matmul(x, self.lm_head)

        # -- float layer (model_float.tflite) -----------------------------------------------
        def _float_layer(self, i, x, positions, cache):
            ls = spec.layers[i]
            t = tf.shape(x)[0]
            h = self._norm(x, self.layers[i]["norms"]["attn_norm"], ls.norms["attn_norm"]["eps"])
            qkv = self._flin(i, "qkv", h)
            q = tf.reshape(qkv[:, : H * D], [t, H, D])
            k = tf.reshape(qkv[:, H * D: (H + Hkv) * D], [t, Hkv, D])
            v = tf.reshape(qkv[:, (H + Hkv) * D:], [t, Hkv, D])
            if cfg.arch == "llama":
                q, k = self._rope(q, positions), self._rope(k, positions)
            k_new = tf.transpose(k, [1, 0, 2])  # [Hkv, T, D]
            v_new = tf.transpose(v, [1, 0, 2])
            if cache is None:
                kc, vc, s = k_new, v_new, t
                valid = tf.range(t)[None, :] <= tf.range(t)[:, None]  # [T, S]
            else:
                pos = positions[0]
                kc = _dus(cache["k"], k_new, pos)
                vc = _dus(cache["v"], v_new, pos)
                s = S_cap
                valid = tf.range(S_cap)[None, :] <= positions[:, None]
            qg = tf.reshape(tf.transpose(q, [1, 0, 2]), [Hkv, G * t, D])
            scores = tf.matmul(qg, kc, transpose_b=True) / math.sqrt(D)  # [Hkv, G*T, S]
            scores = tf.reshape(scores, [H, t, s])
            scores = tf.where(valid[None], scores, -1e9)
            p = tf.nn.softmax(scores, axis=-1)
            self.last_importance = tf.reduce_sum(p[:, :, 0], axis=0)  # token pruning; unused otherwise
            o = tf.matmul(tf.reshape(p, [Hkv, G * t, s]), vc)  # [Hkv, G*T, D]
            o = tf.reshape(tf.transpose(tf.reshape(o, [H, t, D]), [1, 0, 2]), [t, H * D])
            x = x + self._flin(i, "o", o)
            h = self._norm(x, self.layers[i]["norms"]["mlp_norm"], ls.norms["mlp_norm"]["eps"])
            x = x + self._flin(i, "down", self._mlp_act(self._flin(i, "gate_up", h)))
            return x, {"k": k_new, "v": v_new}

        # -- quantized layer (model.tflite) ---------------------------------------------------
        def _quant_layer(self, i, x, positions, bits_in, cache, threshold):
            ls, lv = spec.layers[i], self.layers[i]
            pts = ls.points
            t = tf.shape(x)[0]
            fixed = lambda b: tf.fill([t], tf.constant(b, tf.int32))  # noqa: E731
            b_in = lambda n: bits_in if (pts[n].adaptive and bits_in is not None) else fixed(pts[n].bits)  # noqa

            h = self._norm(x, lv["norms"]["attn_norm"], ls.norms["attn_norm"]["eps"])
            qkv = self._qlin(i, "qkv", h, b_in("attn_in"), "attn_in")
            q = tf.reshape(qkv[:, : H * D], [t, H, D])
            k = tf.reshape(qkv[:, H * D: (H + Hkv) * D], [t, Hkv, D])
            v = qkv[:, (H + Hkv) * D:]
            if cfg.arch == "llama":
                q, k = self._rope(q, positions), self._rope(k, positions)
            qc, qs = quantize_op(tf.reshape(q, [t, H * D]), b_in("q"), lv["act"]["q"], int(pts["q"].dynamic))
            kc, ks = quantize_op(tf.reshape(k, [t, Hkv * D]), b_in("k"), lv["act"]["k"], int(pts["k"].dynamic))
            qc = tf.reshape(qc, [t, H, D])  # ATTN_QK q_layout=1 reads [T, H, D] as it is
            k_new = _store_rows(tf, tf.transpose(tf.reshape(kc, [t, Hkv, D]), [1, 0, 2]),
                                _kv_bits(pts["k"]))
            if cache is None:
                k_all, ks_all, length = k_new, ks, tf.reshape(t, [1])
            else:
                pos = positions[0]
                k_all = _dus(cache["k"], k_new, pos)
                ks_all = _dus(cache["ks"], ks, pos)
                length = positions + 1
            scores = attn_qk_op(qc, qs * np.float32(1.0 / math.sqrt(D)),
                                _as_uint8(tf, k_all, _kv_bits(pts["k"])), ks_all, length,
                                kv_bits=_kv_bits(pts["k"]), d=D, q_layout=1)
            p = tf.nn.softmax(scores, axis=-1)  # [H, T, S]
            ps = lv["ps"]
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
            # importance of token t: attention paid to token 0, summed over heads (Eq. 14)
            importance = tf.reduce_sum(p0_codes * p_row, axis=0)  # [T]
            self.last_importance = importance  # read by token pruning (tfqat.agile.prune_export)
            thr = None
            if adaptive:
                if cache is None:
                    own = select_bits_topk_op(importance, spec.rho)
                    inf = tf.constant(np.inf, tf.float32)
                    thr = tf.reduce_min(tf.where(tf.equal(own, 8), importance, inf))
                else:
                    own = select_bits_threshold_op(importance, threshold[i: i + 1])
            else:
                own = None
            b_own = lambda n: own if (pts[n].adaptive and own is not None) else fixed(pts[n].bits)  # noqa
            vb = b_own("v")
            # vs (the scale each V row used) is redundant with vb + v_scales, but it is returned:
            # an output no node consumes is left unallocated by the delegate partitioning
            # (TFQAT_QUANTIZE would write through a null pointer).
            vc, vs = quantize_op(v, vb, lv["act"]["v"])
            v_new = _store_rows(tf, tf.transpose(tf.reshape(vc, [t, Hkv, D]), [1, 0, 2]),
                                _kv_bits(pts["v"]))
            if cache is None:
                v_all, vb_all = v_new, vb
            else:
                v_all = _dus(cache["v"], v_new, positions[0])
                vb_all = _dus(cache["vb"], vb, positions[0])
            o = attn_pv_op(p, ps, _as_uint8(tf, v_all, _kv_bits(pts["v"])),
                           vb_all, lv["act"]["v"], length,
                           kv_bits=_kv_bits(pts["v"]), d=D, p_max=int(pmax),
                           **({"p_mode": 1} if pts["probs"].dynamic else {}))  # [H, T, D]
            o = tf.reshape(tf.transpose(o, [1, 0, 2]), [t, H * D])
            if "o_float" in lv["lin"]:
                o = tf.matmul(o, lv["lin"]["o_float"])
                if "o_float_bias" in lv["lin"]:
                    o = o + lv["lin"]["o_float_bias"]
            elif "o_in" in pts:
                o = self._qlin(i, "o", o, fixed(pts["o_in"].bits), "o_in")
            else:
                o = self._qlin(i, "o", o, fixed(8), None)
            x = x + o
            h = self._norm(x, lv["norms"]["mlp_norm"], ls.norms["mlp_norm"]["eps"])
            a = self._mlp_act(self._qlin(i, "gate_up", h, b_own("mlp_in"), "mlp_in"))
            x = x + self._qlin(i, "down", a, b_own("mlp_act"), "mlp_act")
            rows = {"k": k_new, "ks": ks, "v": v_new, "vb": vb, "vs": vs}
            return x, rows, own, thr

        # -- signatures -----------------------------------------------------------------------
        def run(self, tokens, positions, cache_in=None, thresholds=None):
            x = self._embed(tokens, positions)
            outs: dict = {}
            bits, thrs = None, []
            if adaptive:
                bits = tf.fill(tf.shape(tokens), tf.constant(8, tf.int32))  # layer 0: 8-bit
            for i in range(L):
                cache = None if cache_in is None else cache_in[i]
                if q_spec:
                    x, rows, own, thr = self._quant_layer(i, x, positions, bits, cache, thresholds)
                    if adaptive:
                        bits = own
                        if thr is not None:
                            thrs.append(thr)
                else:
                    x, rows = self._float_layer(i, x, positions, cache)
                for key, val in rows.items():
                    outs[f"{key}_{i}"] = val
            outs["logits"] = self._logits(x)
            if thrs:
                outs["thresholds"] = tf.stack(thrs)
            return outs

    module = InferenceModule()

    def prefill(tokens):
        positions = tf.range(tf.shape(tokens)[0])
        return module.run(tokens, positions)

    cache_specs = decode_cache_specs(spec)
    names = ["token", "position"] + [n for n, _, _ in cache_specs]

    def decode(*args):
        feeds = dict(zip(names, args))
        cache_in = []
        for i in range(L):
            keys = ("k", "v") if not q_spec else ("k", "ks", "v", "vb")
            cache_in.append({k: feeds[f"{k}_cache_{i}"] for k in keys})
        thresholds = feeds.get("thresholds")
        return module.run(feeds["token"], feeds["position"], cache_in, thresholds)

    module.prefill = tf.function(
        prefill, input_signature=[tf.TensorSpec([None], tf.int32, name="tokens")])
    module.decode = tf.function(decode, input_signature=[
        tf.TensorSpec([1], tf.int32, name="token"), tf.TensorSpec([1], tf.int32, name="position")
    ] + [tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype in cache_specs])
    return module


def _dus(cache, rows, pos):
    """Write ``rows`` into ``cache`` at position ``pos`` (axis 1 for [Hkv, S, .], axis 0 for [S])."""
    import tensorflow as tf

    zero = tf.zeros([], tf.int32)
    start = [zero, pos] + [zero] * (len(cache.shape) - 2) if len(cache.shape) > 1 else [pos]
    from tensorflow.compiler.tf2xla.python import xla  # -> TFLite DYNAMIC_UPDATE_SLICE

    return xla.dynamic_update_slice(cache, rows, tf.stack(start))


def _store_rows(tf, codes, kv_bits: int):
    """int8 codes [Hkv, T, D] -> cache rows: int8, or packed int4 uint8 [Hkv, T, D/2]."""
    if kv_bits == 8:
        return codes
    # Packed int4 bytes held as int8 (the same bits): the converter has no uint8
    # DYNAMIC_UPDATE_SLICE, so the cache tensors are int8 and _as_uint8 views them for the op.
    c = tf.cast(codes, tf.int32)
    lo = tf.math.floormod(c[..., 0::2], 16)
    hi = tf.math.floormod(c[..., 1::2], 16)
    b = lo + 16 * hi
    return tf.cast(b - 256 * tf.cast(b >= 128, tf.int32), tf.int8)


def _as_uint8(tf, cache, kv_bits: int):
    """The packed-int4 cache (int8 bytes) as the uint8 tensor TFQAT_ATTN_* take (a CAST)."""
    return tf.cast(cache, tf.uint8) if kv_bits == 4 else cache


def decode_cache_specs(spec: ModelSpec) -> list:
    """``(name, shape, dtype)`` of the decode signature's cache inputs."""
    import tensorflow as tf

    cfg = spec.cfg
    Hkv, D, S = cfg.num_kv_heads, cfg.head_dim, cfg.max_positions
    out = []
    for i, ls in enumerate(spec.layers):
        if not spec.quantized:
            out += [(f"k_cache_{i}", [Hkv, S, D], tf.float32), (f"v_cache_{i}", [Hkv, S, D], tf.float32)]
            continue
        for key in ("k", "v"):
            b = _kv_bits(ls.points[key])
            shape = [Hkv, S, D] if b == 8 else [Hkv, S, (D + 1) // 2]
            out.append((f"{key}_cache_{i}", shape, tf.int8))  # int4: packed bytes as int8
            out.append((f"{key}{'s' if key == 'k' else 'b'}_cache_{i}", [S],
                        tf.float32 if key == "k" else tf.int32))
    if spec.quantized and spec.rho is not None:
        out.append(("thresholds", [cfg.layers], tf.float32))
    return out


# ---- conversion --------------------------------------------------------------------------------

def convert(spec: ModelSpec, module=None, what: str = "") -> bytes:
    """The .tflite bytes of ``spec`` (SavedModel with two signatures -> TFLite converter);
    ``module``: an already built variant of :func:`build_module`'s (e.g. a pruned prefill)."""
    import tensorflow as tf

    module = module if module is not None else build_module(spec)
    with tempfile.TemporaryDirectory(prefix="tfqat-export-") as tmp:
        tf.saved_model.save(module, tmp, signatures={
            "prefill": module.prefill.get_concrete_function(),
            "decode": module.decode.get_concrete_function()})
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["prefill", "decode"])
        converter.allow_custom_ops = spec.quantized
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            return converter.convert()
        except Exception as e:  # the converter's messages are pages long
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"TFLite conversion{what} failed: {first}") from e


# ---- flatbuffer inspection and checks ------------------------------------------------------------

_TYPE_NAMES = None


def _type_names() -> dict:
    global _TYPE_NAMES
    if _TYPE_NAMES is None:
        from ai_edge_litert import schema_py_generated as schema

        _TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items()
                       if not k.startswith("_")}
    return _TYPE_NAMES


def _op_names() -> dict:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def inspect_tflite(data: bytes) -> dict:
    """Op list, signatures, tensor types and constant sizes of a .tflite (no TensorFlow needed).

    Returns a dict: ``signatures`` {key: {"inputs": {name: [type, shape]}, "outputs": ...,
    "ops": {op: count}}}, ``ops`` (all subgraphs), ``tensor_types`` {type: count},
    ``const_bytes`` {type: bytes}, ``qlinear`` (one entry per TFQAT_QLINEAR: attrs, weight
    type/shape, whether the weights are a constant buffer).
    """
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ExportError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    names, tnames = _op_names(), _type_names()
    codes = []
    for oc in model.operatorCodes:
        b = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        codes.append(oc.customCode.decode() if b == schema.BuiltinOperator.CUSTOM and oc.customCode
                     else names.get(b, str(b)))
    buf_len = [0 if b.data is None else len(b.data) for b in model.buffers]
    info: dict = {"signatures": {}, "ops": {}, "tensor_types": {}, "const_bytes": {}, "qlinear": []}
    sub_ops = []
    for sg in model.subgraphs:
        ops: dict = {}
        for op in sg.operators or []:
            name = codes[op.opcodeIndex]
            ops[name] = ops.get(name, 0) + 1
            info["ops"][name] = info["ops"].get(name, 0) + 1
            if name == "TFQAT_QLINEAR":
                attrs = flexbuffers.Loads(bytes(op.customOptions)) if op.customOptions is not None else {}
                w = sg.tensors[op.inputs[3]]
                info["qlinear"].append({
                    "attrs": {k: attrs.get(k) for k in ("w_bits", "k", "act_mode")},
                    "w_type": tnames[w.type], "w_shape": [int(d) for d in w.shape],
                    "w_const": bool(w.buffer and buf_len[w.buffer]),
                    "w_bytes": buf_len[w.buffer] if w.buffer else 0})
        sub_ops.append(ops)
        for t in sg.tensors or []:
            tn = tnames[t.type]
            info["tensor_types"][tn] = info["tensor_types"].get(tn, 0) + 1
    seen = set()
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            if t.buffer and buf_len[t.buffer] and t.buffer not in seen:
                seen.add(t.buffer)
                tn = tnames[t.type]
                info["const_bytes"][tn] = info["const_bytes"].get(tn, 0) + buf_len[t.buffer]
    for sd in model.signatureDefs or []:
        sg = model.subgraphs[sd.subgraphIndex]

        def desc(maps):
            return {m.name.decode(): [tnames[sg.tensors[m.tensorIndex].type],
                                      [int(d) for d in (sg.tensors[m.tensorIndex].shapeSignature
                                                        if sg.tensors[m.tensorIndex].shapeSignature is not None
                                                        else sg.tensors[m.tensorIndex].shape)]]
                    for m in maps or []}

        info["signatures"][sd.signatureKey.decode()] = {
            "inputs": desc(sd.inputs), "outputs": desc(sd.outputs), "ops": sub_ops[sd.subgraphIndex]}
    return info


def expected_ops(spec: ModelSpec) -> dict:
    """TFQAT op counts per signature that a correct export of ``spec`` must contain."""
    per_layer = {"TFQAT_ATTN_QK": 1, "TFQAT_ATTN_PV": 1, "TFQAT_QUANTIZE": 3, "TFQAT_QLINEAR": 0}
    total = {k: 0 for k in per_layer}
    for ls in spec.layers:
        n_lin = sum(1 for g, p in ls.linears.items() if isinstance(p, QLinearSpec))
        for k, v in per_layer.items():
            total[k] += v
        total["TFQAT_QLINEAR"] += n_lin
    if spec.head == "int8":
        total["TFQAT_QLINEAR"] += 1
    if spec.rho is not None:
        total["TFQAT_SELECT_BITS"] = spec.cfg.layers
    return total


def check_export(data: bytes, spec: ModelSpec) -> dict:
    """Fail loudly (:class:`ExportError`) unless the flatbuffer is what ``spec`` must produce.

    Checks: both signatures; no FAKE_QUANT, no Flex (Select TF) or other foreign custom ops;
    the float model has no custom op at all; the quantized one has exactly the expected
    TFQAT op counts in each signature (a composite the converter inlined instead of fusing
    shows up as missing ops), no integer BATCH_MATMUL / FULLY_CONNECTED (an inlined body),
    every TFQAT_QLINEAR's weights a constant buffer of the right type and packed size
    (uint8 [N, ceil(K/2)] for 4-bit), and no float32 constant as large as a projection.
    """
    info = inspect_tflite(data)
    sigs = info["signatures"]
    for key in ("prefill", "decode"):
        if key not in sigs:
            raise ExportError(f"export check: signature {key!r} missing (got {sorted(sigs)})")
    ops = info["ops"]
    if "FAKE_QUANT" in ops:
        raise ExportError("export check: FAKE_QUANT ops in the model (training graph leaked in)")
    foreign = [o for o in ops if o not in _op_names().values() and not o.startswith("TFQAT_")]
    if foreign:
        raise ExportError(f"export check: unexpected custom/Flex ops {sorted(foreign)}")
    custom = [o for o in ops if o.startswith("TFQAT_")]
    if not spec.quantized:
        if custom:
            raise ExportError(f"export check: the float model contains custom ops {custom}")
        return info
    want = expected_ops(spec)
    for key in ("prefill", "decode"):
        got = {k: v for k, v in sigs[key]["ops"].items() if k.startswith("TFQAT_")}
        for name, n in want.items():
            if got.get(name, 0) != n:
                raise ExportError(f"export check: signature {key} has {got.get(name, 0)} {name} "
                                  f"ops, expected {n} (a composite was inlined instead of fused?)")
    for q in info["qlinear"]:
        a = q["attrs"]
        n, k = q["w_shape"][0], a["k"]
        if a["w_bits"] == 4:
            ok = q["w_type"] == "uint8" and q["w_shape"] == [n, (k + 1) // 2]
        else:
            ok = q["w_type"] == "int8" and q["w_shape"] == [n, k]
        if not ok or not q["w_const"] or q["w_bytes"] != n * (q["w_shape"][1]):
            raise ExportError(f"export check: TFQAT_QLINEAR weights are {q['w_type']} {q['w_shape']} "
                              f"(constant: {q['w_const']}) for w_bits={a['w_bits']} k={k}; "
                              "int4 weights must be packed uint8 constants")
    # float constants: embeddings, lm_head, norms, scales, RoPE tables, (o_float); no projection
    cfg = spec.cfg
    if spec.head == "int8":
        allowed = spec.head_q.n * (1 if spec.head_q is spec.embed_q else 2) + 2
        allowed += 0 if spec.head_q.bias is None else spec.head_q.n
    else:
        # A tied float table is stored twice: the GATHER table and the head's FULLY_CONNECTED
        # weights (the converter does not share constant buffers between ops).
        allowed = spec.embed.size * (2 if spec.lm_head is None else 1)
        allowed += 0 if spec.lm_head is None else spec.lm_head.size
    allowed += 0 if spec.positions is None else spec.positions.size
    allowed += 2 * cfg.max_positions * cfg.head_dim  # RoPE
    for ls in spec.layers:
        for g, p in ls.linears.items():
            if isinstance(p, QLinearSpec):
                allowed += p.scales.size + (0 if p.bias is None else p.n)
            elif p is not None:
                allowed += p.size
        allowed += 8 * 2 + 4 * cfg.hidden
    allowed += 2 * cfg.hidden + 4096  # final norm, small constants
    got_f32 = info["const_bytes"].get("float32", 0)
    if got_f32 > 4 * allowed * 1.05:
        raise ExportError(f"export check: {got_f32} bytes of float32 constants, expected at most "
                          f"{4 * allowed}; a projection was stored in float")
    return info


# ---- writing ------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_models(student, teacher=None, out_dir=".", tokenizer_json: Optional[str] = None,
                  rho: Optional[float] = None, oproj: str = "float", extra: Optional[dict] = None,
                  check: bool = True, head: str = "float", prune: Optional[str] = None) -> dict:
    """Convert, check and write ``model.tflite`` (+ ``model_float.tflite`` when ``teacher``),
    ``tokenizer.json`` and ``manifest.json`` into ``out_dir`` (each file atomically, the manifest
    last, so a present manifest means a complete export).

    ``prune``: an Agile-Quant token-pruning schedule (``"progressive:0.25"``, ``"0.1,0.1,0"``)
    applied in both files' prefill; their signatures then change (``kv_len``, see
    :mod:`tfqat.agile.prune_export`). A bad schedule raises a one-line :class:`ExportError`.

    Returns:
        ``{"model": path, "model_float": path or None, "manifest": path, "manifest_data": dict}``.
    """
    from tfqat.config import config_to_dict

    out = Path(out_dir)
    t0 = time.perf_counter()
    spec = spec_from_model(student, quantized=True, rho=rho, oproj=oproj, head=head)
    ratios = None
    if prune is not None:
        from tfqat.agile.prune_export import check_schedule, convert_pruned

        ratios = check_schedule(prune, spec.cfg.layers, error=ExportError)
    _convert = convert if ratios is None else (lambda s: convert_pruned(s, ratios))
    data = _convert(spec)
    info = check_export(data, spec) if check else inspect_tflite(data)
    files = {"model": ("model.tflite", data, info)}
    if teacher is not None:
        fspec = spec_from_model(teacher, quantized=False)
        fdata = _convert(fspec)
        finfo = check_export(fdata, fspec) if check else inspect_tflite(fdata)
        files["model_float"] = ("model_float.tflite", fdata, finfo)
    tok_bytes = None
    if tokenizer_json is not None:
        tok_bytes = Path(tokenizer_json).read_bytes()
    manifest: dict = {
        "format": "tfqat-export", "format_version": FORMAT_VERSION,
        "config": config_to_dict(spec.cfg), "recipe": spec.recipe,
        "token_adaptive": None if spec.rho is None else {
            "rho": spec.rho, "prefill": "top-k (TFQAT_SELECT_BITS mode 0)",
            "decode": "importance >= per-layer prefill threshold (mode 1)"},
        "oproj": spec.oproj,
        "head": spec.head,
        "kv_cache": {
            "capacity": spec.cfg.max_positions,
            "layout": "k/v [kv_heads, capacity, head_dim] int8 codes, or packed int4 [.., ceil(head_dim/2)] "
                      "(two codes per byte, stored in int8 tensors); "
                      "ks float32 [capacity] (K scale per position); vb int32 [capacity] (V row bits)",
            "k_bits": [_kv_bits(ls.points["k"]) for ls in spec.layers],
            "v_bits": [_kv_bits(ls.points["v"]) for ls in spec.layers]},
        "delegate": "libtfqat_ops.so (tflite_ops/OPS.md); load with ai_edge_litert load_delegate",
        "files": {}, "export_s": None,
    }
    for key, (name, blob, inf) in files.items():
        manifest["files"][key] = {
            "path": name, "bytes": len(blob), "sha256": _sha256(blob), "ops": inf["ops"],
            "signatures": inf["signatures"], "tensor_types": inf["tensor_types"],
            "const_bytes": inf["const_bytes"]}
    if tok_bytes is not None:
        manifest["tokenizer"] = {"path": "tokenizer.json", "sha256": _sha256(tok_bytes)}
    if ratios is not None:
        manifest["prune"] = {
            "schedule": prune, "ratios": ratios,
            "rule": "after block l's residual add, drop the prunable tokens (all but token 0 and the "
                    "last) with the least attention to token 0 summed over heads; order and RoPE "
                    "positions kept; drops per layer = floor(cumsum(ratios) * (T - 2)) differences",
            "signatures": "prefill -> logits [T_L, V], logit_positions, kv_len [L], rows of T_l per layer; "
                          "decode(token, position, kv_len [L], caches...): row written at kv_len[l]",
            "runner": "tfqat.agile.prune_export.PrunedLiteModel"}
    manifest.update(extra or {})
    manifest["export_s"] = round(time.perf_counter() - t0, 2)
    for key, (name, blob, _) in files.items():
        write_bytes_atomic(out / name, blob)
    if tok_bytes is not None:
        write_bytes_atomic(out / "tokenizer.json", tok_bytes)
    write_bytes_atomic(out / "manifest.json", json.dumps(manifest, indent=1, default=_json_default).encode())
    return {"model": str(out / "model.tflite"),
            "model_float": str(out / "model_float.tflite") if teacher is not None else None,
            "tokenizer": str(out / "tokenizer.json") if tok_bytes is not None else None,
            "manifest": str(out / "manifest.json"), "manifest_data": manifest}


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def export_run(cfg, stage_dir, out_dir=None, oproj: str = "float", progress: bool = False,
               head: str = "float", prune: Optional[str] = None) -> dict:
    """The default job's export stage: the trained student of ``stage_dir`` (runs/<name>/qat-<recipe>)
    and the run's FP teacher -> ``out_dir`` (default runs/<name>/export-<recipe>).

    Raises:
        UserError: no trained student / teacher there (one line).
    """
    from tfqat.cli import UserError
    from tfqat.pipeline import build_fp_model, load_data, teacher_path
    from tfqat.quant.qat import load_student

    stage_dir = Path(stage_dir)
    try:
        student = load_student(cfg, stage_dir)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # a weights file from another config
        raise UserError(f"{stage_dir}: cannot load the student into a {cfg.model.arch} model of this "
                        f"config ({type(e).__name__}); check --config") from None
    tpath = teacher_path(cfg)
    if not tpath.is_file():
        raise UserError(f"no FP teacher at {tpath}; run python -m tfqat.train first")
    teacher = build_fp_model(cfg)
    teacher.load_weights(str(tpath))
    data = load_data(cfg, progress)
    tok = Path(cfg.data.cache_dir) / f"data-{data.key}" / "tokenizer.json"
    recipe = getattr(student, "recipe", None)
    rname = getattr(recipe, "name", stage_dir.name.removeprefix("qat-"))
    out = Path(out_dir) if out_dir is not None else cfg.run_dir / f"export-{rname}"
    try:
        return export_models(student, teacher, out, tokenizer_json=str(tok) if tok.is_file() else None,
                             oproj=oproj, head=head, prune=prune,
                             extra={"run": cfg.name, "stage_dir": str(stage_dir)})
    except ExportError as e:
        raise UserError(str(e)) from None


# ---- CLI ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tfqat.export",
        description="Export a run's QAT student to model.tflite (TFQAT custom ops), its FP teacher to "
                    "model_float.tflite, and manifest.json.")
    ap.add_argument("--run", required=True, help="run folder, e.g. runs/tiny")
    ap.add_argument("--recipe", help="which qat-<recipe> stage to export (default: the only one, or the "
                                     "config's recipe)")
    ap.add_argument("--out", help="output folder (default: <run>/export-<recipe>)")
    ap.add_argument("--oproj", choices=["dynamic8", "float"], default="float",
                    help="o_proj: float matmul with dequantized weights, as trained (default), or "
                         "dynamic per-token int8 activations")
    ap.add_argument("--head", choices=list(HEADS), default="float",
                    help="embedding and lm_head: float32, exactly as trained (default), or int8 per "
                         "row with dynamic per-token int8 activations for the head (about 4x smaller "
                         "and faster; logits within a stated bound of the exact export)")
    ap.add_argument("--prune", metavar="SCHEDULE",
                    help="Agile-Quant token pruning in the prefill: 'progressive:R' or per-layer "
                         "fractions 'r0,r1,...,0' (see tfqat/agile/prune_export.py; changes the signatures)")
    ap.add_argument("--config", help="config name or YAML (default: the run folder's name)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def main(argv: Optional[list] = None) -> int:
    from tfqat.cli import UserError, die

    args = build_parser().parse_args(argv)
    with die():
        from tfqat.cli import load_cli_config

        run = Path(args.run)
        if not run.is_dir():
            raise UserError(f"{run}: no such run folder; train first with python -m tfqat.train")
        stages = sorted(p for p in run.glob("qat-*") if p.is_dir())
        if args.recipe:
            stage = run / f"qat-{args.recipe}"
        elif len(stages) == 1:
            stage = stages[0]
        else:
            trained = [p for p in stages if (p / "student.weights.h5").is_file()]
            if len(trained) != 1:
                raise UserError(f"{run}: {'no trained model (no qat-*/student.weights.h5)' if not trained else 'several QAT stages ' + ', '.join(p.name for p in trained) + '; pick one with --recipe'}")
            stage = trained[0]
        if not (stage / "student.weights.h5").is_file():
            raise UserError(f"{stage}: no trained model (student.weights.h5 missing); run python -m "
                            "tfqat.train first")
        ns = argparse.Namespace(config=args.config or run.name, overrides=args.overrides,
                                name=run.name)
        cfg = load_cli_config(ns)
        cfg = cfg.model_copy(update={"runs_dir": str(run.parent)})
        if args.prune is not None:  # fail fast, one line
            from tfqat.agile.prune_export import check_schedule

            check_schedule(args.prune, cfg.model.layers, error=UserError)
        res = export_run(cfg, stage, args.out, oproj=args.oproj, head=args.head, prune=args.prune)
        m = res["manifest_data"]
        for key in ("model", "model_float"):
            if res.get(key):
                f = m["files"][key]
                print(f"{res[key]}: {f['bytes'] / 1e6:.2f} MB, sha256 {f['sha256'][:12]}, ops "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(f["ops"].items())))
        print(f"manifest: {res['manifest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
