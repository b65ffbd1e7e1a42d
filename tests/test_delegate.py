"""libtfqat_ops.so, the external delegate that runs TFQAT_* custom ops in the stock LiteRT runtime.

Each test writes a small .tflite holding TFQAT_* ops (flatbuffers + LiteRT's schema, custom
options as flexbuffer maps, as the TF converter emits them), runs it through
``ai_edge_litert.interpreter.Interpreter`` with the delegate loaded, and compares with an
independent numpy reference of the contract in tflite_ops/OPS.md: integer codes exactly, float
outputs bit-exactly (float32 epilogue in the order of kernels.h: ``float(acc) * (sa * sb) + bias``).

The library is built once per session into build/delegate-host; set TFQAT_OPS_LIB to test a
prebuilt one instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, load_delegate
from flatbuffers import flexbuffers

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = ROOT / "build" / "delegate-host"

_TFL_TYPES = {
    np.dtype(np.float32): schema.TensorType.FLOAT32,
    np.dtype(np.int32): schema.TensorType.INT32,
    np.dtype(np.uint8): schema.TensorType.UINT8,
    np.dtype(np.int8): schema.TensorType.INT8,
}
_TYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.int32): "int32",
               np.dtype(np.uint8): "uint8", np.dtype(np.int8): "int8"}
# Every kernel table name the delegate's "isa" option accepts (kernels.h isa_name).
ALL_ISAS = ["ref", "avx2", "avxvnni", "avx512vnni", "neon", "neondot", "i8mm"]


# ---- building the library ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def lib() -> str:
    """Path of libtfqat_ops.so (built with cmake on first use)."""
    prebuilt = os.environ.get("TFQAT_OPS_LIB")
    if prebuilt:
        return prebuilt
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    steps = [
        ["cmake", "-S", str(ROOT / "tflite_ops"), "-B", str(BUILD_DIR),
         "-DTFQAT_BUILD_TESTS=OFF", "-DTFQAT_BUILD_BENCH=OFF", "-DCMAKE_BUILD_TYPE=Release"],
        ["cmake", "--build", str(BUILD_DIR), "-j2", "--target", "tfqat_ops"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return str(BUILD_DIR / "libtfqat_ops.so")


# ---- writing .tflite files --------------------------------------------------------------------

def flex_map(attrs: dict) -> bytes:
    """Custom options as the TF converter writes them: a flexbuffer map of scalars."""
    fbb = flexbuffers.Builder()
    with fbb.Map():
        for key, value in attrs.items():
            if isinstance(value, bool):
                fbb.Bool(key, value)
            elif isinstance(value, int):
                fbb.Int(key, value)
            elif isinstance(value, float):
                fbb.Float(key, value)
            else:
                fbb.String(key, value)
    return bytes(fbb.Finish())


class _AlignedBuffer(schema.BufferT):
    """A buffer whose bytes start 16-byte aligned (the converter's force_align), so that the
    kernels see constant tensors exactly as they would in a converted model."""

    def Pack(self, builder):
        data = None
        if self.data is not None:
            raw = bytes(self.data)
            builder.StartVector(1, len(raw), 16)
            builder.head -= len(raw)
            builder.Bytes[builder.head:builder.head + len(raw)] = raw
            builder.vectorNumElems = len(raw)
            data = builder.EndVector()
        schema.BufferStart(builder)
        if data is not None:
            schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


class Graph:
    """A one-subgraph TFLite model under construction."""

    def __init__(self):
        self.tensors: list = []
        self.buffers: list = [_AlignedBuffer()]
        self.inputs: list[int] = []
        self.operators: list = []
        self.opcodes: dict = {}

    def _tensor(self, name, dtype, shape, buffer=0) -> int:
        t = schema.TensorT()
        t.name, t.type, t.shape, t.buffer = name, _TFL_TYPES[np.dtype(dtype)], list(shape), buffer
        self.tensors.append(t)
        return len(self.tensors) - 1

    def input(self, name, dtype, shape) -> int:
        idx = self._tensor(name, dtype, shape)
        self.inputs.append(idx)
        return idx

    def const(self, name, array) -> int:
        array = np.ascontiguousarray(array)
        buf = _AlignedBuffer()
        buf.data = array.tobytes()
        self.buffers.append(buf)
        return self._tensor(name, array.dtype, array.shape, len(self.buffers) - 1)

    def tensor(self, name, dtype, shape) -> int:
        return self._tensor(name, dtype, shape)

    def op(self, name: str, inputs, outputs, attrs=None, builtin=None, options=None):
        key = name if builtin is None else builtin
        if key not in self.opcodes:
            code = schema.OperatorCodeT()
            if builtin is None:
                code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
                code.customCode = name
            else:
                code.builtinCode = code.deprecatedBuiltinCode = builtin
            code.version = 1
            self.opcodes[key] = (len(self.opcodes), code)
        op = schema.OperatorT()
        op.opcodeIndex = self.opcodes[key][0]
        op.inputs, op.outputs = list(inputs), list(outputs)
        if builtin is None:
            raw = attrs if isinstance(attrs, bytes) else flex_map(attrs or {})
            op.customOptions = list(raw)
            op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
        elif options is not None:
            op.builtinOptionsType, op.builtinOptions = options
        self.operators.append(op)

    def subgraph(self, outputs, name="main"):
        sub = schema.SubGraphT()
        sub.tensors, sub.inputs, sub.outputs = self.tensors, self.inputs, list(outputs)
        sub.operators, sub.name = self.operators, name
        return sub

    def build(self, outputs) -> bytes:
        return build_model([(self, outputs, None)])


def build_model(parts) -> bytes:
    """A model from (graph, outputs, signature_key or None) parts, one subgraph each; buffers
    and operator codes are merged."""
    model = schema.ModelT()
    model.version, model.description = 3, "tfqat delegate test"
    model.buffers, model.operatorCodes = [_AlignedBuffer()], []
    model.subgraphs, model.signatureDefs = [], []
    codes: dict = {}
    for index, (g, outputs, key) in enumerate(parts):
        base = len(model.buffers) - 1
        model.buffers += g.buffers[1:]
        for t in g.tensors:
            t.buffer = t.buffer + base if t.buffer else 0
        remap = {}
        for name, (i, code) in g.opcodes.items():
            if name not in codes:
                codes[name] = len(model.operatorCodes)
                model.operatorCodes.append(code)
            remap[i] = codes[name]
        for op in g.operators:
            op.opcodeIndex = remap[op.opcodeIndex]
        model.subgraphs.append(g.subgraph(outputs, key or "main"))
        if key:
            sig = schema.SignatureDefT()
            sig.signatureKey, sig.subgraphIndex = key, index
            sig.inputs = [_tensor_map(g.tensors[i].name, i) for i in g.inputs]
            sig.outputs = [_tensor_map(g.tensors[i].name, i) for i in outputs]
            model.signatureDefs.append(sig)
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(name, index):
    m = schema.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m


def delegate(lib: str, options=None):
    """load_delegate, skipping the test when a forced kernel table is missing on this CPU."""
    try:
        return load_delegate(lib, options or {})
    except ValueError as e:
        if "not available on this CPU or build" in str(e):
            pytest.skip(str(e).splitlines()[-1])
        raise


def run(model: bytes, lib: str, feeds: dict, options=None, outputs=None):
    """Runs `model` with the delegate; returns the interpreter and the outputs by name."""
    interp = Interpreter(model_content=model, experimental_delegates=[delegate(lib, options)])
    interp.allocate_tensors()
    by_name = {d["name"]: d for d in interp.get_tensor_details()}
    for name, value in feeds.items():
        interp.set_tensor(by_name[name]["index"], value)
    interp.invoke()
    names = outputs or [d["name"] for d in interp.get_output_details()]
    return interp, {n: interp.get_tensor(by_name[n]["index"]) for n in names}


# ---- numpy reference of the contract (OPS.md / kernels.h) -------------------------------------

def ref_quantize(x, bits, static_scales=None):
    x = x.astype(np.float32)
    qmax = np.where(bits == 8, 127, 7).astype(np.float32)
    if static_scales is None:
        m = np.abs(x).max(axis=1)
        s = np.where(m == 0, np.float32(1), m / qmax).astype(np.float32)
    else:
        s = np.where(bits == 8, static_scales[0], static_scales[1]).astype(np.float32)
    q = np.clip(np.round(x / s[:, None]), -qmax[:, None] - 1, qmax[:, None])
    return q.astype(np.int8), s


def pack_int4(codes):
    """[..., L] int codes in [-8, 7] -> [..., ceil(L/2)] uint8, element 2j in the low nibble."""
    codes = np.asarray(codes)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), codes.dtype)], -1)
    nib = (codes.astype(np.int16) & 0xF).astype(np.uint8)
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)


def ref_qlinear(codes, xs, w, ws, bias=None):
    acc = codes.astype(np.int64) @ w.astype(np.int64).T
    y = acc.astype(np.float32) * (xs[:, None] * ws[None, :])
    return y + bias if bias is not None else y


def ref_qlinear_grouped(codes, xs, w, ws, group_size, bias=None):
    """TFQAT_QLINEAR with group_size G (OPS.md), in float32 only: an exact integer sum per group of
    G inputs, then ``s = s + float32(acc_g) * ws[:, g]`` from s = 0 in group order, then ``* xs``,
    then ``+ bias``."""
    s = np.zeros((codes.shape[0], w.shape[0]), np.float32)
    for g, lo in enumerate(range(0, codes.shape[1], group_size)):
        hi = lo + group_size
        acc = codes[:, lo:hi].astype(np.int64) @ w[:, lo:hi].astype(np.int64).T
        s = s + acc.astype(np.float32) * ws[None, :, g]
    y = s * xs[:, None]
    return y + bias if bias is not None else y


def assert_same_bits(got, want, err_msg=""):
    """Bit-exact float32 equality (assert_array_equal alone takes -0.0 for +0.0)."""
    assert got.dtype == want.dtype == np.float32, (got.dtype, want.dtype)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=err_msg)


def ref_topk(importance, rho):
    t = importance.shape[0]
    n8 = int(min(max(np.floor(float(np.float32(rho)) * t + 0.5), 0), t))
    order = np.argsort(-importance, kind="stable")
    bits = np.full(t, 4, np.int32)
    bits[order[:n8]] = 8
    return bits


def ref_attn_qk(q, qs, k, ks, length):
    h, t, _ = q.shape
    group = h // k.shape[0]
    kk = np.repeat(k, group, axis=0).astype(np.int64)
    acc = np.einsum("htd,hsd->hts", q.astype(np.int64), kk)
    scores = acc.astype(np.float32) * (qs[None, :, None] * ks[None, None, :])
    pos = np.arange(k.shape[1])[None, :] > (length - t + np.arange(t))[:, None]
    scores[:, pos] = -np.inf
    return scores


def ref_attn_pv(p, ps, v, rowbits, vs, length):
    """``ps``: one float32 scale, or [H, T] float32 scales, one per probability row."""
    h = p.shape[0]
    vv = np.repeat(v, h // v.shape[0], axis=0).astype(np.int64)[:, :length]
    pp = p.astype(np.int64)[:, :, :length]
    is4 = rowbits[:length] == 4
    acc8 = np.einsum("hts,hsd->htd", pp[:, :, ~is4], vv[:, ~is4])
    acc4 = np.einsum("hts,hsd->htd", pp[:, :, is4], vv[:, is4])
    ps = ps[:, :, None] if np.ndim(ps) == 2 else ps
    return (acc8.astype(np.float32) * (ps * vs[0]) + acc4.astype(np.float32) * (ps * vs[1]))


def ref_probs_per_row(pf, p_max, length):
    """ATTN_PV p_mode=1: uint8 codes [H, T, S_cap] (0 past ``length``) and the [H, T] scales.

    Per row, over the first ``length`` positions: m = the max of the entries > 0 (NaN and
    negatives ignored), scale = m / p_max (1 when m == 0), codes = clamp(round_half_even(p / scale),
    0, p_max) with NaN -> 0; all in float32 with true divisions."""
    pv = pf[:, :, :length]
    with np.errstate(invalid="ignore"):
        m = np.where(pv > 0, pv, np.float32(0)).max(axis=-1, initial=np.float32(0))
        scale = np.where(m == 0, np.float32(1), m / np.float32(p_max)).astype(np.float32)
        q = pv / scale[:, :, None]
        codes = np.where(np.isnan(q), 0, np.clip(np.round(q), 0, p_max))
    out = np.zeros(pf.shape, np.uint8)
    out[:, :, :length] = codes.astype(np.uint8)
    return out, scale


def rand_bits(rng, t):
    return rng.choice(np.array([4, 8], np.int32), size=t)


# ---- the ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (16, 64)])
def test_quantize(lib, mode, shape):
    rng = np.random.default_rng(1)
    t, k = shape
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x[0, 0] = 0.5 * 0.25  # exact ties exercise round-half-even
    bits = rand_bits(rng, t)
    scales = np.array([0.02, 0.25], np.float32)
    g = Graph()
    xi, bi = g.input("x", np.float32, shape), g.input("bits", np.int32, [t])
    si = g.input("scales", np.float32, [2])
    codes, sc = g.tensor("codes", np.int8, shape), g.tensor("codes_scales", np.float32, [t])
    g.op("TFQAT_QUANTIZE", [xi, bi, si], [codes, sc], {"mode": mode})
    _, out = run(g.build([codes, sc]), lib, {"x": x, "bits": bits, "scales": scales})
    want_codes, want_scales = ref_quantize(x, bits, scales if mode == 0 else None)
    np.testing.assert_array_equal(out["codes"], want_codes)
    np.testing.assert_array_equal(out["codes_scales"], want_scales)


def test_quantize_with_an_unconsumed_output(lib):
    """The runtime gives an output nothing reads no memory; the op must not write through null."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 9)).astype(np.float32)
    bits = rand_bits(rng, 5)
    scales = np.array([0.02, 0.25], np.float32)
    g = Graph()
    xi, bi = g.input("x", np.float32, [5, 9]), g.input("bits", np.int32, [5])
    si = g.input("scales", np.float32, [2])
    codes, sc = g.tensor("codes", np.int8, [5, 9]), g.tensor("codes_scales", np.float32, [5])
    g.op("TFQAT_QUANTIZE", [xi, bi, si], [codes, sc], {"mode": 0})
    _, out = run(g.build([codes]), lib, {"x": x, "bits": bits, "scales": scales}, outputs=["codes"])
    np.testing.assert_array_equal(out["codes"], ref_quantize(x, bits, scales)[0])


def test_select_bits_topk_and_threshold(lib):
    rng = np.random.default_rng(2)
    imp = rng.standard_normal(23).astype(np.float32)
    imp[5] = imp[9]  # a tie: the lower index wins
    imp[3] = np.nan  # NaN ranks lowest
    for rho in (0.0, 0.3, 0.5, 1.0):
        g = Graph()
        ii = g.input("importance", np.float32, [23])
        bo = g.tensor("bits", np.int32, [23])
        g.op("TFQAT_SELECT_BITS", [ii], [bo], {"rho": rho})
        _, out = run(g.build([bo]), lib, {"importance": imp})
        np.testing.assert_array_equal(out["bits"], ref_topk(imp, rho), err_msg=f"rho={rho}")
    g = Graph()
    ii, th = g.input("importance", np.float32, [23]), g.input("threshold", np.float32, [1])
    bo = g.tensor("bits", np.int32, [23])
    g.op("TFQAT_SELECT_BITS", [ii, th], [bo], {"mode": 1})
    thr = np.array([0.1], np.float32)
    _, out = run(g.build([bo]), lib, {"importance": imp, "threshold": thr})
    np.testing.assert_array_equal(out["bits"], np.where(imp >= thr[0], 8, 4))


def qlinear_graph(t, k, n, w_bits, act_mode, bias, rng, const_w=True, attrs=None, group_size=0):
    """A TFQAT_QLINEAR model and the reference output for random inputs (group_size > 0: one
    weight scale per output channel and group of group_size inputs)."""
    w = rng.integers(-8, 8 if w_bits == 4 else 128, size=(n, k)).astype(np.int8)
    w_store = pack_int4(w) if w_bits == 4 else w
    ws_shape = (n, -(-k // group_size)) if group_size else n
    ws = (rng.random(ws_shape) * 0.05 + 0.01).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    x = (rng.standard_normal((t, k)) * 2).astype(np.float32)
    bits = rand_bits(rng, t)
    act = np.array([0.03, 0.4], np.float32)
    g = Graph()
    xi, bi = g.input("x", np.float32, [t, k]), g.input("bits", np.int32, [t])
    ai = g.const("act_scales", act)
    feeds = {"x": x, "bits": bits}
    if const_w:
        wi = g.const("w", w_store)
    else:
        wi = g.input("w", w_store.dtype, w_store.shape)
        feeds["w"] = w_store
    ins = [xi, bi, ai, wi, g.const("w_scales", ws)]
    if bias:
        ins.append(g.const("bias", b))
    y = g.tensor("y", np.float32, [t, n])
    if attrs is None:
        attrs = {"w_bits": w_bits, "k": k, "act_mode": act_mode}
        if group_size:
            attrs["group_size"] = group_size
    g.op("TFQAT_QLINEAR", ins, [y], attrs)
    codes, xs = ref_quantize(x, bits, act if act_mode == 0 else None)
    if group_size:
        return g.build([y]), feeds, ref_qlinear_grouped(codes, xs, w, ws, group_size, b)
    return g.build([y]), feeds, ref_qlinear(codes, xs, w, ws, b)


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("act_mode", [0, 1])
@pytest.mark.parametrize("t,k,n,bias", [(1, 64, 48, True), (7, 37, 19, False), (33, 130, 70, True)])
def test_qlinear(lib, isa, w_bits, act_mode, t, k, n, bias):
    rng = np.random.default_rng(t * 1000 + k)
    model, feeds, want = qlinear_graph(t, k, n, w_bits, act_mode, bias, rng)
    _, out = run(model, lib, feeds, {"isa": isa} if isa else None)
    np.testing.assert_array_equal(out["y"], want)


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("act_mode", [0, 1])
@pytest.mark.parametrize("t,k,n,group_size,bias", [
    (1, 576, 40, 32, True),    # decode at SmolLM2's K: 18 whole groups
    (3, 37, 19, 32, False),    # odd K: a whole group and a partial one
    (17, 130, 70, 64, True),   # K not a multiple of G; N past a 64-channel panel
    (5, 100, 33, 128, True),   # K < G: one partial group
    (2, 64, 8, 64, False),     # K exactly G
    (33, 257, 17, 32, True),   # 9 groups, the last holding one input
])
def test_qlinear_grouped(lib, isa, w_bits, act_mode, t, k, n, group_size, bias):
    rng = np.random.default_rng(t * 1000 + k + group_size)
    model, feeds, want = qlinear_graph(t, k, n, w_bits, act_mode, bias, rng, group_size=group_size)
    _, out = run(model, lib, feeds, {"isa": isa} if isa else None)
    assert_same_bits(out["y"], want)


def test_qlinear_grouped_reference_is_not_the_per_channel_formula():
    """The grouped epilogue differs from float(acc) * (xs * ws) even with one group, and the
    reference tells them apart on these inputs (so the delegate tests above can fail)."""
    rng = np.random.default_rng(21)
    codes = rng.integers(-128, 128, size=(16, 64)).astype(np.int8)
    w = rng.integers(-8, 8, size=(24, 64)).astype(np.int8)
    xs = (rng.random(16) * 0.1 + 0.001).astype(np.float32)
    ws = (rng.random((24, 1)) * 0.05 + 0.01).astype(np.float32)
    one_group = ref_qlinear_grouped(codes, xs, w, ws, 64)
    assert not np.array_equal(one_group, ref_qlinear(codes, xs, w, ws[:, 0]))
    ws2 = np.repeat(ws, 2, axis=1)  # the same scale on two groups of 32: another float order
    assert not np.array_equal(ref_qlinear_grouped(codes, xs, w, ws2, 32), one_group)


def test_qlinear_grouped_scales_as_graph_input(lib):
    """Group scales that are graph inputs are reordered for the kernels at every Invoke."""
    rng = np.random.default_rng(22)
    t, k, n, group_size = 4, 70, 9, 32
    w = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    b = rng.standard_normal(n).astype(np.float32)
    g = Graph()
    ins = [g.input("x", np.float32, [t, k]), g.input("bits", np.int32, [t]),
           g.const("act", np.array([-1.0, -1.0], np.float32)), g.const("w", pack_int4(w)),
           g.input("w_scales", np.float32, [n, 3]), g.const("bias", b)]
    y = g.tensor("y", np.float32, [t, n])
    g.op("TFQAT_QLINEAR", ins, [y], {"w_bits": 4, "k": k, "act_mode": 1, "group_size": group_size})
    interp = Interpreter(model_content=g.build([y]), experimental_delegates=[load_delegate(lib)])
    interp.allocate_tensors()
    idx = {d["name"]: d["index"] for d in interp.get_tensor_details()}
    for step in range(2):
        x = rng.standard_normal((t, k)).astype(np.float32)
        bits = rand_bits(rng, t)
        ws = (rng.random((n, 3)) * 0.05 + 0.01).astype(np.float32)
        for name, value in (("x", x), ("bits", bits), ("w_scales", ws)):
            interp.set_tensor(idx[name], value)
        interp.invoke()
        codes, xs = ref_quantize(x, bits)
        assert_same_bits(interp.get_tensor(idx["y"]),
                         ref_qlinear_grouped(codes, xs, w, ws, group_size, b), err_msg=f"step {step}")


def test_qlinear_group_size_zero_is_per_channel(lib):
    """An explicit group_size=0 is the default: one scale per output channel."""
    rng = np.random.default_rng(23)
    attrs = {"w_bits": 8, "k": 45, "act_mode": 0, "group_size": 0}
    model, feeds, want = qlinear_graph(6, 45, 11, 8, 0, True, rng, attrs=attrs)
    _, out = run(model, lib, feeds)
    assert_same_bits(out["y"], want)


def test_qlinear_weights_as_graph_input(lib):
    """Non-constant weights are packed at every Invoke instead of once."""
    rng = np.random.default_rng(3)
    model, feeds, want = qlinear_graph(4, 21, 9, 4, 1, True, rng, const_w=False)
    _, out = run(model, lib, feeds)
    np.testing.assert_array_equal(out["y"], want)


def test_qlinear_resized_tokens(lib):
    """Prefill and decode share a graph: resizing T re-runs Prepare and resizes the output."""
    rng = np.random.default_rng(4)
    model, feeds, _ = qlinear_graph(6, 40, 24, 4, 1, True, rng)
    interp = Interpreter(model_content=model, experimental_delegates=[load_delegate(lib)])
    by_name = {d["name"]: d["index"] for d in interp.get_tensor_details()}
    interp.resize_tensor_input(by_name["x"], [2, 40])
    interp.resize_tensor_input(by_name["bits"], [2])
    interp.allocate_tensors()
    x, bits = feeds["x"][:2], feeds["bits"][:2]
    interp.set_tensor(by_name["x"], x)
    interp.set_tensor(by_name["bits"], bits)
    interp.invoke()
    got = interp.get_tensor(by_name["y"])
    assert got.shape == (2, 24)
    _, full = run(model, lib, feeds)
    np.testing.assert_array_equal(got, full["y"][:2])


def test_prefill_and_decode_signatures(lib, tmp_path):
    """An export has one subgraph per signature (prefill T>1, decode T=1): the delegate claims
    the TFQAT ops of every subgraph, and dump_abi lists each node once per subgraph."""
    rng = np.random.default_rng(13)
    k, n = 24, 10
    w = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    ws = (rng.random(n) * 0.05).astype(np.float32)
    parts = []
    for key, t in (("prefill", 6), ("decode", 1)):
        g = Graph()
        ins = [g.input("x", np.float32, [t, k]), g.input("bits", np.int32, [t]),
               g.const("act", np.array([0.05, 0.5], np.float32)), g.const("w", pack_int4(w)),
               g.const("ws", ws)]
        y = g.tensor("y", np.float32, [t, n])
        g.op("TFQAT_QLINEAR", ins, [y], {"w_bits": 4, "k": k, "act_mode": 0})
        parts.append((g, [y], key))
    dump = tmp_path / "abi.json"
    interp = Interpreter(model_content=build_model(parts),
                         experimental_delegates=[load_delegate(lib, {"dump_abi": str(dump)})])
    for key, t in (("prefill", 6), ("decode", 1)):
        x = rng.standard_normal((t, k)).astype(np.float32)
        bits = rand_bits(rng, t)
        got = interp.get_signature_runner(key)(x=x, bits=bits)["y"]
        codes, xs = ref_quantize(x, bits, np.array([0.05, 0.5], np.float32))
        np.testing.assert_array_equal(got, ref_qlinear(codes, xs, w, ws), err_msg=key)
    nodes = json.loads(dump.read_text())["nodes"]
    assert sorted(nd["inputs"][0]["dims"][0] for nd in nodes) == [1, 6]


def cache(rng, kv_bits, hkv, s_cap, d):
    hi = 8 if kv_bits == 4 else 128
    codes = rng.integers(-hi, hi, size=(hkv, s_cap, d)).astype(np.int8)
    return codes, (pack_int4(codes) if kv_bits == 4 else codes)


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("length", [7, 9])
def test_attn_qk(lib, isa, kv_bits, length):
    rng = np.random.default_rng(kv_bits + length)
    h, hkv, t, d, s_cap = 4, 2, 3, 13, 9
    q = rng.integers(-128, 128, size=(h, t, d)).astype(np.int8)
    qs = (rng.random(t) * 0.1 + 0.01).astype(np.float32)
    k_codes, k_store = cache(rng, kv_bits, hkv, s_cap, d)
    ks = (rng.random(s_cap) * 0.1 + 0.01).astype(np.float32)
    g = Graph()
    ins = [g.input("q", np.int8, q.shape), g.input("qs", np.float32, [t]),
           g.input("k_cache", k_store.dtype, k_store.shape), g.input("ks", np.float32, [s_cap]),
           g.input("length", np.int32, [1])]
    out_t = g.tensor("scores", np.float32, [h, t, s_cap])
    g.op("TFQAT_ATTN_QK", ins, [out_t], {"kv_bits": kv_bits, "d": d})
    feeds = {"q": q, "qs": qs, "k_cache": k_store, "ks": ks,
             "length": np.array([length], np.int32)}
    _, out = run(g.build([out_t]), lib, feeds, {"isa": isa} if isa else None)
    np.testing.assert_array_equal(out["scores"], ref_attn_qk(q, qs, k_codes, ks, length))


def run_attn_pv(lib, isa, p, ps, v_store, rowbits, vs, length, attrs, p_scales_out=False):
    """One TFQAT_ATTN_PV node on ``p`` ([H, T, S] uint8 codes, or float32 with ``p_max``).
    ``ps=None`` leaves input 1 out (-1); ``p_scales_out`` adds output 1 "p_scales" [H, T]."""
    h, t, _ = p.shape
    g = Graph()
    ins = [g.input("p", p.dtype.type, p.shape),
           -1 if ps is None else g.input("ps", np.float32, [1]),
           g.input("v_cache", v_store.dtype, v_store.shape),
           g.input("rowbits", np.int32, [len(rowbits)]), g.input("vs", np.float32, [2]),
           g.input("length", np.int32, [1])]
    outs = [g.tensor("out", np.float32, [h, t, attrs["d"]])]
    if p_scales_out:
        outs.append(g.tensor("p_scales", np.float32, [h, t]))
    g.op("TFQAT_ATTN_PV", ins, outs, attrs)
    feeds = {"p": p, "v_cache": v_store, "rowbits": rowbits, "vs": vs,
             "length": np.array([length], np.int32)}
    if ps is not None:
        feeds["ps"] = ps
    return run(g.build(outs), lib, feeds, {"isa": isa} if isa else None)[1]


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("length", [5, 9])
def test_attn_pv(lib, isa, kv_bits, length):
    rng = np.random.default_rng(10 * kv_bits + length)
    h, hkv, t, d, s_cap = 6, 3, 2, 11, 9
    p = rng.integers(0, 256, size=(h, t, s_cap)).astype(np.uint8)
    v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
    rowbits = rand_bits(rng, s_cap)
    rowbits[length:] = 0  # unwritten cache slots are never read
    ps = np.array([1 / 255], np.float32)
    vs = np.array([0.02, 0.3], np.float32)
    out = run_attn_pv(lib, isa, p, ps, v_store, rowbits, vs, length, {"kv_bits": kv_bits, "d": d})
    np.testing.assert_array_equal(out["out"], ref_attn_pv(p, ps[0], v_codes, rowbits, vs, length))


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
def test_attn_prefill_blocks(lib, isa, kv_bits):
    """T > 16 (the delegate runs prefill attention per head and causal block of 16 queries):
    still bit-exact, with a causal P and with stray nonzero probabilities past the horizon."""
    rng = np.random.default_rng(40 + kv_bits)
    h, hkv, t, d, s_cap, length = 4, 2, 37, 13, 45, 40
    q = rng.integers(-128, 128, size=(h, t, d)).astype(np.int8)
    qs = (rng.random(t) * 0.1 + 0.01).astype(np.float32)
    k_codes, k_store = cache(rng, kv_bits, hkv, s_cap, d)
    ks = (rng.random(s_cap) * 0.1 + 0.01).astype(np.float32)
    g = Graph()
    ins = [g.input("q", np.int8, q.shape), g.input("qs", np.float32, [t]),
           g.input("k_cache", k_store.dtype, k_store.shape), g.input("ks", np.float32, [s_cap]),
           g.input("length", np.int32, [1])]
    out_t = g.tensor("scores", np.float32, [h, t, s_cap])
    g.op("TFQAT_ATTN_QK", ins, [out_t], {"kv_bits": kv_bits, "d": d})
    _, out = run(g.build([out_t]), lib, {"q": q, "qs": qs, "k_cache": k_store, "ks": ks,
                                         "length": np.array([length], np.int32)},
                 {"isa": isa} if isa else None)
    np.testing.assert_array_equal(out["scores"], ref_attn_qk(q, qs, k_codes, ks, length))

    p = rng.integers(0, 256, size=(h, t, s_cap)).astype(np.uint8)
    causal = np.arange(s_cap)[None, :] <= (length - t + np.arange(t))[:, None]
    p_causal = np.where(causal[None], p, 0).astype(np.uint8)
    p_stray = p_causal.copy()
    p_stray[1, 3, length - 1] = 7  # past row 3's horizon: must still count
    p_stray[2, 20, s_cap - 1] = 9  # past S: must not
    v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
    rowbits = rand_bits(rng, s_cap)
    rowbits[length:] = 0
    ps, vs = np.array([1 / 255], np.float32), np.array([0.02, 0.3], np.float32)
    for pp in (p_causal, p_stray, p):
        g = Graph()
        ins = [g.input("p", np.uint8, pp.shape), g.input("ps", np.float32, [1]),
               g.input("v_cache", v_store.dtype, v_store.shape),
               g.input("rowbits", np.int32, [s_cap]), g.input("vs", np.float32, [2]),
               g.input("length", np.int32, [1])]
        out_t = g.tensor("out", np.float32, [h, t, d])
        g.op("TFQAT_ATTN_PV", ins, [out_t], {"kv_bits": kv_bits, "d": d})
        _, out = run(g.build([out_t]), lib, {"p": pp, "ps": ps, "v_cache": v_store,
                                             "rowbits": rowbits, "vs": vs,
                                             "length": np.array([length], np.int32)},
                     {"isa": isa} if isa else None)
        np.testing.assert_array_equal(out["out"], ref_attn_pv(pp, ps[0], v_codes, rowbits, vs, length))


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("t", [1, 3, 37])
def test_attn_q_layout_and_float_probabilities(lib, isa, kv_bits, t):
    """ATTN_QK q_layout=1 (q as [T, H, D]) and ATTN_PV p_max > 0 (float probabilities quantized
    by the op: clamp(round_half_even(p / p_scale), 0, p_max)) equal the uint8 / [H, T, D] forms."""
    rng = np.random.default_rng(60 + kv_bits + t)
    h, hkv, d, s_cap = 4, 2, 13, 45
    length = t + 3
    q = rng.integers(-128, 128, size=(h, t, d)).astype(np.int8)
    qs = (rng.random(t) * 0.1 + 0.01).astype(np.float32)
    k_codes, k_store = cache(rng, kv_bits, hkv, s_cap, d)
    ks = (rng.random(s_cap) * 0.1 + 0.01).astype(np.float32)
    g = Graph()
    ins = [g.input("q", np.int8, [t, h, d]), g.input("qs", np.float32, [t]),
           g.input("k_cache", k_store.dtype, k_store.shape), g.input("ks", np.float32, [s_cap]),
           g.input("length", np.int32, [1])]
    out_t = g.tensor("scores", np.float32, [h, t, s_cap])
    g.op("TFQAT_ATTN_QK", ins, [out_t], {"kv_bits": kv_bits, "d": d, "q_layout": 1})
    _, out = run(g.build([out_t]), lib, {"q": np.ascontiguousarray(q.transpose(1, 0, 2)), "qs": qs,
                                         "k_cache": k_store, "ks": ks,
                                         "length": np.array([length], np.int32)},
                 {"isa": isa} if isa else None)
    np.testing.assert_array_equal(out["scores"], ref_attn_qk(q, qs, k_codes, ks, length))

    for p_max, ps in ((255, 1 / 255), (15, 1 / 15), (255, 0.0037)):
        ps = np.array([ps], np.float32)
        # a softmax-like P with exact rounding ties (k + 0.5) * ps and values past p_max
        pf = rng.random((h, t, s_cap)).astype(np.float32) * np.float32(1.1)
        pf[:, :, :4] = (np.arange(4, dtype=np.float32) + np.float32(0.5)) * ps[0]
        pf[:, :, 4] = 0.0
        codes = np.clip(np.round(pf / ps[0]), 0, p_max).astype(np.uint8)
        v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
        rowbits = rand_bits(rng, s_cap)
        rowbits[length:] = 0
        vs = np.array([0.02, 0.3], np.float32)
        out = run_attn_pv(lib, isa, pf, ps, v_store, rowbits, vs, length,
                          {"kv_bits": kv_bits, "d": d, "p_max": p_max})
        np.testing.assert_array_equal(out["out"], ref_attn_pv(codes, ps[0], v_codes, rowbits, vs, length))


def causal_softmax(rng, h, t, s_cap, length):
    """float32 softmax rows over ATTN_QK-style scores: -inf past each query's causal horizon
    and past ``length``, so those entries are exactly 0."""
    scores = (rng.standard_normal((h, t, s_cap)) * 3).astype(np.float32)
    future = np.arange(s_cap)[None, :] > (length - t + np.arange(t))[:, None]
    scores[:, future] = -np.inf
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("t", [1, 3, 37])
def test_attn_pv_per_row_probability_scales(lib, isa, kv_bits, t):
    """ATTN_PV p_mode=1: every probability row (h, t) gets its own scale max_s p / p_max; output
    1 returns the scales. Causal softmax rows plus an all-zero row, a row with NaN and negative
    entries, a diffuse row and entries past S that would change the max if they were read; decode
    (t=1), short and multi-block prefill (t=37 > the delegate's 16-query blocks)."""
    rng = np.random.default_rng(90 + kv_bits + t)
    h, hkv, d, s_cap = 4, 2, 13, 45
    length = t + 5
    pf = causal_softmax(rng, h, t, s_cap, length)
    pf[0, t - 1, :] = 0.0                            # all zero: scale 1, codes 0
    pf[1, 0, :length] = np.float32(1.0 / length)     # diffuse
    pf[2, 0, 1:4] = [np.nan, -0.25, -0.0]            # NaN / negatives count as 0
    pf[3, t - 1, length:] = 7.0                      # past S: never read
    v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
    rowbits = rand_bits(rng, s_cap)
    rowbits[length:] = 0
    vs = np.array([0.02, 0.3], np.float32)
    for p_max in (255, 15):
        codes, scales = ref_probs_per_row(pf, p_max, length)
        want = ref_attn_pv(codes, scales, v_codes, rowbits, vs, length)
        attrs = {"kv_bits": kv_bits, "d": d, "p_max": p_max, "p_mode": 1}
        # p_scale given (and ignored: a value that would change every code) and left out
        out = run_attn_pv(lib, isa, pf, np.array([1e-9], np.float32), v_store, rowbits, vs, length,
                          attrs, p_scales_out=True)
        assert_same_bits(out["p_scales"], scales)
        assert_same_bits(out["out"], want)
        out = run_attn_pv(lib, isa, pf, None, v_store, rowbits, vs, length, attrs)
        assert_same_bits(out["out"], want)
    assert scales[0, t - 1] == 1.0 and scales[3, t - 1] < 1.0  # the cases above are what they say


def test_attn_pv_per_row_scales_keep_diffuse_heads(lib):
    """Why p_mode=1: over 1024 positions a diffuse head's probabilities are all below 1/510, so
    one static scale 1/255 makes every code 0 and the head's output 0; its own row scale keeps
    the output within 1% of the float P V. Output 1 of a p_mode=0 node is p_scale everywhere."""
    rng = np.random.default_rng(95)
    h, hkv, t, d, s_cap = 2, 1, 1, 16, 1024
    logits = rng.standard_normal((h, t, s_cap)).astype(np.float32) * np.float32(0.1)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    pf = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    assert pf.max() < 1 / 510
    v_codes, v_store = cache(rng, 8, hkv, s_cap, d)
    rowbits = np.full(s_cap, 8, np.int32)
    vs = np.array([0.02, 0.3], np.float32)
    exact = np.einsum("hts,sd->htd", pf.astype(np.float64), v_codes[0].astype(np.float64) * vs[0])
    ps = np.array([1 / 255], np.float32)
    static = run_attn_pv(lib, None, pf, ps, v_store, rowbits, vs, s_cap,
                         {"kv_bits": 8, "d": d, "p_max": 255}, p_scales_out=True)
    assert (static["out"] == 0).all()
    assert (static["p_scales"] == ps[0]).all()
    dyn = run_attn_pv(lib, None, pf, None, v_store, rowbits, vs, s_cap,
                      {"kv_bits": 8, "d": d, "p_max": 255, "p_mode": 1})
    assert np.abs(dyn["out"] - exact).max() <= 0.01 * np.abs(exact).max()


def test_chain_with_builtin_ops(lib):
    """Adjacent TFQAT ops get one delegate kernel each (their intermediate tensor lives in the
    arena), and builtin ops around them keep running in the stock runtime."""
    rng = np.random.default_rng(5)
    t, k, n = 9, 33, 17
    imp = rng.standard_normal(t).astype(np.float32)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    ws = (rng.random(n) * 0.05).astype(np.float32)
    g = Graph()
    ii, xi = g.input("importance", np.float32, [t]), g.input("x", np.float32, [t, k])
    bits = g.tensor("bits", np.int32, [t])
    g.op("TFQAT_SELECT_BITS", [ii], [bits], {"rho": 0.5})
    x2 = g.tensor("x2", np.float32, [t, k])
    add = schema.BuiltinOperator.ADD
    g.op("ADD", [xi, xi], [x2], builtin=add)
    y = g.tensor("y", np.float32, [t, n])
    g.op("TFQAT_QLINEAR", [x2, bits, g.const("act", np.array([0.05, 0.5], np.float32)),
                           g.const("w", pack_int4(w)), g.const("ws", ws)], [y],
         {"w_bits": 4, "k": k, "act_mode": 1})
    y2 = g.tensor("y2", np.float32, [t, n])
    g.op("ADD", [y, y], [y2], builtin=add)
    _, out = run(g.build([y2, bits]), lib, {"importance": imp, "x": x})
    want_bits = ref_topk(imp, 0.5)
    np.testing.assert_array_equal(out["bits"], want_bits)
    codes, xs = ref_quantize(x + x, want_bits)
    np.testing.assert_array_equal(out["y2"], ref_qlinear(codes, xs, w, ws) * 2)


def test_custom_options_encodings(lib):
    """The flexbuffer reader takes every scalar encoding a writer may pick: uint, indirect,
    float32, 2-byte map slots (forced by a long string attr), and ignores attrs it does not read
    whatever their type."""
    rng = np.random.default_rng(11)
    fbb = flexbuffers.Builder()
    with fbb.Map():
        fbb.UInt("w_bits", 4)
        fbb.IndirectInt("k", 21)
        fbb.Bool("act_mode", True)
        fbb.String("note", "x" * 300)
        fbb.Key("extra")
        with fbb.Vector():
            fbb.Int(1)
            fbb.Float(2.5)
    options = bytes(fbb.Finish())
    model, feeds, want = qlinear_graph(3, 21, 5, 4, 1, True, rng, attrs=options)
    _, out = run(model, lib, feeds)
    np.testing.assert_array_equal(out["y"], want)
    g = Graph()
    ii = g.input("importance", np.float32, [7])
    bo = g.tensor("bits", np.int32, [7])
    fbb = flexbuffers.Builder()
    with fbb.Map():
        fbb.IndirectFloat("rho", 0.5, 4)
    g.op("TFQAT_SELECT_BITS", [ii], [bo], bytes(fbb.Finish()))
    imp = rng.standard_normal(7).astype(np.float32)
    _, out = run(g.build([bo]), lib, {"importance": imp})
    np.testing.assert_array_equal(out["bits"], ref_topk(imp, 0.5))


_FUZZ_SCRIPT = """
import sys
from ai_edge_litert.interpreter import Interpreter, load_delegate
lib, paths = sys.argv[1], sys.argv[2:]
for path in paths:
    try:
        i = Interpreter(model_path=path, experimental_delegates=[load_delegate(lib)])
        i.allocate_tensors()
    except (RuntimeError, ValueError):
        pass
print("survived", len(paths))
"""


def test_malformed_custom_options_never_crash(lib, tmp_path):
    """Custom options are untrusted model bytes: truncations and corruptions of a valid map
    must end in an error message or a valid parse, never a crash (run out of process)."""
    rng = np.random.default_rng(12)
    good = flex_map({"w_bits": 4, "k": 10, "act_mode": 0, "note": "abc"})
    paths = []
    for i in range(150):
        raw = bytearray(good)
        if i < len(good):
            raw = raw[:i]
        else:
            for _ in range(int(rng.integers(1, 4))):
                raw[int(rng.integers(len(raw)))] = int(rng.integers(256))
        path = tmp_path / f"m{i}.tflite"
        path.write_bytes(qlinear_with(attrs=bytes(raw)))
        paths.append(str(path))
    proc = subprocess.run([sys.executable, "-c", _FUZZ_SCRIPT, lib, *paths],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived 150" in proc.stdout, proc.stderr[-3000:]


# ---- validation -------------------------------------------------------------------------------

def prepare_error(model: bytes, lib: str, options=None) -> str:
    with pytest.raises((RuntimeError, ValueError)) as info:
        interp = Interpreter(model_content=model,
                             experimental_delegates=[load_delegate(lib, options or {})])
        interp.allocate_tensors()
    return str(info.value)


def assert_matches(message: str, pattern: str):
    assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"


def qlinear_with(w=None, x_shape=(3, 10), ws_len=6, attrs=None) -> bytes:
    """A TFQAT_QLINEAR model (N=6, K=10, w_bits=4) with one part swapped for a bad one
    (ws_len may be a shape tuple)."""
    g = Graph()
    xi = g.input("x", np.float32, x_shape)
    bi = g.input("bits", np.int32, [x_shape[0]])
    w = pack_int4(np.zeros((6, 10), np.int8)) if w is None else w
    ins = [xi, bi, g.const("act", np.array([0.1, 0.5], np.float32)), g.const("w", w),
           g.const("ws", np.ones(ws_len, np.float32))]
    y = g.tensor("y", np.float32, [x_shape[0], 6])
    g.op("TFQAT_QLINEAR", ins, [y], attrs if attrs is not None else {"w_bits": 4, "k": 10})
    return g.build([y])


@pytest.mark.parametrize("case,pattern", [
    ("dtype", r"TFQAT_QLINEAR node 0: input 3 \(weights\) must be uint8 \[N, ceil\(K/2\)=5\] "
              r"for w_bits=4, got int8 \[6, 5\]"),
    ("rank", r"TFQAT_QLINEAR node 0: input 0 \(x\) must be float32 \[T, K\], got float32 "
             r"\[1, 3, 10\]"),
    ("n", r"TFQAT_QLINEAR node 0: input 4 \(w_scales\) must be float32 \[N=6\], got float32 \[5\]"),
    ("w_bits", r"TFQAT_QLINEAR node 0: attr w_bits must be 4 or 8, got 3"),
    ("missing_k", r"TFQAT_QLINEAR node 0: missing required attr k"),
    ("k_mismatch", r"TFQAT_QLINEAR node 0: input 0 \(x\) has K=10 but attr k=11"),
    ("k_type", r"TFQAT_QLINEAR node 0: attr k must be an int, got string"),
    ("group_ws_rank", r"TFQAT_QLINEAR node 0: input 4 \(w_scales\) must be float32 "
                      r"\[N=6, ceil\(K/G\)=1\] for group_size=32, got float32 \[6\](?![\d,])"),
    ("group_ws_groups", r"TFQAT_QLINEAR node 0: input 4 \(w_scales\) must be float32 "
                        r"\[N=6, ceil\(K/G\)=1\] for group_size=64, got float32 \[6, 2\](?![\d,])"),
    ("group_ws_n", r"TFQAT_QLINEAR node 0: input 4 \(w_scales\) must be float32 "
                   r"\[N=6, ceil\(K/G\)=1\] for group_size=32, got float32 \[5, 1\](?![\d,])"),
    ("group_size_48", r"TFQAT_QLINEAR node 0: attr group_size must be 0 \(one scale per output "
                      r"channel\) or a positive multiple of 32, got 48(?![\d,])"),
    ("group_size_16", r"TFQAT_QLINEAR node 0: attr group_size must be 0 .* got 16(?![\d,])"),
    ("group_size_neg", r"TFQAT_QLINEAR node 0: attr group_size must be 0 .* got -32(?![\d,])"),
    ("group_size_type", r"TFQAT_QLINEAR node 0: attr group_size must be an int, got string"),
])
def test_prepare_rejects(lib, case, pattern):
    kwargs = {
        "dtype": {"w": np.zeros((6, 5), np.int8)},
        "rank": {"x_shape": (1, 3, 10)},
        "n": {"ws_len": 5},
        "w_bits": {"attrs": {"w_bits": 3, "k": 10}},
        "missing_k": {"attrs": {"w_bits": 4}},
        "k_mismatch": {"attrs": {"w_bits": 4, "k": 11}},
        "k_type": {"attrs": {"w_bits": 4, "k": "ten"}},
        "group_ws_rank": {"attrs": {"w_bits": 4, "k": 10, "group_size": 32}},
        "group_ws_groups": {"attrs": {"w_bits": 4, "k": 10, "group_size": 64}, "ws_len": (6, 2)},
        "group_ws_n": {"attrs": {"w_bits": 4, "k": 10, "group_size": 32}, "ws_len": (5, 1)},
        "group_size_48": {"attrs": {"w_bits": 4, "k": 10, "group_size": 48}, "ws_len": (6, 1)},
        "group_size_16": {"attrs": {"w_bits": 4, "k": 10, "group_size": 16}, "ws_len": (6, 1)},
        "group_size_neg": {"attrs": {"w_bits": 4, "k": 10, "group_size": -32}, "ws_len": (6, 1)},
        "group_size_type": {"attrs": {"w_bits": 4, "k": 10, "group_size": "32"}, "ws_len": (6, 1)},
    }[case]
    assert_matches(prepare_error(qlinear_with(**kwargs), lib), pattern)


def test_prepare_rejects_unknown_op_and_attention_shapes(lib):
    g = Graph()
    xi = g.input("x", np.float32, [2])
    y = g.tensor("y", np.float32, [2])
    g.op("TFQAT_NOPE", [xi], [y], {})
    assert_matches(prepare_error(g.build([y]), lib),
                   r"TFQAT_NOPE node 0: unknown TFQAT op; this library implements TFQAT_QUANTIZE")
    g = Graph()
    ins = [g.input("q", np.int8, [3, 2, 8]), g.input("qs", np.float32, [2]),
           g.input("k", np.int8, [2, 6, 8]), g.input("ks", np.float32, [6]),
           g.input("len", np.int32, [1])]
    y = g.tensor("s", np.float32, [3, 2, 6])
    g.op("TFQAT_ATTN_QK", ins, [y], {"kv_bits": 8, "d": 8})
    assert_matches(prepare_error(g.build([y]), lib),
                   r"TFQAT_ATTN_QK node 0: H=3 query heads is not a multiple of Hkv=2 kv heads")
    g = Graph()
    ins = [g.input("q", np.int8, [3, 2, 8]), g.input("qs", np.float32, [2]),
           g.input("k", np.int8, [2, 6, 8]), g.input("ks", np.float32, [6]),
           g.input("len", np.int32, [1])]
    y = g.tensor("s", np.float32, [2, 3, 6])
    g.op("TFQAT_ATTN_QK", ins, [y], {"kv_bits": 8, "d": 8, "q_layout": 2})
    assert_matches(prepare_error(g.build([y]), lib), r"TFQAT_ATTN_QK node 0: .*q_layout must be 0")
    for p_max, p_type, pattern in ((256, np.float32, r"attr p_max must be in \[0, 255\]"),
                                   (255, np.uint8, r"input 0 \(probabilities\) must be float32"),
                                   (0, np.float32, r"input 0 \(p_codes\) must be uint8")):
        g = Graph()
        ins = [g.input("p", p_type, [2, 2, 6]), g.input("ps", np.float32, [1]),
               g.input("v", np.int8, [2, 6, 8]), g.input("rb", np.int32, [6]),
               g.input("vs", np.float32, [2]), g.input("len", np.int32, [1])]
        y = g.tensor("o", np.float32, [2, 2, 8])
        g.op("TFQAT_ATTN_PV", ins, [y], {"kv_bits": 8, "d": 8, "p_max": p_max})
        assert_matches(prepare_error(g.build([y]), lib), r"TFQAT_ATTN_PV node 0: " + pattern)


@pytest.mark.parametrize("attrs,p_type,outs,ps_absent,pattern", [
    ({"p_mode": 1}, np.uint8, 1, False,
     r"attr p_mode=1 \(a dynamic scale per probability row\) needs float probabilities in: "
     r"set p_max in \[1, 255\], got p_max=0(?!\d)"),
    ({"p_mode": 2, "p_max": 255}, np.float32, 1, False,
     r"attr p_mode must be 0 \(one static p_scale\) or 1 \(a dynamic scale per probability "
     r"row\), got 2(?!\d)"),
    ({"p_mode": -1, "p_max": 255}, np.float32, 1, False, r"attr p_mode must be 0 .* got -1(?!\d)"),
    ({"p_mode": "1", "p_max": 255}, np.float32, 1, False,
     r"attr p_mode must be an int, got string"),
    ({"p_mode": 1, "p_max": 255}, np.uint8, 1, False,
     r"input 0 \(probabilities\) must be float32 \[H, T, S_cap=6\] for p_max > 0, got uint8"),
    ({"p_max": 255}, np.float32, 1, True, r"input 1 \(p_scale\) must be float32 \[1\], got absent"),
    ({"p_mode": 1, "p_max": 255}, np.float32, 3, False, r"expects 1 or 2 outputs, got 3"),
    ({"p_mode": 1, "p_max": 255}, np.float32, "int32", False,
     r"output 1 \(p_scales\) must be float32 \[H=2, T=3\], got int32 \[2, 3\]"),
])
def test_attn_pv_p_mode_prepare_errors(lib, attrs, p_type, outs, ps_absent, pattern):
    g = Graph()
    ins = [g.input("p", p_type, [2, 3, 6]), -1 if ps_absent else g.input("ps", np.float32, [1]),
           g.input("v", np.int8, [2, 6, 8]), g.input("rb", np.int32, [6]),
           g.input("vs", np.float32, [2]), g.input("len", np.int32, [1])]
    ys = [g.tensor("o", np.float32, [2, 3, 8])]
    if outs == "int32":
        ys.append(g.tensor("ps_out", np.int32, [2, 3]))
    else:
        ys += [g.tensor(f"ps_out{i}", np.float32, [2, 3]) for i in range(1, outs)]
    g.op("TFQAT_ATTN_PV", ins, ys, {"kv_bits": 8, "d": 8, **attrs})
    assert_matches(prepare_error(g.build(ys), lib), r"TFQAT_ATTN_PV node 0: " + pattern)


def test_invoke_rejects_bad_runtime_values(lib):
    rng = np.random.default_rng(7)
    model, feeds, _ = qlinear_graph(3, 8, 4, 8, 0, False, rng)
    feeds["bits"] = np.array([8, 5, 4], np.int32)
    with pytest.raises(RuntimeError, match=r"TFQAT_QLINEAR node 0: bits\[1\] = 5; must be 4 or 8"):
        run(model, lib, feeds)
    g = Graph()
    ins = [g.input("q", np.int8, [2, 3, 8]), g.input("qs", np.float32, [3]),
           g.input("k", np.int8, [1, 6, 8]), g.input("ks", np.float32, [6]),
           g.input("len", np.int32, [1])]
    y = g.tensor("s", np.float32, [2, 3, 6])
    g.op("TFQAT_ATTN_QK", ins, [y], {"kv_bits": 8, "d": 8})
    feeds = {"q": np.zeros((2, 3, 8), np.int8), "qs": np.ones(3, np.float32),
             "k": np.zeros((1, 6, 8), np.int8), "ks": np.ones(6, np.float32),
             "len": np.array([2], np.int32)}
    with pytest.raises(RuntimeError, match=r"input 4 \(length\) = 2 must be in \[T=3, S_cap=6\]"):
        run(g.build([y]), lib, feeds)


@pytest.mark.parametrize("options,pattern", [
    ({"bogus": "1"}, r"unknown option 'bogus'; options are: isa, num_threads, dump_abi"),
    ({"isa": "pentium"}, r"option isa=pentium is unknown; available here: ref"),
    ({"isa": "neon" if os.uname().machine == "x86_64" else "avx2"},
     r"is not available on this CPU or build; available here: ref"),
])
def test_load_rejects_bad_options(lib, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_delegate(lib, options)


# ai_edge_litert's Delegate.__del__ trips over the half-built object; that is its noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_library_is_a_clear_error(tmp_path):
    missing = tmp_path / "libtfqat_ops.so"
    with pytest.raises(OSError, match="libtfqat_ops.so"):
        load_delegate(str(missing))


def test_exports_only_the_plugin_entry_points(lib):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    out = subprocess.run([nm, "-D", "--defined-only", lib], capture_output=True, text=True,
                         check=True).stdout
    names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    assert names == ["tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate"]


# ---- the ABI declarations against the real runtime --------------------------------------------

def test_abi_matches_interpreter(lib, tmp_path):
    """What the delegate read through our own struct declarations (dump_abi) must equal what
    the interpreter reports for the same tensors: index, name, type, shape, byte size, and a
    checksum of constant data (which proves the data pointer offset)."""
    rng = np.random.default_rng(8)
    model, feeds, want = qlinear_graph(5, 27, 12, 4, 0, True, rng)
    dump = tmp_path / "abi.json"
    interp, out = run(model, lib, feeds, {"dump_abi": str(dump)})
    np.testing.assert_array_equal(out["y"], want)
    got = json.loads(dump.read_text())
    details = {d["index"]: d for d in interp.get_tensor_details()}
    assert got["tensors_size"] == len(details)
    (node,) = got["nodes"]
    assert node["op"] == "TFQAT_QLINEAR" and node["node_index"] == 0
    assert node["custom_options_size"] > 0
    consts = {"act_scales", "w", "w_scales", "bias"}
    for t in node["inputs"] + node["outputs"]:
        d = details[t["index"]]
        assert t["name"] == d["name"]
        assert t["type"] == _TYPE_NAMES[np.dtype(d["dtype"])]
        assert t["dims"] == list(d["shape"])
        assert t["bytes"] == int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize
        if t["name"] in consts:
            assert t["allocation_type"] == "kTfLiteMmapRo"
            value = interp.get_tensor(t["index"])
            assert t["byte_sum"] == int(np.frombuffer(value.tobytes(), np.uint8).sum())
        else:
            assert t["allocation_type"] == "kTfLiteArenaRw"
    assert [t["name"] for t in node["inputs"]] == ["x", "bits", "act_scales", "w", "w_scales",
                                                   "bias"]


# ---- the export route: a TF composite becomes a TFQAT_QLINEAR the delegate runs ---------------

def test_tf_composite_converts_to_a_delegated_qlinear(lib):
    """DESIGN.md's export route end to end: a `tfl_fusable_op` composite whose weights are
    tf.Variables of the module handed to the converter comes out as one TFQAT_QLINEAR custom op
    with the contract's inputs and attrs, and the delegate reproduces the TF body exactly."""
    tf = pytest.importorskip("tensorflow")
    t, k, n = 5, 37, 12
    rng = np.random.default_rng(9)
    w = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    implements = ('name: "TFQAT_QLINEAR" attr {key: "tfl_fusable_op" value {b: true}} '
                  f'attr {{key: "w_bits" value {{i: 4}}}} attr {{key: "k" value {{i: {k}}}}} '
                  'attr {key: "act_mode" value {i: 0}}')

    @tf.function(experimental_implements=implements)
    def qlinear(x, bits, act, w_packed, ws, bias):  # the exact integer reference, in TF
        is8 = tf.equal(bits, 8)
        s = tf.where(is8, act[0], act[1])
        qmax = tf.where(is8, 127.0, 7.0)[:, None]
        q = tf.clip_by_value(tf.round(x / s[:, None]), -qmax - 1.0, qmax)
        wi = tf.cast(w_packed, tf.int32)
        nibbles = tf.stack([tf.bitwise.bitwise_and(wi, 15), tf.bitwise.right_shift(wi, 4)], -1)
        nibbles = tf.reshape(nibbles, [tf.shape(w_packed)[0], -1])[:, :k]
        codes = nibbles - 16 * tf.cast(nibbles >= 8, tf.int32)
        acc = tf.matmul(tf.cast(q, tf.int32), codes, transpose_b=True)
        return tf.cast(acc, tf.float32) * (s[:, None] * ws[None, :]) + bias

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.act = tf.Variable(np.array([0.03, 0.4], np.float32))
            self.w = tf.Variable(pack_int4(w))
            self.ws = tf.Variable((rng.random(n) * 0.05 + 0.01).astype(np.float32))
            self.bias = tf.Variable(rng.standard_normal(n).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([t, k], tf.float32),
                                      tf.TensorSpec([t], tf.int32)])
        def __call__(self, x, bits):
            return qlinear(x, bits, self.act, self.w, self.ws, self.bias)

    module = Linear()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module)
    converter.allow_custom_ops = True
    model = converter.convert()

    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    sub = parsed.subgraphs[0]
    (op,) = sub.operators
    assert parsed.operatorCodes[op.opcodeIndex].customCode == b"TFQAT_QLINEAR"
    types = [sub.tensors[i].type for i in op.inputs]
    assert types == [schema.TensorType.FLOAT32, schema.TensorType.INT32, schema.TensorType.FLOAT32,
                     schema.TensorType.UINT8, schema.TensorType.FLOAT32, schema.TensorType.FLOAT32]
    assert flexbuffers.Loads(bytes(op.customOptions)) == {"act_mode": 0, "k": k, "w_bits": 4}

    x = (rng.standard_normal((t, k)) * 2).astype(np.float32)
    bits = rand_bits(rng, t)
    interp = Interpreter(model_content=model, experimental_delegates=[load_delegate(lib)])
    runner = interp.get_signature_runner()
    got = next(iter(runner(x=x, bits=bits).values()))
    np.testing.assert_array_equal(got, module(x, bits).numpy())


@pytest.mark.parametrize("w_bits,act_mode,bias", [(4, 0, True), (8, 1, False)])
def test_grouped_qlinear_op_converts_to_a_delegated_qlinear(lib, w_bits, act_mode, bias):
    """tfqat.export.qlinear_op with group_size=G (the exporter's composite) comes out as one
    TFQAT_QLINEAR with the group_size attr and [N, ceil(K/G)] scales, and the delegate reproduces
    its TF body bit for bit; both equal the numpy reference."""
    tf = pytest.importorskip("tensorflow")
    from tfqat.export import qlinear_op

    t, k, n, group_size = 5, 200, 12, 32  # 7 groups, the last of 8 inputs
    ng = -(-k // group_size)
    rng = np.random.default_rng(31 + w_bits)
    w = rng.integers(-8, 8 if w_bits == 4 else 128, size=(n, k)).astype(np.int8)
    act = np.array([0.03, 0.4], np.float32)
    ws = (rng.random((n, ng)) * 0.05 + 0.01).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.act = tf.Variable(act)
            self.w = tf.Variable(pack_int4(w) if w_bits == 4 else w)
            self.ws = tf.Variable(ws)
            self.bias = tf.Variable(b) if bias else None

        @tf.function(input_signature=[tf.TensorSpec([t, k], tf.float32),
                                      tf.TensorSpec([t], tf.int32)])
        def __call__(self, x, bits):
            return qlinear_op(x, bits, self.act, self.w, self.ws, self.bias, w_bits=w_bits, k=k,
                              act_mode=act_mode, group_size=group_size)

    module = Linear()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module)
    converter.allow_custom_ops = True
    model = converter.convert()

    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    sub = parsed.subgraphs[0]
    (op,) = sub.operators
    assert parsed.operatorCodes[op.opcodeIndex].customCode == b"TFQAT_QLINEAR"
    assert flexbuffers.Loads(bytes(op.customOptions)) == {
        "act_mode": act_mode, "k": k, "w_bits": w_bits, "group_size": group_size}
    assert list(sub.tensors[op.inputs[4]].shape) == [n, ng]
    assert len(op.inputs) == (6 if bias else 5)

    x = (rng.standard_normal((t, k)) * 2).astype(np.float32)
    bits = rand_bits(rng, t)
    interp = Interpreter(model_content=model, experimental_delegates=[load_delegate(lib)])
    got = next(iter(interp.get_signature_runner()(x=x, bits=bits).values()))
    codes, xs = ref_quantize(x, bits, act if act_mode == 0 else None)
    assert_same_bits(module(x, bits).numpy(), ref_qlinear_grouped(codes, xs, w, ws, group_size,
                                                                  b if bias else None))
    assert_same_bits(got, module(x, bits).numpy())


def _wide_range_grouped_case():
    """20 groups with scales of both signs spanning many binades (where any other summation
    order than the contract's shows) and signed-zero products (0.0 + -0.0 is +0.0)."""
    t, k, n, group_size = 9, 640, 24, 32
    rng = np.random.default_rng(32)
    w = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    ws = (np.exp2(rng.uniform(-20, 4, size=(n, k // group_size))) *
          rng.choice([-1.0, 1.0], size=(n, k // group_size))).astype(np.float32)
    ws[::3, 0] = 0.0
    ws[1] = -np.abs(ws[1])
    x = (rng.standard_normal((t, k)) * 2).astype(np.float32)
    x[0] = 0.0  # a zero row: every product is a signed zero, -0.0 on all of channel 1
    bits = rand_bits(rng, t)
    act = np.array([0.03, 0.4], np.float32)
    codes, xs = ref_quantize(x, bits, act)
    want = ref_qlinear_grouped(codes, xs, w, ws, group_size)
    # A sum started from the first product instead of 0.0 keeps -0.0 where the contract has
    # +0.0: the case tells the two apart.
    prods = [(codes[:, lo:lo + group_size].astype(np.int64) @
              w[:, lo:lo + group_size].astype(np.int64).T).astype(np.float32) * ws[None, :, g]
             for g, lo in enumerate(range(0, k, group_size))]
    alt = prods[0]
    for p in prods[1:]:
        alt = alt + p
    assert (np.signbit(alt * xs[:, None]) != np.signbit(want)).any()
    return t, k, n, group_size, w, ws, x, bits, act, want


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
def test_qlinear_grouped_keeps_the_contract_order(lib, isa):
    t, k, n, group_size, w, ws, x, bits, act, want = _wide_range_grouped_case()
    g = Graph()
    ins = [g.input("x", np.float32, [t, k]), g.input("bits", np.int32, [t]), g.const("act", act),
           g.const("w", pack_int4(w)), g.const("ws", ws)]
    y = g.tensor("y", np.float32, [t, n])
    g.op("TFQAT_QLINEAR", ins, [y], {"w_bits": 4, "k": k, "group_size": group_size})
    _, out = run(g.build([y]), lib, {"x": x, "bits": bits}, {"isa": isa} if isa else None)
    assert_same_bits(out["y"], want)


def test_qlinear_op_grouped_body_keeps_the_contract_order():
    """The TF body's float sum over groups follows the contract exactly, signed zeros included."""
    tf = pytest.importorskip("tensorflow")
    from tfqat.export import qlinear_op

    t, k, n, group_size, w, ws, x, bits, act, want = _wide_range_grouped_case()

    @tf.function(input_signature=[tf.TensorSpec([t, k], tf.float32), tf.TensorSpec([t], tf.int32)])
    def run_op(x, bits):
        return qlinear_op(x, bits, tf.constant(act), tf.constant(pack_int4(w)), tf.constant(ws),
                          w_bits=4, k=k, group_size=group_size)

    assert_same_bits(run_op(x, bits).numpy(), want)
    with pytest.raises(ValueError, match="group_size=48 must be 0"):
        qlinear_op(x, bits, act, pack_int4(w), ws, w_bits=4, k=k, group_size=48)


@pytest.mark.parametrize("kv_bits,p_mode,return_p_scales", [(4, 1, True), (8, 1, False),
                                                             (8, 0, True)])
def test_attn_pv_op_converts_to_a_delegated_attn_pv(lib, kv_bits, p_mode, return_p_scales):
    """tfqat.export.attn_pv_op with float probabilities comes out as one TFQAT_ATTN_PV with the
    p_max attr, p_mode only when 1, and output 1 (the row scales) only when asked for; the
    delegate reproduces the TF body bit for bit, and both equal the numpy reference (p_mode=1:
    a NaN, an all-zero row and junk past S, which the op never reads)."""
    tf = pytest.importorskip("tensorflow")
    from tfqat.export import attn_pv_op

    h, hkv, t, d, s_cap, length, p_max = 4, 2, 5, 13, 24, 11, 255
    rng = np.random.default_rng(97 + kv_bits + p_mode)
    pf = causal_softmax(rng, h, t, s_cap, length)
    pf[0, 1, :] = 0.0
    pf[1, 2, 3] = np.nan
    pf[2, 4, length:] = 3.0
    v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
    rowbits = rand_bits(rng, s_cap)
    rowbits[length:] = 0
    vs = np.array([0.02, 0.3], np.float32)
    ps = np.array([1 / 255], np.float32)

    class PV(tf.Module):
        def __init__(self):
            super().__init__()
            self.vs = tf.Variable(vs)
            self.ps = tf.Variable(ps)

        @tf.function(input_signature=[tf.TensorSpec(pf.shape, tf.float32),
                                      tf.TensorSpec(v_store.shape, tf.as_dtype(v_store.dtype)),
                                      tf.TensorSpec([s_cap], tf.int32),
                                      tf.TensorSpec([1], tf.int32)])
        def __call__(self, p, vc, rb, n):
            return attn_pv_op(p, None if p_mode else self.ps, vc, rb, self.vs, n, kv_bits=kv_bits,
                              d=d, p_max=p_max, p_mode=p_mode, return_p_scales=return_p_scales)

    module = PV()
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module)
    converter.allow_custom_ops = True
    model = converter.convert()

    parsed = schema.ModelT.InitFromPackedBuf(model, 0)
    sub = parsed.subgraphs[0]
    (op,) = sub.operators
    assert parsed.operatorCodes[op.opcodeIndex].customCode == b"TFQAT_ATTN_PV"
    want_attrs = {"kv_bits": kv_bits, "d": d, "p_max": p_max, **({"p_mode": 1} if p_mode else {})}
    assert flexbuffers.Loads(bytes(op.customOptions)) == want_attrs
    assert len(op.inputs) == 6 and len(op.outputs) == (2 if return_p_scales else 1)

    length_in = np.array([length], np.int32)
    tf_out = module(pf, v_store, rowbits, length_in)
    tf_out = [x.numpy() for x in (tf_out if return_p_scales else [tf_out])]
    interp = Interpreter(model_content=model, experimental_delegates=[load_delegate(lib)])
    got = interp.get_signature_runner()(p=pf, vc=v_store, rb=rowbits, n=length_in)
    got = [got[k] for k in sorted(got)]  # output_0, output_1
    if p_mode:
        codes, scales = ref_probs_per_row(pf, p_max, length)
    else:
        q = np.round(pf / ps[0])
        codes = np.where(np.isnan(q), 0, np.clip(q, 0, p_max)).astype(np.uint8)
        scales = np.full((h, t), ps[0], np.float32)
    want = [ref_attn_pv(codes, scales if p_mode else ps[0], v_codes, rowbits, vs, length), scales]
    for g, b, w in zip(got, tf_out, want):
        assert_same_bits(b, w)
        assert_same_bits(g, b)


def test_graph_side_row_scales_need_no_mask(lib):
    """The row scales can also be recomputed in the graph without the op's valid-position mask:
    after a softmax over ATTN_QK's -inf scores every future or invalid probability is exactly 0,
    so max over all of S_cap / p_max (a true division: a division by a constant becomes a
    multiplication by its reciprocal under grappler, hence divide_no_nan) is the op's scale. In
    TF, and in LiteRT, whose SOFTMAX feeds the delegated op."""
    tf = pytest.importorskip("tensorflow")
    from tfqat.export import attn_pv_op

    h, hkv, t, d, s_cap, length, p_max = 3, 1, 6, 8, 20, 9, 255
    rng = np.random.default_rng(98)
    scores = (rng.standard_normal((h, t, s_cap)) * 4).astype(np.float32)
    future = np.arange(s_cap)[None, :] > (length - t + np.arange(t))[:, None]
    scores[:, future] = -np.inf
    v_codes, v_store = cache(rng, 8, hkv, s_cap, d)
    rowbits = np.full(s_cap, 8, np.int32)
    vs = np.array([0.02, 0.3], np.float32)

    class Attn(tf.Module):
        def __init__(self):
            super().__init__()
            self.vs = tf.Variable(vs)

        @tf.function(input_signature=[tf.TensorSpec(scores.shape, tf.float32),
                                      tf.TensorSpec(v_store.shape, tf.int8),
                                      tf.TensorSpec([s_cap], tf.int32),
                                      tf.TensorSpec([1], tf.int32)])
        def __call__(self, s, vc, rb, n):
            p = tf.nn.softmax(s, axis=-1)
            o, rows = attn_pv_op(p, None, vc, rb, self.vs, n, kv_bits=8, d=d, p_max=p_max,
                                 p_mode=1, return_p_scales=True)
            return {"o": o, "rows": rows, "p": p,
                    "recomputed": tf.math.divide_no_nan(tf.reduce_max(p, axis=-1), float(p_max))}

    module = Attn()
    length_in = np.array([length], np.int32)
    tf_out = {k: v.numpy() for k, v in module(scores, v_store, rowbits, length_in).items()}
    assert (tf_out["p"][:, future] == 0).all()
    assert_same_bits(tf_out["recomputed"], tf_out["rows"])

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.__call__.get_concrete_function()], module)
    converter.allow_custom_ops = True
    interp = Interpreter(model_content=converter.convert(),
                         experimental_delegates=[load_delegate(lib)])
    got = interp.get_signature_runner()(s=scores, vc=v_store, rb=rowbits, n=length_in)
    p = got["p"]
    assert (p[:, future] == 0).all()
    codes, rows = ref_probs_per_row(p, p_max, length)
    assert_same_bits(got["rows"], p.max(axis=-1) / np.float32(p_max))
    assert_same_bits(got["rows"], rows)
    assert_same_bits(got["o"], ref_attn_pv(codes, rows, v_codes, rowbits, vs, length))
