"""Median step time: FP training step vs the full QAT step (student + teacher + losses).

Both steps run on the same batch, compiled by ``train_loop``'s own single-device step
(tape, AdamW with global clip, step counter), alternating so that load from other processes
hits both alike. Prints both medians and the ratio (goal: QAT / FP <= 2.0).

    PYTHONPATH=. .venv/bin/python benchmarks/qat_step.py [--config tiny] [--recipe w4a4-8] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_step(model, loss_fn, cfg):
    """The training loop's own single-device step (tfqat.training), returning the loss."""
    import tensorflow as tf

    from tfqat.training import _local_step, make_optimizer

    step = _local_step(model, loss_fn, make_optimizer(cfg, 1000),
                       tf.Variable(0, dtype=tf.int64, trainable=False))
    return lambda x, y: step(x, y)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--recipe", default=None, help="default: the config's qat.recipe")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of each kind (after 3 warm-up)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: train.batch_size")
    args = ap.parse_args(argv)

    import numpy as np
    import tensorflow as tf

    from tfqat.config import load_config
    from tfqat.models import build_model
    from tfqat.qat_stage import resolve_recipe
    from tfqat.quant.qat import calibrate, qat_loss, quantize_model
    from tfqat.training import lm_loss

    cfg = load_config(args.config)
    b = args.batch_size or cfg.train.batch_size
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, cfg.model.vocab_size, (b, cfg.data.seq_len)), tf.int32)
    y = tf.constant(rng.integers(0, cfg.model.vocab_size, (b, cfg.data.seq_len)), tf.int32)
    recipe = resolve_recipe(cfg, args.recipe)

    fp_model = build_model(cfg.model, name="fp")
    teacher = build_model(cfg.model, name="teacher")
    student = quantize_model(teacher, recipe)
    calibrate(student, [x])
    steps = {
        "FP step": make_step(fp_model, lm_loss(fp_model), cfg.train),
        f"QAT step ({recipe.name}, student+teacher+losses)": make_step(
            student, qat_loss(student, teacher, cfg.qat.losses), cfg.qat.train),
    }
    times = {k: [] for k in steps}
    for name, fn in steps.items():  # trace + warm up
        for _ in range(3):
            fn(x, y).numpy()
    for _ in range(args.steps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(x, y).numpy()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = b * cfg.data.seq_len
    print(f"config {cfg.name}, batch {b} x {cfg.data.seq_len}, {args.steps} steps each, "
          f"{os.cpu_count()} CPUs visible (shared box: timings are noisy)")
    for k, v in med.items():
        print(f"  {k:55s} median {1000 * v:7.1f} ms  ({tokens / v:,.0f} tokens/s)")
    fp, qs = med.values()
    print(f"  ratio QAT / FP = {qs / fp:.2f} (goal <= 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
