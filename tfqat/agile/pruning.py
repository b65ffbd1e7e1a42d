"""Activation-aware token pruning (Agile-Quant), run from outside the model over ``model.blocks``.

After block l's residual add, the ``drop_l`` prunable tokens with the least importance (attention
to token 0 summed over heads, from block l's own probabilities) leave the sequence; layers l+1..
see the shorter sequence (cascade). Kept tokens keep their order and their *original* positions
(RoPE is applied at the gathered positions by temporarily swapping ``block.attn.rope`` for
:class:`_PositionedRope`; the model's code is untouched).

Schedule: ``ratios[l]`` is the fraction of the window's *originally* prunable tokens dropped after
layer l (so ``sum(ratios) <= 1``; the last layer's entry buys nothing and must be 0).
``parse_schedule("progressive:0.5", L)`` spreads 0.5 evenly over layers 0..L-2.

Scoring rule (perplexity stays comparable): only tokens whose prediction is not scored may be
pruned (the context half of a sliding evaluation window, never token 0); every scored target
keeps its position to the end and is scored on the same windows and targets as
:func:`tfqat.evaluate.perplexity` (verified equal with no pruning). The first window (all
positions scored) is therefore never pruned. In prefill (generation) every token but token 0 and
the last is prunable: :func:`prefill_cost` estimates that speedup from the token counts.
"""

from __future__ import annotations

import math
import time

import numpy as np
import tensorflow as tf


class _PositionedRope:
    def __init__(self, rope, positions):
        self.rope, self.positions = rope, positions  # positions int (B, T')

    def __call__(self, x, positions=None):
        cos = tf.gather(self.rope.cos, self.positions)[:, None]  # (B, 1, T', D)
        sin = tf.gather(self.rope.sin, self.positions)[:, None]
        from tfqat.models.rope import rotate_half

        return x * cos + rotate_half(x) * sin


def parse_schedule(spec, layers: int) -> list[float]:
    """``"0.2,0.2,0"`` (per layer, padded with 0) or ``"progressive:R"`` -> per-layer ratios."""
    if spec is None or spec in ("", "none", "0"):
        return [0.0] * layers
    if isinstance(spec, (list, tuple)):
        ratios = [float(r) for r in spec]
    elif str(spec).startswith("progressive:"):
        total = float(str(spec).split(":", 1)[1])
        n = max(layers - 1, 1)
        ratios = [total / n] * (layers - 1) + [0.0]
    else:
        ratios = [float(r) for r in str(spec).split(",")]
    ratios = (ratios + [0.0] * layers)[:layers]
    if any(r < 0 for r in ratios) or sum(ratios) > 1 + 1e-9:
        raise ValueError(f"prune schedule {spec!r}: ratios must be >= 0 and sum to <= 1")
    if ratios[-1] > 0:
        raise ValueError(f"prune schedule {spec!r}: pruning after the last layer saves nothing; set it to 0")
    return ratios


def drop_counts(ratios: list[float], n_prunable: int) -> list[int]:
    """Tokens dropped after each layer (rounded on the cumulative fraction, never above n)."""
    cum = np.floor(np.cumsum(ratios) * n_prunable + 1e-9).astype(int)
    cum = np.minimum(cum, n_prunable)
    return [int(v) for v in np.diff(np.concatenate([[0], cum]))]


def select_keep(importance, prunable, n_drop: int):
    """Indices (B, T - n_drop), ascending, of the tokens kept: the ``n_drop`` prunable tokens with
    the least importance go. ``prunable`` bool (B, T); each row needs >= n_drop prunable tokens."""
    t = tf.shape(importance)[1]
    score = tf.where(prunable, tf.cast(importance, tf.float32), np.float32(np.inf))
    keep_n = t - n_drop
    _, idx = tf.math.top_k(score, k=keep_n, sorted=False)
    return tf.sort(idx, axis=-1)


ORDERS = ("least", "random", "most")


def _order_scores(importance, order: str, layer: int):
    """What :func:`select_keep` ranks: the importance (``"least"``: the spec, the least attention
    to token 0 goes), a fixed random score (``"random"``, control) or its negation (``"most"``:
    the tokens paying the most attention to token 0 go, control)."""
    if order == "least":
        return importance
    if order == "most":
        return -tf.cast(importance, tf.float32)
    if order == "random":
        return tf.random.stateless_uniform(tf.shape(importance), seed=[17, layer])
    raise ValueError(f"pruning order {order!r}: use one of {ORDERS}")


def forward_pruned(model, tokens, prunable, drops: list[int], token_bits=None, order: str = "least"):
    """``(logits (B, T_f, V), positions (B, T_f), tokens per layer)`` with cascade pruning.

    ``token_bits``: a token-adaptive student's rule (``student.token_bits``); each layer's own
    bits follow the kept tokens into the next layer (top-k then runs over the shorter sequence,
    as in the exported prefill). ``order``: see :func:`_order_scores` (controls only)."""
    tokens = tf.convert_to_tensor(tokens, tf.int32)
    prunable = tf.convert_to_tensor(prunable, tf.bool)
    b, t = tokens.shape
    x = model.embed(tokens)
    pos = tf.tile(tf.range(t)[None], [b, 1])
    bits = None if token_bits is None else tf.fill([b, t], 8)
    counts = []
    for li, (block, n_drop) in enumerate(zip(model.blocks, drops)):
        rope = getattr(block.attn, "rope", None)
        if rope is not None:
            object.__setattr__(block.attn, "rope", _PositionedRope(rope, pos))
        try:
            x, inner, bits = block(x, bits=bits, token_bits=token_bits, training=False)
        finally:
            if rope is not None:
                object.__setattr__(block.attn, "rope", rope)
        counts.append(int(x.shape[1]))
        if n_drop:
            keep = select_keep(_order_scores(inner["importance"], order, li), prunable, n_drop)
            x = tf.gather(x, keep, batch_dims=1)
            pos = tf.gather(pos, keep, batch_dims=1)
            prunable = tf.gather(prunable, keep, batch_dims=1)
            if bits is not None:
                bits = tf.gather(bits, keep, batch_dims=1)
    logits = model.logits(model.final_norm(x))
    return logits, pos, counts


def pruned_logprob_rows(model, drops_for, batch_size: int = 32, order: str = "least"):
    """A traced ``(x, y, prunable, drops) -> logprobs (B, T)`` (0 where pruned)."""
    fns = {}

    def run(x, y, prunable, drops):
        key = (x.shape, tuple(drops))
        if key not in fns:
            @tf.function
            def fn(x, y, prunable):
                logits, pos, _ = forward_pruned(model, x, prunable, list(drops), order=order)
                yk = tf.gather(y, pos, batch_dims=1)
                lp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yk, logits=tf.cast(logits, tf.float32))
                bidx = tf.tile(tf.range(tf.shape(pos)[0])[:, None], [1, tf.shape(pos)[1]])
                return tf.scatter_nd(tf.stack([bidx, pos], -1), lp, tf.shape(y))
            fns[key] = fn
        return fns[key](tf.constant(x, tf.int32), tf.constant(y, tf.int32), tf.constant(prunable)).numpy()

    return run


def pruned_perplexity(model, ids: np.ndarray, seq_len: int, ratios: list[float], stride: int | None = None,
                      batch_size: int = 32, max_tokens: int | None = None, order: str = "least") -> dict:
    """Perplexity on exactly :func:`tfqat.evaluate.perplexity`'s windows and targets, pruning
    only unscored context tokens (never token 0). Also returns the mean tokens per layer."""
    from tfqat.data import eval_windows

    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    x, y, mask = eval_windows(ids, seq_len, stride)
    prunable = mask == 0
    prunable[:, 0] = False
    n_pr = prunable.sum(1)
    run = pruned_logprob_rows(model, None, batch_size, order)
    total, count = 0.0, 0.0
    layer_tokens = np.zeros(len(model.blocks))
    for n in np.unique(n_pr):
        rows = np.nonzero(n_pr == n)[0]
        drops = drop_counts(ratios, int(n))
        for i in range(0, len(rows), batch_size):
            r = rows[i:i + batch_size]
            xb, yb, mb, pb = x[r], y[r], mask[r], prunable[r]
            if len(r) < batch_size:  # pad by repeating the first row: one trace per group
                pad = batch_size - len(r)
                xb, yb, pb = (np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in (xb, yb, pb))
                mb = np.concatenate([mb, np.zeros((pad, mb.shape[1]), mb.dtype)])
            lp = np.asarray(run(xb, yb, pb, drops), np.float64)
            total -= float((lp * mb).sum())
            count += float(mb.sum())
        cum = np.concatenate([[0], np.cumsum(drops)[:-1]])
        layer_tokens += len(rows) * (seq_len - cum)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(count), "seq_len": seq_len,
            "stride": stride or max(1, seq_len // 2), "ratios": list(ratios), "order": order,
            "mean_tokens_per_layer": (layer_tokens / len(x)).round(2).tolist()}


def prefill_cost(cfg, tokens_per_layer: list[float]) -> float:
    """Forward FLOPs of a prefill with ``tokens_per_layer`` (projections + causal attention; the
    lm_head on the last token only)."""
    from tfqat.quant.qat import projection_shapes

    per_layer = sum(i * o for i, o, _ in projection_shapes(cfg)) / cfg.layers
    flops = 0.0
    for t in tokens_per_layer:
        flops += 2 * t * per_layer + 2 * 2 * cfg.heads * cfg.head_dim * t * (t + 1) / 2
    return flops + 2 * cfg.hidden * cfg.vocab_size


def prefill_tokens(ratios: list[float], seq_len: int) -> list[float]:
    """Tokens each layer sees in a prefill of ``seq_len`` (all but token 0 and the last prunable)."""
    drops = drop_counts(ratios, seq_len - 2)
    cum = np.concatenate([[0], np.cumsum(drops)[:-1]])
    return [float(v) for v in seq_len - cum]


def time_prefill(model, seq_len: int, ratios: list[float], batch: int = 8, repeats: int = 5, seed: int = 0) -> float:
    """Median seconds of one traced pruned prefill forward (random tokens; ratios of [] = none)."""
    rng = np.random.default_rng(seed)
    tokens = tf.constant(rng.integers(0, model.config.vocab_size, (batch, seq_len)), tf.int32)
    prunable = np.ones((batch, seq_len), bool)
    prunable[:, 0] = prunable[:, -1] = False
    drops = drop_counts(ratios, seq_len - 2) if ratios else [0] * len(model.blocks)
    fn = tf.function(lambda t, p: forward_pruned(model, t, p, drops)[0])
    p = tf.constant(prunable)
    fn(tokens, p)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(tokens, p).numpy()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
