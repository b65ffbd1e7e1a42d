"""tfqat.runtime: threads, the memory-mapped model, one copy of the weights, RSS helpers.

The LiteModel tests use the micro export of test_export (its ``exported`` fixture); the memory
tests a synthetic one-op model large enough to span many pages.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from test_delegate import Graph  # the .tflite writer of the delegate tests
from test_export import exported, ops_lib  # noqa: F401 (fixtures: the micro export, the delegate)

ROOT = Path(__file__).resolve().parents[1]


def _lite(exported, **kw):
    from tfqat.runtime import LiteModel

    return LiteModel(exported["dir"] / "model.tflite", lib=exported["lib"], **kw)


def test_threads_give_the_same_bits(exported):
    """Prefill logits and greedy decode steps with 2 and 3 threads equal 1 thread bit for bit."""
    tokens = list(exported["tok"].encode("It is a truth universally acknowledged, that a single man"))
    runs = []
    for threads in (1, 2, 3):
        m = _lite(exported, threads=threads)
        assert m.threads == threads
        logits = [m.prefill(tokens)]
        for _ in range(6):
            logits.append(m.decode(int(logits[-1].reshape(-1, m.vocab_size)[-1].argmax()))[None])
        runs.append(np.concatenate([x.reshape(-1) for x in logits]))
    for got in runs[1:]:
        np.testing.assert_array_equal(got.view(np.uint32), runs[0].view(np.uint32))


@pytest.mark.parametrize("kw,shown", [({"threads": 0}, "threads=0"), ({"threads": -2}, "threads=-2"),
                                      ({"num_threads": 0}, "threads=0"), ({"threads": 1.5}, "threads=1.5")])
def test_threads_below_one_is_one_line(exported, kw, shown):
    from tfqat.runtime import TfqatRuntimeError

    with pytest.raises(TfqatRuntimeError) as e:
        _lite(exported, **kw)
    assert str(e.value) == f"{shown}: must be an integer >= 1"


def test_model_file_is_mapped_not_read(exported):
    """LiteRT maps the file (Interpreter(model_path=...)): it shows in /proc/self/maps."""
    if not Path("/proc/self/maps").is_file():
        pytest.skip("no /proc/self/maps on this OS")
    m = _lite(exported)
    path = str((exported["dir"] / "model.tflite").resolve())
    maps = Path("/proc/self/maps").read_text()
    assert any(line.endswith(path) for line in maps.splitlines()), "model.tflite is not mmapped"
    m.prefill([1, 2, 3])


def test_rss_helpers():
    from tfqat.runtime import peak_rss_mb, rss_mb

    before = peak_rss_mb()
    block = np.ones(64 * 1024 * 1024 // 8)  # 64 MiB touched
    assert rss_mb() > 32 and peak_rss_mb() >= before
    assert peak_rss_mb() >= rss_mb() - 1  # the peak bounds the current value
    del block


def _mapping_rss_kb(path: str) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("isa,packed_copy", [(None, True), ("ref", False)])
def test_one_copy_of_the_weights(ops_lib, isa, packed_copy):
    """A 2 MiB int8 weight matrix in a mapped model: a SIMD table packs its own layout and then
    releases the file's pages (MADV_PAGEOUT), so the mapping holds almost nothing after Prepare;
    the reference table's layout is the file's, so it runs on the mapped weights in place (no
    packed copy) and they stay resident."""
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    rng = np.random.default_rng(0)
    n, k = 1024, 2048
    g = Graph()
    ins = [g.input("x", np.float32, [1, k]), g.input("bits", np.int32, [1]),
           g.const("act", np.array([0.03, 0.4], np.float32)),
           g.const("w", rng.integers(-128, 128, size=(n, k)).astype(np.int8)),
           g.const("ws", np.full(n, 0.01, np.float32))]
    y = g.tensor("y", np.float32, [1, n])
    g.op("TFQAT_QLINEAR", ins, [y], {"w_bits": 8, "k": k, "act_mode": 1})
    # A disk file (not tmpfs, whose pages can only go to swap), flushed so its pages are clean.
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    path = build / f"test-runtime-pages-{os.getpid()}-{isa}.tflite"
    try:
        with open(path, "wb") as f:
            f.write(g.build([y]))
            f.flush()
            os.fsync(f.fileno())
        interp = Interpreter(model_path=str(path),
                             experimental_delegates=[load_delegate(ops_lib, {"isa": isa} if isa else {})])
        interp.allocate_tensors()
        details = interp.get_input_details()
        interp.set_tensor(details[0]["index"], np.ones((1, k), np.float32))
        interp.set_tensor(details[1]["index"], np.full(1, 8, np.int32))
        interp.invoke()
        resident = _mapping_rss_kb(str(path.resolve()))
        weights_kb = n * k // 1024
        if packed_copy:
            assert resident < weights_kb // 4, f"{resident} kB of the mapped weights still resident"
        else:
            assert resident >= weights_kb * 9 // 10, f"only {resident} kB resident: not run in place?"
        del interp
    finally:
        path.unlink(missing_ok=True)


# ---- prefill_last: the last position's logits for generation -------------------------------------

def test_prefill_last_signature_shares_the_weights(exported):
    """The export has a third signature, prefill_last, returning prefill's outputs with one row of
    logits and the same TFQAT ops; its subgraph reads the same constant buffers (the file holds
    each weight matrix once, not once per signature)."""
    from tfqat.export.checks import inspect_tflite

    data = (exported["dir"] / "model.tflite").read_bytes()
    info = inspect_tflite(data)
    sigs = info["signatures"]
    assert sorted(sigs) == ["decode", "prefill", "prefill_last"]
    assert set(sigs["prefill_last"]["outputs"]) == set(sigs["prefill"]["outputs"])
    assert sigs["prefill_last"]["outputs"]["logits"][1][0] == 1
    tfqat_ops = {k: v for k, v in sigs["prefill"]["ops"].items() if k.startswith("TFQAT_")}
    assert {k: v for k, v in sigs["prefill_last"]["ops"].items() if k.startswith("TFQAT_")} == tfqat_ops
    per_signature = sum(q["w_bytes"] for q in info["qlinear"]) / 3  # every QLINEAR appears 3 times
    const_int = info["const_bytes"].get("uint8", 0) + info["const_bytes"].get("int8", 0)
    assert const_int < 1.5 * per_signature, (const_int, per_signature)
    manifest = exported["res"]["manifest_data"]
    assert "prefill_last" in manifest["files"]["model"]["signatures"]


@pytest.mark.parametrize("name", ["model.tflite", "model_float.tflite"])
def test_prefill_last_equals_the_last_row(exported, name):
    """prefill(last_only=True) runs prefill_last: the last row of prefill's logits (the head is a
    float FULLY_CONNECTED here, run by XNNPACK, whose GEMM may round a 1-row call differently:
    within 1e-5) and the same cache rows, so decoding continues identically."""
    from tfqat.runtime import LiteModel

    kw = {"allow_float": True} if name == "model_float.tflite" else {}
    m = LiteModel(exported["dir"] / name, lib=exported["lib"], **kw)
    tokens = list(exported["tok"].encode("To be, or not to be, that is the question"))
    full = m.prefill(tokens)
    nxt_full = m.decode(int(full[-1].argmax()))
    last = m.prefill(tokens, last_only=True)
    assert last.shape == (1, m.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)
    nxt_last = m.decode(int(last[0].argmax()))
    np.testing.assert_allclose(nxt_last, nxt_full, rtol=1e-5, atol=1e-5)
    assert "prefill_last" in m.signatures


def test_generate_uses_prefill_last(exported, monkeypatch):
    """generate() asks for the last row only; its tokens equal greedy decoding from prefill."""
    from tfqat.runtime import LiteModel

    m = LiteModel(exported["dir"] / "model.tflite", lib=exported["lib"])
    tokens = list(exported["tok"].encode("It is a truth"))
    seen = []
    real = m.prefill
    monkeypatch.setattr(m, "prefill", lambda t, last_only=False: seen.append(last_only) or real(t, last_only))
    out = list(m.generate(tokens, max_new_tokens=8))
    assert seen == [True]
    logits, want = real(tokens)[-1], []
    for _ in range(8):
        want.append(int(np.argmax(logits)))
        logits = m.decode(want[-1])
    assert out == want[:len(out)]
