"""Held-out perplexity and BLiMP accuracy, for any model that gives token log-probabilities.

Both metrics take a ``logprob_fn(inputs [B, L], targets [B, L]) -> log p(target) [B, L]`` so the
same code scores the FP teacher, a fake-quant QAT model and (later) an exported .tflite.

Perplexity windowing: see :func:`tfqat.data.eval_windows` — windows of ``seq_len`` tokens at
stride ``eval.stride`` (default ``seq_len // 2``); each held-out token is scored exactly once, with
at least ``seq_len - stride`` tokens of context except in the first window. Documents are joined
by ``<|endoftext|>``, which is scored like any other token.
"""

from __future__ import annotations

import argparse
import gzip
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

LogprobFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def keras_logprob_fn(model) -> LogprobFn:
    """Wrap a Keras LM as a LogprobFn (one traced function per padded shape)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def fn(x, y):
        logits = tf.cast(model(x, training=False), tf.float32)
        return -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)

    return lambda x, y: fn(tf.constant(x, tf.int32), tf.constant(y, tf.int32)).numpy()


def perplexity(logprob_fn: LogprobFn, ids: np.ndarray, seq_len: int, stride: int | None = None,
               batch_size: int = 32, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Exact token-level perplexity of ``ids`` (every target scored once; see module doc)."""
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    x, y, mask = eval_windows(ids, seq_len, stride)
    total, count = 0.0, 0.0
    for i in tqdm(range(0, len(x), batch_size), desc="perplexity", unit="batch", disable=not progress,
                  leave=False):
        xb, yb, mb = x[i:i + batch_size], y[i:i + batch_size], mask[i:i + batch_size]
        if len(xb) < batch_size:  # pad to one shape: one trace
            pad = batch_size - len(xb)
            xb, yb = np.pad(xb, ((0, pad), (0, 0))), np.pad(yb, ((0, pad), (0, 0)))
            mb = np.pad(mb, ((0, pad), (0, 0)))
        lp = np.asarray(logprob_fn(xb, yb), dtype=np.float64)
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
                      batch_size: int = 64, max_len: int | None = None, progress: bool = False) -> np.ndarray:
    """Total log-probability of each sentence, conditioned on a leading ``<|endoftext|>``."""
    seqs = [[tokenizer.eos_id] + ids for ids in tokenizer.encode_batch(sentences)]
    if max_len is not None:
        too_long = [i for i, s in enumerate(seqs) if len(s) - 1 > max_len]
        if too_long:
            raise ValueError(f"sentence {too_long[0]} has {len(seqs[too_long[0]]) - 1} tokens, more than "
                             f"the model's {max_len} positions; shorten it")
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros(len(seqs), dtype=np.float64)
    for i in tqdm(range(0, len(order), batch_size), desc="BLiMP", unit="batch", disable=not progress, leave=False):
        idx = order[i:i + batch_size]
        width = max(len(seqs[j]) for j in idx) - 1
        width = -(-width // 8) * 8  # bucket lengths: few traces
        if max_len is not None:
            width = min(width, max_len)
        x = np.zeros((batch_size, width), np.int32)
        y = np.zeros((batch_size, width), np.int32)
        m = np.zeros((batch_size, width), np.float64)
        for r, j in enumerate(idx):
            s = seqs[j]
            x[r, :len(s) - 1], y[r, :len(s) - 1], m[r, :len(s) - 1] = s[:-1], s[1:], 1.0
        lp = np.asarray(logprob_fn(x, y), dtype=np.float64)
        out[idx] = (lp * m).sum(axis=1)[:len(idx)]
    return out


def blimp_accuracy(logprob_fn: LogprobFn, tokenizer: TextTokenizer, pairs: list[dict],
                   batch_size: int = 64, max_len: int | None = None, progress: bool = True) -> dict:
    """BLiMP by the simple LM method: right when log p(good) > log p(bad).

    Returns overall accuracy (mean over pairs), per paradigm (UID) and per phenomenon
    (``linguistics_term``; the overall is over pairs, which equals the paradigm mean when every
    paradigm has the same number of pairs).
    """
    good = sentence_logprobs(logprob_fn, tokenizer, [p["sentence_good"] for p in pairs], batch_size, max_len, progress)
    bad = sentence_logprobs(logprob_fn, tokenizer, [p["sentence_bad"] for p in pairs], batch_size, max_len, progress)
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

    Raises:
        UserError: no checkpoint there, or one from another config (one line).
    """
    # here, not at the top: the metrics above need neither TensorFlow nor a run folder
    from .atomic import write_json_atomic
    from .cli import UserError
    from .pipeline import build_fp_model, load_data, teacher_path

    path = Path(checkpoint) if checkpoint else teacher_path(cfg)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train first with python -m tfqat.train "
                        f"--config {cfg.name} or pass --checkpoint")
    data = load_data(cfg, progress)
    model = build_fp_model(cfg)
    try:
        model.load_weights(str(path))
    except Exception as e:  # keras raises several types for a mismatched file
        raise UserError(f"{path}: cannot load into a {cfg.model.arch} model of this config "
                        f"({type(e).__name__}); check --config") from None
    result = evaluate_model(keras_logprob_fn(model), data, cfg, progress)
    write_json_atomic(Path(output) if output else cfg.run_dir / "eval_fp.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    from .cli import add_common_args, die, load_cli_config

    ap = argparse.ArgumentParser(prog="python -m tfqat.evaluate",
                                 description="Held-out perplexity and BLiMP accuracy of a trained run.")
    add_common_args(ap)
    ap.add_argument("--checkpoint", help="weights file (.weights.h5); default: the run's FP teacher")
    ap.add_argument("--output", help="write the results JSON here (default: <run>/eval_fp.json)")
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
