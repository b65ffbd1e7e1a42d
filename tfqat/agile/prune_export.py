"""Activation-aware token pruning in the exported prefill (Agile-Quant, METHOD.md sec. 5).

:func:`build_pruned_module` wraps :func:`tfqat.export.build_module`'s layers (no copy of the
layer code): after block l's residual add the prefill drops ``drops[l]`` tokens with the least
importance (attention to token 0 summed over heads, from block l's own probabilities: the same
``importance`` the token-adaptive bit selection uses, read from the module), never token 0 and
never the last token (whose logits generation needs). Kept tokens keep their order and their
original RoPE positions, exactly as :func:`tfqat.agile.pruning.forward_pruned` does in Keras.

Graph (stock TFLite builtins): ``drops = GATHER(table, T)`` (a constant ``[P+1, L]`` table of
:func:`~tfqat.agile.pruning.drop_counts` for every prompt length, so the in-graph counts are the
integers the Keras path uses), ``TOPK_V2(score, k = T_l - drops[l])`` (score = importance, +inf
for token 0 and the last), ``SCATTER_ND`` of the kept indices into a mask, ``WHERE`` -> ascending
kept indices (no SORT), ``GATHER`` of the hidden states, positions and bits. Layers with a zero
ratio cost nothing.

Signatures of a pruned export (the unpruned export is unchanged):

- ``prefill(tokens [T])``: ``logits [T_L, V]`` for the tokens that reach the head (the last row
  is the last token), ``logit_positions int32 [T_L]`` (their original positions), the per-layer
  cache rows ``k_l, ks_l, v_l, vb_l`` with ``T_l`` rows (layer l's cache holds only the tokens
  that reached layer l) and ``kv_len int32 [L]`` (= ``T_l``).
- ``decode(token [1], position [1], kv_len [L], caches..., [thresholds])``: ``position`` is the
  token's true position (its RoPE angle); ``kv_len[l]`` is how many rows layer l's cache holds
  (the new row is written at row ``kv_len[l]`` and attention covers rows ``0..kv_len[l]``). The
  caller writes the returned rows at ``kv_len[l]`` and adds 1 to every entry. Chosen over a
  per-entry position table because K is cached after RoPE: cached rows never need their
  position again, only the new token does.

:class:`PrunedLiteModel` runs such a file in LiteRT with the delegate (``prefill``/``decode``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tfqat.agile.pruning import drop_counts, parse_schedule


def prune_table(ratios: list[float], max_positions: int) -> np.ndarray:
    """int32 ``[max_positions + 1, L]``: tokens dropped after each layer for a prompt of T tokens."""
    return np.array([drop_counts(ratios, max(t - 2, 0)) for t in range(max_positions + 1)], np.int32)


def _export_module(spec):
    """The module ``spec`` comes from: ``tfqat.export``, or ``__main__`` under ``python -m
    tfqat.export`` (its classes differ from the importable module's)."""
    import sys

    return sys.modules[type(spec).__module__]


def check_schedule(spec, layers: int, error=None) -> list[float]:
    """:func:`parse_schedule` with a one-line ``error`` (default :class:`tfqat.export.ExportError`)."""
    if error is None:
        from tfqat.export import ExportError as error
    ExportError = error

    if isinstance(spec, str) and "," in spec and len(spec.split(",")) > layers:
        raise ExportError(f"prune schedule {spec!r}: {len(spec.split(','))} entries for {layers} layers")
    try:
        ratios = parse_schedule(spec, layers)
    except ValueError as e:
        if str(e).startswith("prune schedule"):
            raise ExportError(str(e)) from None
        raise ExportError(f"prune schedule {spec!r}: use 'progressive:R' or per-layer fractions "
                          f"'r0,r1,...' (at most {layers})") from None
    return ratios


def _select_keep(tf, importance, prunable, n_drop):
    """Ascending indices of the kept tokens (TOPK_V2 + SCATTER_ND + WHERE)."""
    t = tf.shape(importance)[0]
    score = tf.where(prunable, importance, tf.constant(np.inf, tf.float32))
    _, idx = tf.math.top_k(score, k=t - n_drop, sorted=False)
    mask = tf.scatter_nd(idx[:, None], tf.ones_like(idx), tf.reshape(t, [1]))
    return tf.cast(tf.reshape(tf.where(mask > 0), [-1]), tf.int32)


def build_pruned_module(spec, ratios: list[float]):
    """The export module of ``spec`` with pruned ``prefill`` and ``kv_len``-aware ``decode``."""
    import tensorflow as tf

    exp = _export_module(spec)
    build_module, decode_cache_specs = exp.build_module, exp.decode_cache_specs
    cfg = spec.cfg
    L = cfg.layers
    if len(ratios) != L:
        raise ValueError(f"{len(ratios)} ratios for {L} layers")
    module = build_module(spec)
    q_spec = spec.quantized
    adaptive = q_spec and spec.rho is not None
    table = tf.constant(prune_table(ratios, cfg.max_positions))

    def layer(i, x, positions, bits, cache, thresholds):
        if q_spec:
            return module._quant_layer(i, x, positions, bits, cache, thresholds)
        x, rows = module._float_layer(i, x, positions, cache)
        return x, rows, None, None

    def prefill(tokens):
        t = tf.shape(tokens)[0]
        pos = tf.range(t)
        x = module._embed(tokens, pos)
        drops = tf.gather(table, t)  # [L]
        prunable = tf.logical_and(pos > 0, pos < t - 1)
        bits = tf.fill([t], tf.constant(8, tf.int32)) if adaptive else None
        outs, thrs, lens = {}, [], []
        for i in range(L):
            x, rows, own, thr = layer(i, x, pos, bits, None, None)
            lens.append(tf.shape(x)[0])
            if adaptive:
                bits = own
                thrs.append(thr)
            for key, val in rows.items():
                outs[f"{key}_{i}"] = val
            if ratios[i] > 0:
                keep = _select_keep(tf, module.last_importance, prunable, drops[i])
                x, pos, prunable = tf.gather(x, keep), tf.gather(pos, keep), tf.gather(prunable, keep)
                if bits is not None:
                    bits = tf.gather(bits, keep)
        outs["logits"] = module._logits(x)
        outs["logit_positions"] = pos
        outs["kv_len"] = tf.stack(lens)
        if thrs:
            outs["thresholds"] = tf.stack(thrs)
        return outs

    cache_specs = decode_cache_specs(spec)
    names = ["token", "position", "kv_len"] + [n for n, _, _ in cache_specs]

    def decode(*args):
        feeds = dict(zip(names, args))
        true_pos = feeds["position"]
        x = module._embed(feeds["token"], true_pos)
        bits = tf.fill([1], tf.constant(8, tf.int32)) if adaptive else None
        outs = {}
        rope = module._rope
        # The layer code takes one ``positions`` for the cache row and RoPE; give it the row
        # (kv_len[l]) and rotate at the true position.
        object.__setattr__(module, "_rope", lambda v, _p: rope(v, true_pos))
        try:
            for i in range(L):
                keys = ("k", "v") if not q_spec else ("k", "ks", "v", "vb")
                cache = {k: feeds[f"{k}_cache_{i}"] for k in keys}
                slot = feeds["kv_len"][i: i + 1]
                x, rows, own, _ = layer(i, x, slot, bits, cache, feeds.get("thresholds"))
                if adaptive:
                    bits = own
                for key, val in rows.items():
                    outs[f"{key}_{i}"] = val
        finally:
            object.__delattr__(module, "_rope")
        outs["logits"] = module._logits(x)
        return outs

    module.prefill = tf.function(prefill, input_signature=[tf.TensorSpec([None], tf.int32, name="tokens")])
    module.decode = tf.function(decode, input_signature=[
        tf.TensorSpec([1], tf.int32, name="token"), tf.TensorSpec([1], tf.int32, name="position"),
        tf.TensorSpec([L], tf.int32, name="kv_len"),
    ] + [tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype in cache_specs])
    return module


def convert_pruned(spec, ratios: list[float]) -> bytes:
    """The .tflite bytes of ``spec`` with a pruned prefill (as :func:`tfqat.export.convert`)."""
    export = _export_module(spec)
    return export.convert(spec, build_pruned_module(spec, ratios), " (pruned prefill)")


def interpreter(path, lib: str | None = None, num_threads: int = 1):
    """A stock LiteRT interpreter for ``path`` (XNNPACK for builtins; our delegate when the file
    holds TFQAT ops)."""
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    from tfqat.runtime import find_library, model_ops

    data = Path(path).read_bytes()
    delegates = []
    if any(o.startswith("TFQAT_") for o in model_ops(data)):
        delegates.append(load_delegate(lib or find_library(), {}))
    return Interpreter(model_content=data, experimental_delegates=delegates, num_threads=num_threads)


class PrunedLiteModel:
    """A pruned export in the stock LiteRT interpreter (delegate loaded for TFQAT ops).

    ``prefill(tokens)`` -> logits ``[T_L, V]`` (last row: the last token), ``decode(token)`` ->
    ``[V]``; the cache lives in numpy arrays held here (simple, not the in-place fast path of
    :class:`tfqat.runtime.LiteModel`)."""

    def __init__(self, path, lib: str | None = None, num_threads: int = 1):
        self.interp = interpreter(path, lib, num_threads)
        self._pre = self.interp.get_signature_runner("prefill")
        self._dec = self.interp.get_signature_runner("decode")
        det = self._dec.get_input_details()
        if "kv_len" not in det:
            raise ValueError(f"{path}: not a pruned export (decode has no kv_len input)")
        self.cache_names = [n for n in det if "_cache_" in n]
        self.cache = {n: np.zeros(d["shape"], d["dtype"]) for n, d in det.items() if "_cache_" in n}
        self.has_thr = "thresholds" in det
        self.kv_len = None
        self.position = 0

    def prefill_raw(self, tokens) -> dict:
        return self._pre(tokens=np.asarray(tokens, np.int32))

    def prefill(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int32)
        out = self.prefill_raw(tokens)
        for n in self.cache_names:
            v = self.cache[n]
            v[...] = 8 if n.startswith("vb_") else 0
            rows = out[n.replace("_cache_", "_")]
            if v.ndim == 1:
                v[: len(rows)] = rows
            else:
                v[:, : rows.shape[1]] = rows
        self.kv_len = out["kv_len"].astype(np.int32).copy()
        self.thresholds = out.get("thresholds")
        self.position = len(tokens)
        self.logit_positions = out["logit_positions"]
        return out["logits"]

    def decode(self, token: int) -> np.ndarray:
        feeds = dict(self.cache, token=np.array([token], np.int32),
                     position=np.array([self.position], np.int32), kv_len=self.kv_len)
        if self.has_thr:
            feeds["thresholds"] = self.thresholds
        out = self._dec(**feeds)
        for n in self.cache_names:
            layer = int(n.rsplit("_", 1)[1])
            v, rows, s = self.cache[n], out[n.replace("_cache_", "_")], int(self.kv_len[layer])
            if v.ndim == 1:
                v[s] = rows[0]
            else:
                v[:, s] = rows[:, 0]
        self.kv_len += 1
        self.position += 1
        return out["logits"][0]


def time_exported_prefill(paths: dict, seq_len: int, vocab: int, repeats: int = 20, lib: str | None = None,
                          seed: int = 0) -> dict:
    """Median ms per prompt token of each export's prefill signature (pruned or not), each file
    in its own stock interpreter (:func:`interpreter`, one thread), runs interleaved, one process:
    ``paths`` {label: model.tflite}."""
    tokens = np.random.default_rng(seed).integers(0, vocab, seq_len).astype(np.int32)
    runners = {}
    for label, p in paths.items():
        pre = interpreter(p, lib).get_signature_runner("prefill")
        runners[label] = lambda x, pre=pre: pre(tokens=x)
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn(tokens)  # warm-up
    for _ in range(repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(tokens)
            times[k].append(time.perf_counter() - t0)
    return {k: {"ms_per_token": 1000 * float(np.median(v)) / seq_len, "ms": 1000 * float(np.median(v))}
            for k, v in times.items()}
