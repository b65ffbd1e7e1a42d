"""Run an exported model (``model.tflite`` with TFQAT_* ops, or ``model_float.tflite``) in the stock
LiteRT interpreter with our delegate library, without importing TensorFlow.

Example:
    >>> m = load_model("runs/tiny/export-w4a4-8/model.tflite")   # doctest: +SKIP
    >>> logits = m.prefill([1, 2, 3])         # [3, V], fills the KV cache
    >>> nxt = m.decode(int(logits[-1].argmax()))  # [V]

The delegate library is ``$TFQAT_OPS_LIB`` or ``tfqat/_lib/libtfqat_ops.so`` (built by
``pip install -e .``). XNNPACK runs the builtin ops, our delegate the TFQAT_* ones; both use
``threads`` threads (the delegate's results are bit-identical for any count).

The model file is memory-mapped (LiteRT's ``Interpreter(model_path=...)``), never read into the
heap: the weights XNNPACK and our delegate repack are paged in once while they pack (the delegate
then releases the file's pages, see tflite_ops/README.md "Threads and memory"), the rest (the
embedding table) is paged in as it is used. :func:`peak_rss_mb` reports what that costs.

The KV cache lives in the decode signature's own input buffers: prefill's rows are copied in
once, and each decode step writes its one new row per layer in place (see tfqat/export/kv_cache.py
for the cache format). Problems a user can fix raise :class:`RuntimeError_` subclasses with one line.
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .tflite_schema import is_tflite, op_name

LIB_ENV = "TFQAT_OPS_LIB"


class TfqatRuntimeError(RuntimeError):
    """A problem with the model file, the delegate library or the input: one line."""


RuntimeError_ = TfqatRuntimeError


def find_library() -> str:
    """Path of libtfqat_ops.so: ``$TFQAT_OPS_LIB`` or the one ``pip install -e .`` built."""
    env = os.environ.get(LIB_ENV)
    if env:
        if not Path(env).is_file():
            raise TfqatRuntimeError(f"delegate library {env} (from ${LIB_ENV}) does not exist; "
                                    "fix the path or unset it")
        return env
    path = Path(__file__).resolve().parent / "_lib" / "libtfqat_ops.so"
    if not path.is_file():
        raise TfqatRuntimeError(f"delegate library libtfqat_ops.so not found at {path}; build it with "
                                f"pip install -e . or set ${LIB_ENV} to its path")
    return str(path)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``resource.getrusage``: Linux
    reports KiB, macOS bytes). For benchmarks: read it in a fresh process after the work."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Current resident set size in MiB (``/proc/self/statm``; the peak where that is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def check_threads(threads) -> int:
    """``threads`` as an int >= 1.

    Raises:
        TfqatRuntimeError: not an integer, or below 1 (one line naming the limit).
    """
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise TfqatRuntimeError(f"threads={threads!r}: must be an integer >= 1")
    return int(threads)


def map_file(path: Path):
    """The file's bytes as a read-only mmap (b"" for an empty file): the flatbuffer readers below
    index it like bytes without copying the model into the heap."""
    with open(path, "rb") as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return b""


def model_ops(data: bytes) -> list:
    """Names of the ops of a .tflite (builtin names and custom codes), reading the flatbuffer only.

    Raises:
        TfqatRuntimeError: not a TFLite flatbuffer, or truncated.
    """
    from ai_edge_litert import schema_py_generated as schema

    if not is_tflite(data):
        raise TfqatRuntimeError("not a TFLite model (file identifier TFL3 missing)")
    try:
        m = schema.Model.GetRootAs(data, 0)
        out = []
        for i in range(m.OperatorCodesLength()):
            oc = m.OperatorCodes(i)
            out.append(op_name(oc.BuiltinCode(), oc.DeprecatedBuiltinCode(), oc.CustomCode()))
        # touch the last buffer: a truncated file fails here rather than inside the interpreter
        if m.BuffersLength():
            m.Buffers(m.BuffersLength() - 1).DataLength()
        return out
    except Exception as e:  # flatbuffers raises struct/Index errors on garbage
        raise TfqatRuntimeError(f"corrupt or truncated TFLite model ({type(e).__name__})") from None


def model_signatures(data: bytes) -> list:
    """Signature keys of a .tflite (``["prefill", "decode"]`` for our exports; ``[]`` for a model
    without signatures), reading the flatbuffer only.

    Raises:
        TfqatRuntimeError: not a TFLite flatbuffer, or truncated.
    """
    from ai_edge_litert import schema_py_generated as schema

    if not is_tflite(data):
        raise TfqatRuntimeError("not a TFLite model (file identifier TFL3 missing)")
    try:
        m = schema.Model.GetRootAs(data, 0)
        return [(m.SignatureDefs(i).SignatureKey() or b"").decode() for i in range(m.SignatureDefsLength())]
    except Exception as e:  # flatbuffers raises struct/Index errors on garbage
        raise TfqatRuntimeError(f"corrupt or truncated TFLite model ({type(e).__name__})") from None


class LiteModel:
    """One exported model in a LiteRT interpreter, with its KV cache.

    Args:
        path: the .tflite.
        lib: delegate library (default :func:`find_library`); not loaded for a model without
            TFQAT ops.
        threads: threads for the whole model, >= 1 (default 1): the interpreter's count, which
            XNNPACK and our delegate both take (the delegate reads it from the interpreter's
            context; a ``num_threads`` entry in ``delegate_options`` overrides it for the
            delegate). ``num_threads`` is the same argument under its older name.
        allow_float: accept a model without TFQAT ops (the FP export, or a baseline).
        delegate_options: passed to ``load_delegate`` (e.g. ``{"isa": "ref"}``).

    Raises:
        TfqatRuntimeError: missing / truncated / foreign file, missing library, no TFQAT ops
            (unless ``allow_float``), no prefill/decode signatures, threads below 1.
    """

    def __init__(self, path, lib: Optional[str] = None, threads: int = 1,
                 allow_float: bool = False, delegate_options: Optional[dict] = None,
                 num_threads: Optional[int] = None):
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        self.threads = check_threads(threads if num_threads is None else num_threads)
        self.path = Path(path)
        if not self.path.is_file():
            raise TfqatRuntimeError(f"{self.path}: no such model file")
        data = map_file(self.path)
        try:
            ops = model_ops(data)
        except TfqatRuntimeError as e:
            raise TfqatRuntimeError(f"{self.path}: {e}") from None
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
        self.ops = ops
        self.quantized = any(o.startswith("TFQAT_") for o in ops)
        foreign = sorted({o for o in ops if not o.startswith("TFQAT_") and not o.isupper()}
                         | {o for o in ops if o.startswith("Flex")})
        if foreign:
            raise TfqatRuntimeError(f"{self.path}: custom ops {foreign} are not ours (TFQAT_*); this "
                                    "runtime cannot run them")
        if not self.quantized and not allow_float:
            raise TfqatRuntimeError(f"{self.path}: no TFQAT_* ops; not a tfqat quantized export "
                                    "(use model.tflite from python -m tfqat.export, or allow_float "
                                    "for model_float.tflite)")
        delegates = []
        if self.quantized:
            lib = lib or find_library()
            if not Path(lib).is_file():
                raise TfqatRuntimeError(f"delegate library {lib} does not exist")
            try:
                delegates.append(load_delegate(lib, delegate_options or {}))
            except (ValueError, OSError) as e:
                raise TfqatRuntimeError(f"cannot load delegate {lib}: "
                                        f"{str(e).strip().splitlines()[-1]}") from None
            self.lib = lib
        try:
            # model_path: LiteRT maps the file (no heap copy of the model).
            self.interp = Interpreter(model_path=str(self.path), experimental_delegates=delegates,
                                      num_threads=self.threads)
        except (ValueError, RuntimeError) as e:
            msg = str(e).strip().splitlines()
            raise TfqatRuntimeError(f"{self.path}: the interpreter rejects it "
                                    f"({msg[0] if msg else type(e).__name__})") from None
        sigs = self.interp.get_signature_list()
        if "prefill" not in sigs or "decode" not in sigs:
            raise TfqatRuntimeError(f"{self.path}: not a tfqat export (signatures {sorted(sigs)}, need "
                                    "prefill and decode)")
        self._w = self.interp._interpreter  # the wrapper: subgraph-aware tensor views
        # prefill (every position's logits, for scoring) and prefill_last (the last one's, for
        # generation; exports before it have none) get their runners, and so their tensors, on
        # first use: a generation never allocates the scoring prefill's.
        self.signatures = sorted(sigs)
        self._prefill_runners: dict = {}
        self._dec = self.interp.get_signature_runner("decode")
        self._dec_sub = self._dec._subgraph_index
        self._dec_in = dict(self._dec._inputs)
        self._dec_out = dict(self._dec._outputs)
        self._w.AllocateTensors(self._dec_sub)
        details = self._dec.get_input_details()
        self.capacity = int(details["k_cache_0"]["shape"][1])
        self.vocab_size = int(self._dec.get_output_details()["logits"]["shape"][-1])
        self.cache_names = [n for n in self._dec_in if "_cache_" in n]
        # decode's per-step bookkeeping, resolved once: (cache input, new-rows output) indices
        self._rows = [(self._dec_in[n], self._dec_out[n.replace("_cache_", "_")])
                      for n in self.cache_names]
        self._tok_idx, self._pos_idx = self._dec_in["token"], self._dec_in["position"]
        self._logits_idx = self._dec_out["logits"]
        self.manifest = None
        mpath = self.path.parent / "manifest.json"
        if mpath.is_file():
            try:
                self.manifest = json.loads(mpath.read_text())
            except ValueError:
                self.manifest = None
        self.position = 0
        self.reset()

    # -- helpers --------------------------------------------------------------------------------
    def _view(self, name: str) -> np.ndarray:
        return self._w.tensor(self.interp, self._dec_in[name], self._dec_sub)

    def reset(self) -> None:
        """Empty the KV cache."""
        for n in self.cache_names:
            v = self._view(n)
            v[...] = 8 if n.startswith("vb_") else 0
        if "thresholds" in self._dec_in:
            self._view("thresholds")[...] = np.inf
        self.position = 0

    def _check_tokens(self, tokens) -> np.ndarray:
        t = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if t.size == 0:
            raise TfqatRuntimeError("empty prompt; give at least one token")
        if t.min() < 0 or t.max() >= self.vocab_size:
            raise TfqatRuntimeError(f"token id {int(t.max() if t.max() >= self.vocab_size else t.min())} "
                                    f"is outside the vocabulary [0, {self.vocab_size})")
        return t.astype(np.int32)

    # -- the signatures ---------------------------------------------------------------------------
    def _prefill_runner(self, key: str):
        if key not in self._prefill_runners:
            self._prefill_runners[key] = self.interp.get_signature_runner(key)
        return self._prefill_runners[key]

    def prefill(self, tokens: Sequence[int], last_only: bool = False) -> np.ndarray:
        """Run the prompt (positions 0..T-1; empties the cache first); returns logits [T, V], or
        with ``last_only`` the last position's, [1, V] (what generation needs: the export's
        ``prefill_last`` signature runs the head for that row alone)."""
        tokens = self._check_tokens(tokens)
        if tokens.size > self.capacity:
            raise TfqatRuntimeError(f"prompt has {tokens.size} tokens but the model's context is "
                                    f"{self.capacity}; shorten the prompt")
        last_sig = last_only and "prefill_last" in self.signatures
        out = self._prefill_runner("prefill_last" if last_sig else "prefill")(tokens=tokens)
        self.reset()
        t = tokens.size
        for n in self.cache_names:
            rows = out[n.replace("_cache_", "_")]
            v = self._view(n)
            if v.ndim == 1:
                v[:t] = rows
            else:
                v[:, :t] = rows
        if "thresholds" in self._dec_in:
            self._view("thresholds")[...] = out["thresholds"]
        self.position = t
        return out["logits"][-1:] if last_only else out["logits"]

    def decode(self, token: int) -> np.ndarray:
        """One token at the next position; returns its logits [V]."""
        if self.position >= self.capacity:
            raise TfqatRuntimeError(f"context full: the model holds {self.capacity} tokens")
        if isinstance(token, (int, np.integer)) and 0 <= token < self.vocab_size:
            tok = int(token)
        else:
            tok = int(self._check_tokens([token])[0])
        p = self.position
        # Per step this is ~1 us of Python per cache tensor (fresh views, never held across an
        # Invoke, so a reallocation cannot leave a stale pointer): the model runs in ~0.1 ms.
        w, it, sub = self._w, self.interp, self._dec_sub
        w.tensor(it, self._tok_idx, sub)[0] = tok
        w.tensor(it, self._pos_idx, sub)[0] = p
        w.Invoke(sub)
        for i_in, i_out in self._rows:
            v, rows = w.tensor(it, i_in, sub), w.tensor(it, i_out, sub)
            if v.ndim == 1:
                v[p] = rows[0]
            else:
                v[:, p] = rows[:, 0]
        self.position = p + 1
        return w.GetTensor(self._logits_idx, sub)[0]

    # -- conveniences ------------------------------------------------------------------------------
    def logprobs(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``log p(target)`` ``[B, L]`` by prefill per row (a :data:`tfqat.evaluate.LogprobFn`)."""
        out = np.zeros(np.shape(inputs), np.float64)
        for b, (x, y) in enumerate(zip(np.asarray(inputs), np.asarray(targets))):
            logits = self.prefill(x).astype(np.float64)
            m = logits.max(-1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
            out[b] = logits[np.arange(len(y)), y] - lse
        return out

    def generate(self, prompt: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, seed: Optional[int] = None,
                 stop: Iterable[int] = ()) -> Iterable[int]:
        """Yield new token ids: greedy (``temperature == 0``) or sampled (temperature, top-k).

        Stops at ``max_new_tokens``, a ``stop`` id, or a full context.
        """
        rng = np.random.default_rng(seed)
        stop = set(stop)
        logits = self.prefill(prompt, last_only=True)[-1]
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, rng)
            yield tok
            if tok in stop or i == max_new_tokens - 1 or self.position >= self.capacity:
                return
            logits = self.decode(tok)


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0,
           rng: Optional[np.random.Generator] = None) -> int:
    """Greedy when ``temperature <= 0``; else softmax(logits / T) over the top-k (0 = all)."""
    logits = np.asarray(logits, np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits / temperature
    if 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    z = np.exp(z - z.max())
    return int(rng.choice(z.size, p=z / z.sum()))


def load_model(path, **kwargs) -> LiteModel:
    """:class:`LiteModel` (see its arguments)."""
    return LiteModel(path, **kwargs)
