"""Threads in libtfqat_ops.so: N threads give the bits of 1 thread, through the stock LiteRT
interpreter.

The thread count reaches the delegate two ways, both tested: the interpreter's
(``Interpreter(num_threads=N)``, read from ``TfLiteContext::recommended_num_threads``) and the
delegate option ``num_threads``. Every op the delegate splits into tiles runs on random inputs at
odd sizes large enough to be split (prefill GEMMs into token x channel tiles, decode GEMVs into
channel ranges, attention into head x query-block or kv-head x position tiles) and must equal the
one-thread result bit for bit, and the numpy reference of the contract where one is at hand.
Timing is not tested here (benchmarks/ measures speed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, load_delegate

from test_delegate import (ALL_ISAS, Graph, assert_same_bits, cache, causal_softmax, delegate, lib,  # noqa: F401
                           qlinear_graph, rand_bits, ref_attn_pv, ref_attn_qk)

THREADS = [2, 3, 4]


def run_with(model: bytes, lib: str, feeds: dict, threads: int, via: str, isa=None, extra=None):
    """Outputs by name with `threads` threads given to the interpreter ("interpreter") or as the
    delegate option ("option", the interpreter keeping 1)."""
    options = dict(extra or {})
    if isa:
        options["isa"] = isa
    if via == "option":
        options["num_threads"] = str(threads)
    interp = Interpreter(model_content=model, experimental_delegates=[delegate(lib, options)],
                         num_threads=threads if via == "interpreter" else 1)
    interp.allocate_tensors()
    by_name = {d["name"]: d for d in interp.get_tensor_details()}
    for name, value in feeds.items():
        interp.set_tensor(by_name[name]["index"], value)
    interp.invoke()
    return {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}


def same_bits(got, want, msg):
    """Bit-exact equality for any dtype (float32 compared as its bit patterns: -0.0 != +0.0)."""
    if got.dtype == np.float32:
        assert_same_bits(got, want, msg)
    else:
        np.testing.assert_array_equal(got, want, err_msg=msg)


def assert_threads_match(model, lib, feeds, isa=None, want=None):
    """Every thread count, both ways, equals one thread (and `want`, the reference, if given)."""
    one = run_with(model, lib, feeds, 1, "interpreter", isa)
    if want is not None:
        for name, value in want.items():
            same_bits(one[name], value, name)
    for threads in THREADS:
        for via in ("interpreter", "option"):
            got = run_with(model, lib, feeds, threads, via, isa)
            for name in one:
                same_bits(got[name], one[name], f"{name}: {threads} threads via {via}")


# ---- TFQAT_QLINEAR --------------------------------------------------------------------------

@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("w_bits,group_size,act_mode", [(4, 0, 0), (8, 0, 1), (4, 32, 1), (8, 64, 0)])
@pytest.mark.parametrize("t,k,n", [
    (1, 515, 301),    # decode GEMV: channel ranges, a partial last panel
    (37, 131, 259),   # prefill: token x channel tiles, odd everything
    (130, 67, 129),   # many tokens, few channels: token blocks do the splitting
])
def test_qlinear_threads(lib, isa, w_bits, group_size, act_mode, t, k, n):
    rng = np.random.default_rng(t * 7 + k + n + w_bits + group_size)
    model, feeds, want = qlinear_graph(t, k, n, w_bits, act_mode, True, rng, group_size=group_size)
    assert_threads_match(model, lib, feeds, isa, {"y": want})


def test_quantize_rows_threads(lib):
    """TFQAT_QUANTIZE splits its rows over the threads: same codes and scales."""
    rng = np.random.default_rng(5)
    t, k = 150, 77
    g = Graph()
    xi, bi = g.input("x", np.float32, [t, k]), g.input("bits", np.int32, [t])
    codes, scales = g.tensor("codes", np.int8, [t, k]), g.tensor("scales", np.float32, [t])
    g.op("TFQAT_QUANTIZE", [xi, bi], [codes, scales], {"mode": 1})
    feeds = {"x": (rng.standard_normal((t, k)) * 3).astype(np.float32), "bits": rand_bits(rng, t)}
    assert_threads_match(g.build([codes, scales]), lib, feeds)


# ---- TFQAT_ATTN_QK / TFQAT_ATTN_PV ------------------------------------------------------------

def qk_model(h, hkv, t, d, s_cap, kv_bits, q_layout, rng, length):
    q = rng.integers(-128, 128, size=(h, t, d)).astype(np.int8)
    qs = (rng.random(t) * 0.1 + 0.01).astype(np.float32)
    k_codes, k_store = cache(rng, kv_bits, hkv, s_cap, d)
    ks = (rng.random(s_cap) * 0.1 + 0.01).astype(np.float32)
    g = Graph()
    ins = [g.input("q", np.int8, [t, h, d] if q_layout else [h, t, d]), g.input("qs", np.float32, [t]),
           g.input("k_cache", k_store.dtype, k_store.shape), g.input("ks", np.float32, [s_cap]),
           g.input("length", np.int32, [1])]
    out_t = g.tensor("scores", np.float32, [h, t, s_cap])
    g.op("TFQAT_ATTN_QK", ins, [out_t], {"kv_bits": kv_bits, "d": d, "q_layout": q_layout})
    feeds = {"q": np.ascontiguousarray(q.transpose(1, 0, 2)) if q_layout else q, "qs": qs, "k_cache": k_store,
             "ks": ks, "length": np.array([length], np.int32)}
    return g.build([out_t]), feeds, ref_attn_qk(q, qs, k_codes, ks, length)


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("h,hkv,t,d,s_cap,length,q_layout", [
    (4, 2, 37, 40, 45, 40, 0),     # prefill: (head, block of 16 queries) tiles, a partial block
    (6, 2, 1, 40, 301, 300, 0),    # decode: (kv head, positions) tiles, a partial last range
    (9, 3, 1, 64, 700, 517, 1),    # decode, SmolLM2's heads, q as [T, H, D]
])
def test_attn_qk_threads(lib, isa, kv_bits, h, hkv, t, d, s_cap, length, q_layout):
    rng = np.random.default_rng(h + t + s_cap + kv_bits)
    model, feeds, want = qk_model(h, hkv, t, d, s_cap, kv_bits, q_layout, rng, length)
    assert_threads_match(model, lib, feeds, isa, {"scores": want})


@pytest.mark.parametrize("isa", [None] + ALL_ISAS)
@pytest.mark.parametrize("kv_bits", [4, 8])
@pytest.mark.parametrize("h,hkv,t,d,s_cap,length,float_p", [
    (4, 2, 37, 40, 45, 40, False),   # prefill, uint8 codes
    (4, 2, 37, 40, 45, 40, True),    # prefill, float probabilities, a scale per row
    (6, 2, 1, 40, 301, 300, False),  # decode, per-head tiles
    (9, 3, 1, 64, 700, 517, True),   # decode, float probabilities, a scale per row
])
def test_attn_pv_threads(lib, isa, kv_bits, h, hkv, t, d, s_cap, length, float_p):
    rng = np.random.default_rng(3 * h + t + s_cap + kv_bits)
    v_codes, v_store = cache(rng, kv_bits, hkv, s_cap, d)
    rowbits = rand_bits(rng, s_cap)
    rowbits[length:] = 0
    vs = np.array([0.02, 0.3], np.float32)
    g = Graph()
    if float_p:
        p = causal_softmax(rng, h, t, s_cap, length)
        attrs = {"kv_bits": kv_bits, "d": d, "p_max": 255, "p_mode": 1}
    else:
        p = rng.integers(0, 256, size=(h, t, s_cap)).astype(np.uint8)
        attrs = {"kv_bits": kv_bits, "d": d}
    ins = [g.input("p", p.dtype.type, p.shape), -1 if float_p else g.input("ps", np.float32, [1]),
           g.input("v_cache", v_store.dtype, v_store.shape), g.input("rowbits", np.int32, [s_cap]),
           g.input("vs", np.float32, [2]), g.input("length", np.int32, [1])]
    outs = [g.tensor("out", np.float32, [h, t, d])]
    if float_p:
        outs.append(g.tensor("p_scales", np.float32, [h, t]))
    g.op("TFQAT_ATTN_PV", ins, outs, attrs)
    feeds = {"p": p, "v_cache": v_store, "rowbits": rowbits, "vs": vs, "length": np.array([length], np.int32)}
    want = None
    if not float_p:
        ps = np.array([1 / 255], np.float32)
        feeds["ps"] = ps
        want = {"out": ref_attn_pv(p, ps[0], v_codes, rowbits, vs, length)}
    assert_threads_match(g.build(outs), lib, feeds, isa, want)


# ---- how the count arrives, and bad counts ------------------------------------------------------

@pytest.mark.parametrize("interp_threads,option,expect", [(None, None, 1), (3, None, 3), (3, "2", 2), (1, "4", 4)])
def test_thread_count_reaches_the_delegate(lib, tmp_path, interp_threads, option, expect):
    """The delegate reads the interpreter's count through our TfLiteContext declaration (checked
    against what Python passed); the option overrides it."""
    rng = np.random.default_rng(1)
    model, feeds, want = qlinear_graph(3, 40, 20, 4, 0, False, rng)
    dump = tmp_path / "abi.json"
    options = {"dump_abi": str(dump)}
    if option:
        options["num_threads"] = option
    interp = Interpreter(model_content=model, experimental_delegates=[load_delegate(lib, options)],
                         num_threads=interp_threads)
    interp.allocate_tensors()
    got = json.loads(dump.read_text())
    assert got["recommended_num_threads"] == (interp_threads or 1)
    assert got["threads"] == expect


@pytest.mark.parametrize("value", ["0", "-1", "1025", "two", "", "1.5"])
def test_bad_num_threads_option_is_one_line(lib, value):
    with pytest.raises(ValueError) as e:
        load_delegate(lib, {"num_threads": value})
    line = str(e.value).strip().splitlines()[-1]
    assert line == f"libtfqat_ops: option num_threads={value} must be an integer from 1 to 1024"
