"""Held-out perplexity and BLiMP accuracy, for any model that gives token log-probabilities.

Both metrics take a ``logprob_fn(inputs [B, L], targets [B, L]) -> log p(target) [B, L]`` so the
same code scores the FP teacher, a fake-quant QAT model and (later) an exported .tflite.

Perplexity windowing: see :func:`tfqat.data.eval_windows` — windows of ``seq_len`` tokens at
stride ``eval.stride`` (default ``seq_len // 2``); each held-out token is scored exactly once, with
at least ``seq_len - stride`` tokens of context except in the first window. Documents are joined
by ``<|endoftext|>``, which is scored like any other token.

Padding: a row padded on the right (the last perplexity window, BLiMP batches) is scored as its
unpadded prefix would be. A ``LogprobFn`` that takes a ``lengths`` keyword (real tokens per row;
the Keras functions here and :func:`tfqat.quant.qat.logprob_fn`) is given them, and a token-adaptive
student keeps padding out of its token-bit selection with them; any other function gets each padded
row cut to its real length. BLiMP scores a pair's two sentences in the same batch.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import math
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from .data import TextTokenizer, eval_windows
from .progress import bar_desc

LogprobFn = Callable[..., np.ndarray]  # (inputs [B, L], targets [B, L][, lengths=[B]]) -> log p [B, L]


def keras_logprob_fn(model) -> LogprobFn:
    """Wrap a float Keras LM as a LogprobFn (one traced function per padded shape). Causal
    attention alone keeps right padding out of every real token, so ``lengths`` is not needed."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fn(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        return -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    def call(x, y, lengths=None):
        return fn(tf.constant(x, tf.int32), tf.constant(y, tf.int32)).numpy()

    return call


def _takes_lengths(logprob_fn: LogprobFn) -> bool:
    try:
        return "lengths" in inspect.signature(logprob_fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def score_rows(logprob_fn: LogprobFn, x: np.ndarray, y: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``log p(y)`` ``[B, L]`` of right-padded rows, each scored as its first ``lengths[b]`` tokens
    alone would be (entries past a row's length are 0)."""
    lengths = np.asarray(lengths, np.int64)
    if _takes_lengths(logprob_fn):
        lp = np.asarray(logprob_fn(x, y, lengths=lengths), np.float64)
        return np.where(np.arange(x.shape[1])[None, :] < lengths[:, None], lp, 0.0)
    out = np.zeros(x.shape, np.float64)
    full = lengths >= x.shape[1]
    if full.any():
        out[full] = np.asarray(logprob_fn(x[full], y[full]), np.float64)
    for b in np.nonzero(~full)[0]:
        n = int(lengths[b])
        if n > 0:
            out[b, :n] = np.asarray(logprob_fn(x[b:b + 1, :n], y[b:b + 1, :n]), np.float64)[0]
    return out


def perplexity(logprob_fn: LogprobFn, ids: np.ndarray, seq_len: int, stride: int | None = None,
               batch_size: int = 32, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Exact token-level perplexity of ``ids`` (every target scored once; see module doc)."""
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    x, y, mask = eval_windows(ids, seq_len, stride)
    # real inputs per window (window w starts at w * stride; the last one may run past the text)
    lengths = np.clip(len(ids) - 1 - np.arange(len(x)) * (stride or max(1, seq_len // 2)), 0, seq_len)
    total, count = 0.0, 0.0
    for i in tqdm(range(0, len(x), batch_size), desc=bar_desc("perplexity"), unit="batch", disable=not progress,
                  leave=False):
        xb, yb, mb = x[i:i + batch_size], y[i:i + batch_size], mask[i:i + batch_size]
        lb = lengths[i:i + batch_size]
        if len(xb) < batch_size:  # pad to one shape: one trace
            pad = batch_size - len(xb)
            xb, yb = np.pad(xb, ((0, pad), (0, 0))), np.pad(yb, ((0, pad), (0, 0)))
            mb = np.pad(mb, ((0, pad), (0, 0)))
            lb = np.pad(lb, (0, pad), constant_values=seq_len)
        lp = score_rows(logprob_fn, xb, yb, lb)
        total -= float((lp * mb).sum())
        count += float(mb.sum())
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": int(count),
            "seq_len": seq_len, "stride": stride or max(1, seq_len // 2)}


# The BLiMP files tag two argument-structure paradigms (animate_subject_*) "s-selection"; the paper
# counts them under argument structure, which gives its 12 phenomena.
PHENOMENON_ALIASES = {"s-selection": "argument_structure"}


def blimp_dir() -> Path:
    return Path(str(resources.files("tfqat") / "assets" / "blimp"))


def load_blimp(pairs_per_paradigm: int | None = None, directory: Path | None = None) -> list[dict]:
    """All BLiMP pairs (``sentence_good``, ``sentence_bad``, ``UID``, ``linguistics_term``...)."""
    rows = []
    files = sorted((directory or blimp_dir()).glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no BLiMP files in {directory or blimp_dir()}; reinstall tfqat")
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if pairs_per_paradigm is not None and i >= pairs_per_paradigm:
                    break
                rows.append(json.loads(line))
    return rows


def sentence_logprobs(logprob_fn: LogprobFn, tokenizer: TextTokenizer, sentences: list[str],
                      batch_size: int = 64, max_len: int | None = None, progress: bool = False,
                      groups: list[int] | None = None) -> np.ndarray:
    """Total log-probability of each sentence, conditioned on a leading ``<|endoftext|>``.

    Rows are right-padded to a bucketed width and scored at their real length
    (:func:`score_rows`). ``groups``: sentences with the same group id (a BLiMP pair) are put in
    the same batch, next to each other.
    """
    seqs = [[tokenizer.eos_id] + ids for ids in tokenizer.encode_batch(sentences)]
    if max_len is not None:
        too_long = [i for i, s in enumerate(seqs) if len(s) - 1 > max_len]
        if too_long:
            raise ValueError(f"sentence {too_long[0]} has {len(seqs[too_long[0]]) - 1} tokens, more than "
                             f"the model's {max_len} positions; shorten it")
    groups = list(range(len(seqs))) if groups is None else list(groups)
    if len(groups) != len(seqs):
        raise ValueError(f"sentence_logprobs: {len(groups)} group ids for {len(seqs)} sentences")
    longest: dict = defaultdict(int)
    for g, s in zip(groups, seqs):
        longest[g] = max(longest[g], len(s))
    order = sorted(range(len(seqs)), key=lambda i: (longest[groups[i]], groups[i], i))
    out = np.zeros(len(seqs), dtype=np.float64)
    for i in tqdm(range(0, len(order), batch_size), desc=bar_desc("BLiMP"), unit="batch", disable=not progress,
                  leave=False):
        idx = order[i:i + batch_size]
        width = max(len(seqs[j]) for j in idx) - 1
        width = -(-width // 8) * 8  # bucket lengths: few traces
        if max_len is not None:
            width = min(width, max_len)
        x = np.zeros((batch_size, width), np.int32)
        y = np.zeros((batch_size, width), np.int32)
        lengths = np.full(batch_size, width, np.int64)
        for r, j in enumerate(idx):
            s = seqs[j]
            x[r, :len(s) - 1], y[r, :len(s) - 1], lengths[r] = s[:-1], s[1:], len(s) - 1
        lp = score_rows(logprob_fn, x, y, lengths)
        out[idx] = lp.sum(axis=1)[:len(idx)]
    return out


def blimp_accuracy(logprob_fn: LogprobFn, tokenizer: TextTokenizer, pairs: list[dict],
                   batch_size: int = 64, max_len: int | None = None, progress: bool = True) -> dict:
    """BLiMP by the simple LM method: right when log p(good) > log p(bad).

    Both sentences of a pair are scored in one batch, each at its own length (see
    :func:`sentence_logprobs`), so a token-adaptive model selects their bits by the same rule.

    Returns overall accuracy (mean over pairs), per paradigm (UID) and per phenomenon
    (``linguistics_term``; the overall is over pairs, which equals the paradigm mean when every
    paradigm has the same number of pairs).
    """
    sentences = [s for p in pairs for s in (p["sentence_good"], p["sentence_bad"])]
    both = sentence_logprobs(logprob_fn, tokenizer, sentences, batch_size, max_len, progress,
                             groups=[i // 2 for i in range(len(sentences))])
    good, bad = both[0::2], both[1::2]
    right = good > bad
    by_uid, by_term = defaultdict(list), defaultdict(list)
    for p, r in zip(pairs, right):
        by_uid[p["UID"]].append(r)
        term = p["linguistics_term"]
        by_term[PHENOMENON_ALIASES.get(term, term)].append(r)
    return {
        "overall": float(np.mean(right)),
        "pairs": len(pairs),
        "phenomena": {k: float(np.mean(v)) for k, v in sorted(by_term.items())},
        "paradigms": {k: float(np.mean(v)) for k, v in sorted(by_uid.items())},
    }


def evaluate_model(logprob_fn: LogprobFn, data, cfg, progress: bool = True) -> dict:
    """Perplexity on ``cfg.eval.split`` and BLiMP, as one dict (what reports record)."""
    ppl = perplexity(logprob_fn, data.ids[cfg.eval.split], cfg.data.seq_len, cfg.eval.stride,
                     cfg.eval.batch_size, cfg.eval.max_tokens, progress)
    pairs = load_blimp(cfg.eval.blimp_pairs_per_paradigm)
    blimp = blimp_accuracy(logprob_fn, data.tokenizer, pairs, max(cfg.eval.batch_size, 64),
                           cfg.model.max_positions, progress)
    return {"split": cfg.eval.split, **ppl, "blimp": blimp}


def evaluate_checkpoint(cfg, checkpoint: str | None, output: str | None, progress: bool = True) -> dict:
    """``python -m tfqat.evaluate``: score a saved FP model (default: the run's teacher).

    The run's teacher shares the run's cached evaluation (``<run>/eval_fp.json``, the one the
    report reads); any other checkpoint is cached apart (``<run>/eval_checkpoints/``), so
    evaluating it never overwrites the run's. ``output``: also write the result there.

    Raises:
        UserError: no checkpoint there, a damaged one, or one from another config (one line).
    """
    # here, not at the top: the metrics above need neither TensorFlow nor a run folder
    from .atomic import write_json_atomic
    from .checkpoints import load_weights_checked
    from .cli import UserError
    from .pipeline import build_fp_model, cached_eval, eval_fingerprint, load_data, teacher_path

    own = teacher_path(cfg)
    path = Path(checkpoint) if checkpoint else own
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first with python -m tfqat.train "
                        f"--config {cfg.name} or pass --checkpoint")
    is_own = own.is_file() and path.resolve() == own.resolve()
    if output and not is_own and Path(output).resolve() == (cfg.run_dir / "eval_fp.json").resolve():
        raise UserError(f"--output {output} is the run's own teacher evaluation; write {path.name}'s elsewhere")
    data = load_data(cfg, progress)
    model = build_fp_model(cfg)
    load_weights_checked(model, path, None if is_own else
                         f"pass a .weights.h5 of a {cfg.model.arch} model of this config (--config or --run)")
    if is_own:
        fp, cache = eval_fingerprint(cfg, data, "fp"), cfg.run_dir / "eval_fp.json"
    else:
        st = path.stat()
        fp = eval_fingerprint(cfg, data, "checkpoint", str(path.resolve()), st.st_size, st.st_mtime_ns)
        cache = cfg.run_dir / "eval_checkpoints" / f"{path.name.removesuffix('.weights.h5')}-{fp[:8]}.json"
    result = cached_eval(cache, fp, lambda: evaluate_model(keras_logprob_fn(model), data, cfg, progress))
    if output:
        write_json_atomic(Path(output), result)
    return result


def main(argv: list[str] | None = None) -> int:
    from .cli import add_common_args, die, load_cli_config

    ap = argparse.ArgumentParser(prog="python -m tfqat.evaluate",
                                 description="Held-out perplexity and BLiMP accuracy of a trained run.")
    add_common_args(ap)
    ap.add_argument("--checkpoint", help="weights file (.weights.h5); default: the run's FP teacher")
    ap.add_argument("--output", help="also write the results JSON here (cached in the run folder either way: "
                                     "<run>/eval_fp.json for its teacher, <run>/eval_checkpoints/ for others)")
    args = ap.parse_args(argv)
    with die():
        cfg = load_cli_config(args)
        result = evaluate_checkpoint(cfg, args.checkpoint, args.output, progress=not args.quiet)
        b = result["blimp"]
        print(f"{cfg.eval.split} perplexity {result['perplexity']:.3f} over {result['tokens']:,} tokens; "
              f"BLiMP overall {100 * b['overall']:.1f}% ({b['pairs']:,} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
