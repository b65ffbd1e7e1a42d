"""What an export holds, read from a Keras model into plain numpy: :class:`ModelSpec` (integer
weight codes and scales, activation points, norms, embedding and head), and int4 packing.

Everything after :func:`spec_from_model` (the graph, the checks, the manifest) reads only the
spec, never the Keras model.

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

import dataclasses
from typing import Any, Optional

import numpy as np


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
