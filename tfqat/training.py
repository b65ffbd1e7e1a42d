"""The training loop shared by the FP teacher and QAT: schedule, clip, step, log, checkpoint, resume.

One visible loop (nanoGPT style). The state that must survive a ``kill -9`` — model and
optimizer variables and the step counter — lives in a ``tf.train.Checkpoint``; TF writes each
checkpoint under a temporary name and publishes it by renaming the index file, so an
interrupted save leaves the previous checkpoint intact. Rerunning the same command restores it
and, because batches are a pure function of (seed, step), continues on exactly the batches the
interrupted run would have seen.
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .config import TrainConfig

LossFn = Callable[[tf.Tensor, tf.Tensor, bool], tuple[tf.Tensor, dict]]


def make_optimizer(cfg: TrainConfig, steps: int) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``."""
    warmup = min(cfg.warmup_steps, max(0, steps - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else cfg.lr,
        decay_steps=max(1, steps - warmup),
        alpha=cfg.min_lr_ratio,
        warmup_target=cfg.lr if warmup else None,
        warmup_steps=warmup,
    )
    return keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=cfg.weight_decay,
        beta_1=cfg.beta1,
        beta_2=cfg.beta2,
        global_clipnorm=cfg.grad_clip,
    )


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    wall_s: float
    resumed_from: int


class MetricsLog:
    """metrics.csv plus TensorBoard scalars; on resume, rows past the restored step are dropped."""

    def __init__(self, run_dir: Path, resumed_step: int):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resumed_step]
        self.writer = tf.summary.create_file_writer(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **{k: f"{float(v):.6g}" for k, v in values.items()}}
        self.rows.append(row)
        with self.writer.as_default(step=step):
            for k, v in values.items():
                tf.summary.scalar(k, float(v))

    def flush(self) -> None:
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)
        self.writer.flush()


def train_loop(
    run_dir: Path,
    model: keras.Model,
    loss_fn: LossFn,
    dataset,
    cfg: TrainConfig,
    steps: int,
    tokens_per_step: int,
    desc: str = "train",
    extra_trackables: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps, resuming from ``run_dir/ckpt`` if present.

    Args:
        loss_fn: ``(inputs, targets, training) -> (scalar loss, {name: scalar})``.
        dataset: ``fn(start_step) -> iterable of (inputs, targets)`` starting at that step.
        extra_trackables: more variables to checkpoint (e.g. quantizer state not owned by model).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(cfg, steps)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step_var, **(extra_trackables or {}))
    manager = tf.train.CheckpointManager(ckpt, str(run_dir / "ckpt"), max_to_keep=2)
    start = 0
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        start = int(step_var.numpy())
    log = MetricsLog(run_dir, start)
    if start >= steps:
        last = float(log.rows[-1]["loss"]) if log.rows else float("nan")
        return TrainResult(start, last, float("nan"), 0.0, start)

    variables = None

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss, metrics = loss_fn(x, y, True)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        step_var.assign_add(1)
        return loss, metrics

    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    t_log, done_since_log, loss_val = t0, 0, float("nan")
    tokens_per_s = float("nan")
    first_step_done = False
    for x, y in dataset(start):
        if variables is None:
            model(x[:1])  # build lazily-created variables before the first traced step
            variables = model.trainable_variables
        loss, metrics = train_step(x, y)
        step = int(step_var.numpy())
        done_since_log += 1
        bar.update(1)
        if not first_step_done:  # the first step includes tracing; keep it out of tokens/s
            first_step_done = True
            t_log, done_since_log = time.perf_counter(), 0
        if step % cfg.log_every == 0 or step == steps:
            loss_val = float(loss)
            if not math.isfinite(loss_val):
                manager.save(checkpoint_number=step)
                raise FloatingPointError(
                    f"{desc}: loss became {loss_val} at step {step}; lower train.lr or raise warmup_steps"
                )
            now = time.perf_counter()
            if done_since_log:
                tokens_per_s = done_since_log * tokens_per_step / max(now - t_log, 1e-9)
            t_log, done_since_log = now, 0
            lr = optimizer.learning_rate
            lr = float(lr(step) if callable(lr) else lr)
            values = {"loss": loss_val, "lr": lr, "tokens_per_s": tokens_per_s}
            values.update({k: float(v) for k, v in metrics.items()})
            log.log(step, values)
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if step % cfg.checkpoint_every == 0 or step == steps:
            manager.save(checkpoint_number=step)
            log.flush()
        if step >= steps:
            break
    bar.close()
    log.flush()
    wall = time.perf_counter() - t0
    return TrainResult(steps, loss_val, tokens_per_s, wall, start)


def lm_loss(model: keras.Model) -> LossFn:
    """Next-token cross-entropy, mean over tokens: the FP teacher's objective."""

    def fn(x, y, training):
        logits = model(x, training=training)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return ce, {}

    return fn


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """``model.save_weights`` through a temporary file, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    model.save_weights(str(tmp))
    os.replace(tmp, path)


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    np.random.seed(seed)
