"""Activation-aware token pruning in the exported prefill (Agile-Quant, METHOD.md sec. 5).

:class:`PrunedInferenceModule` runs :class:`tfqat.export.graph.InferenceModule`'s layers (no copy
of the layer code): after block l's residual add the prefill drops ``drops[l]`` tokens with the least
importance (attention to token 0 summed over heads, from block l's own probabilities: the same
``importance`` the token-adaptive bit selection uses, returned by the layer), never token 0 and
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
import tensorflow as tf

from tfqat.agile.pruning import drop_counts, parse_schedule
from tfqat.export.graph import InferenceModule, convert
from tfqat.export.spec import ExportError, ModelSpec


def prune_table(ratios: list[float], max_positions: int) -> np.ndarray:
    """int32 ``[max_positions + 1, L]``: tokens dropped after each layer for a prompt of T tokens."""
    return np.array([drop_counts(ratios, max(t - 2, 0)) for t in range(max_positions + 1)], np.int32)


def check_schedule(spec, layers: int, error=ExportError) -> list[float]:
    """:func:`parse_schedule` with a one-line ``error`` (:class:`~tfqat.export.spec.ExportError`,
    or e.g. the CLI's ``UserError``)."""
    if isinstance(spec, str) and "," in spec and len(spec.split(",")) > layers:
        raise error(f"prune schedule {spec!r}: {len(spec.split(','))} entries for {layers} layers")
    try:
        ratios = parse_schedule(spec, layers)
    except ValueError as e:
        if str(e).startswith("prune schedule"):
            raise error(str(e)) from None
        raise error(f"prune schedule {spec!r}: use 'progressive:R' or per-layer fractions "
                    f"'r0,r1,...' (at most {layers})") from None
    return ratios


def _select_keep(importance, prunable, n_drop):
    """Ascending indices of the kept tokens (TOPK_V2 + SCATTER_ND + WHERE)."""
    t = tf.shape(importance)[0]
    score = tf.where(prunable, importance, tf.constant(np.inf, tf.float32))
    _, idx = tf.math.top_k(score, k=t - n_drop, sorted=False)
    mask = tf.scatter_nd(idx[:, None], tf.ones_like(idx), tf.reshape(t, [1]))
    return tf.cast(tf.reshape(tf.where(mask > 0), [-1]), tf.int32)


class PrunedInferenceModule(InferenceModule):
    """:class:`~tfqat.export.graph.InferenceModule` with a pruned ``prefill`` and a
    ``kv_len``-aware ``decode`` (see the module docstring); the layers are the export's own."""

    def __init__(self, spec: ModelSpec, ratios: list[float]):
        if len(ratios) != spec.cfg.layers:
            raise ValueError(f"{len(ratios)} ratios for {spec.cfg.layers} layers")
        super().__init__(spec)
        self.ratios = tuple(ratios)
        self.table = tf.constant(prune_table(ratios, spec.cfg.max_positions))

    def _decode_inputs(self) -> list:
        base = super()._decode_inputs()  # token, position, caches...
        return base[:2] + [tf.TensorSpec([self.spec.cfg.layers], tf.int32, name="kv_len")] + base[2:]

    def _prefill(self, tokens):
        t = tf.shape(tokens)[0]
        pos = tf.range(t)
        x = self._embed(tokens, pos)
        drops = tf.gather(self.table, t)  # [L]
        prunable = tf.logical_and(pos > 0, pos < t - 1)
        bits = tf.fill([t], tf.constant(8, tf.int32)) if self.adaptive else None
        outs, thrs, lens = {}, [], []
        for i, layer in enumerate(self.layers):
            out = layer(x, pos, bits)
            x = out.x
            lens.append(tf.shape(x)[0])
            if self.adaptive:
                bits = out.bits
                thrs.append(out.threshold)
            for key, val in out.rows.items():
                outs[f"{key}_{i}"] = val
            if self.ratios[i] > 0:
                keep = _select_keep(out.importance, prunable, drops[i])
                x, pos, prunable = tf.gather(x, keep), tf.gather(pos, keep), tf.gather(prunable, keep)
                if bits is not None:
                    bits = tf.gather(bits, keep)
        outs["logits"] = self._logits(x)
        outs["logit_positions"] = pos
        outs["kv_len"] = tf.stack(lens)
        if thrs:
            outs["thresholds"] = tf.stack(thrs)
        return outs

    def _decode(self, *args):
        feeds = dict(zip(self._decode_names, args))
        true_pos = feeds["position"]
        x = self._embed(feeds["token"], true_pos)
        bits = tf.fill([1], tf.constant(8, tf.int32)) if self.adaptive else None
        outs = {}
        for i, layer in enumerate(self.layers):
            cache = self._layer_cache(feeds, i)
            slot = feeds["kv_len"][i: i + 1]
            # the new row goes to cache row kv_len[i], RoPE at the token's true position
            out = layer(x, slot, bits, cache, feeds.get("thresholds"), rope_positions=true_pos)
            x = out.x
            if self.adaptive:
                bits = out.bits
            for key, val in out.rows.items():
                outs[f"{key}_{i}"] = val
        outs["logits"] = self._logits(x)
        return outs


def build_pruned_module(spec: ModelSpec, ratios: list[float]) -> PrunedInferenceModule:
    """The export module of ``spec`` with pruned ``prefill`` and ``kv_len``-aware ``decode``."""
    return PrunedInferenceModule(spec, ratios)


def convert_pruned(spec: ModelSpec, ratios: list[float]) -> bytes:
    """The .tflite bytes of ``spec`` with a pruned prefill (as :func:`tfqat.export.graph.convert`)."""
    return convert(spec, build_pruned_module(spec, ratios), " (pruned prefill)")


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
