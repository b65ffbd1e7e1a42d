"""The training loop shared by the FP teacher and QAT: schedule, clip, step, log, checkpoint, resume.

One visible loop (nanoGPT style). The state that must survive a ``kill -9`` — model and
optimizer variables and the step counter — lives in a ``tf.train.Checkpoint``; TF writes each
checkpoint under a temporary name and publishes it by renaming the index file, so an
interrupted save leaves the previous checkpoint intact. Rerunning the same command restores it
and, because batches are a pure function of (seed, step), continues on exactly the batches the
interrupted run would have seen.

Damaged state is never a silent restart (:mod:`tfqat.checkpoints`: every kept checkpoint is
verified before restoring, a corrupt one set aside); strategies other than one device are
:mod:`tfqat.distribute`'s.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .checkpoints import find_restore_point, first_line, save_checkpoint, write_error
from .cli import UserError
from .config import TrainConfig
from .distribute import (
    check_in_scope, cleanup_worker_dir, distributed_step, is_chief, is_default_strategy, make_strategy,
    worker_tmp_dir,
)

LossFn = Callable[[tf.Tensor, tf.Tensor, bool], tuple[tf.Tensor, dict]]


def make_optimizer(cfg: TrainConfig, steps: int, clip: bool = True) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up to ``lr`` then cosine decay to ``lr * min_lr_ratio``.

    ``clip=False`` leaves out ``global_clipnorm`` (the distributed step clips the all-reduced
    gradients itself: Keras would clip each replica's partial gradients).
    """
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
        global_clipnorm=cfg.grad_clip if clip else None,
    )


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_per_s: float
    wall_s: float
    resumed_from: int
    model: object = None  # the trained model when train_loop built it from a factory


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
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        try:
            write_text_atomic(self.path, buf.getvalue())
        except OSError as e:
            raise write_error(e, self.path) from None
        self.writer.flush()


def train_loop(
    run_dir: Path,
    model,
    loss_fn: LossFn | None,
    dataset,
    cfg: TrainConfig,
    steps: int,
    tokens_per_step: int,
    desc: str = "train",
    extra_trackables: dict | None = None,
    progress: bool = True,
    strategy: tf.distribute.Strategy | None = None,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps, resuming from ``run_dir/ckpt`` if present.

    Args:
        model: a built ``keras.Model``, or a zero-argument factory returning ``(model, loss_fn)``
            (then ``loss_fn`` is ignored); a factory is called under ``strategy.scope()``, which
            is what a non-default strategy needs (or build the model under that scope yourself).
        loss_fn: ``(inputs, targets, training) -> (scalar loss, {name: scalar})``.
        dataset: ``fn(start_step) -> iterable of (inputs, targets)`` starting at that step; each
            batch is the GLOBAL batch (the same on every worker); replica ``r`` of ``R`` trains on
            rows ``[r*B/R, (r+1)*B/R)``.
        extra_trackables: more variables to checkpoint (e.g. quantizer state not owned by model);
            with a factory, a callable ``model -> dict``.
        strategy: a ``tf.distribute.Strategy``; None = ``make_strategy(cfg.strategy)``. The
            default strategy runs the original single-device step, unchanged.

    Under a non-default strategy the per-replica loss is divided by the number of replicas and
    the gradients are all-reduced (summed) before global-norm clipping, so one step equals the
    single-device step on the same global batch (same ``batch_size``, same ``lr``). Only the
    chief writes metrics, TensorBoard and the real checkpoints; other workers save to a temporary
    directory (deleted afterwards), as the TF multi-worker guide recommends. Every worker resumes
    from the chief's ``run_dir/ckpt`` (``run_dir`` must be on a shared file system).
    """
    run_dir = Path(run_dir)
    if strategy is None:
        strategy = make_strategy(getattr(cfg, "strategy", "default"))
    distributed = not is_default_strategy(strategy)
    built = None
    if not isinstance(model, keras.Model) and callable(model):
        with strategy.scope():
            model, loss_fn = model()
        built = model
        if callable(extra_trackables):
            extra_trackables = extra_trackables(model)
    elif distributed:
        check_in_scope(strategy, model)
    chief = is_chief(strategy)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "ckpt"
    write_dir = ckpt_dir if chief else worker_tmp_dir(run_dir, strategy)
    with strategy.scope():
        optimizer = make_optimizer(cfg, steps, clip=not distributed)
        step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # tf.train.Checkpoint does not follow a Keras 3 model's Python list of blocks: list every
        # model variable (by position; stable for one config) or a resume restores only a few.
        ckpt = tf.train.Checkpoint(model=model, model_weights=list(model.weights), optimizer=optimizer,
                                   step=step_var, **(extra_trackables or {}))
        if distributed:
            optimizer.build(model.trainable_variables)
    # Pick (and, on the chief, repair) the restore point before the manager reads the index.
    latest = find_restore_point(ckpt_dir, repair=chief)
    manager = tf.train.CheckpointManager(ckpt, str(write_dir), max_to_keep=2)
    start = 0
    if latest:
        try:
            ckpt.restore(latest).expect_partial()
        except (tf.errors.OpError, ValueError, AssertionError) as e:  # readable, but not this model's
            raise UserError(f"{latest}: cannot restore into this stage's model ({first_line(e)}); it was "
                            f"written by a different config: use a new --name or delete {ckpt_dir}") from None
        start = int(step_var.numpy())
    log = MetricsLog(run_dir, start) if chief else _NullLog()
    if start >= steps:
        last = float(log.rows[-1]["loss"]) if log.rows else float("nan")
        if distributed:
            cleanup_worker_dir(chief, write_dir)
        return TrainResult(start, last, float("nan"), 0.0, start, built)
    step_fn = (distributed_step(model, loss_fn, cfg, strategy, optimizer, step_var) if distributed
               else _local_step(model, loss_fn, optimizer, step_var))

    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not (progress and chief),
               dynamic_ncols=True, mininterval=1.0)
    t0 = time.perf_counter()
    t_log, done_since_log, loss_val = t0, 0, float("nan")
    tokens_per_s = float("nan")
    first_step_done = False
    for x, y in dataset(start):
        loss, metrics = step_fn(x, y)
        step = int(step_var.numpy())
        done_since_log += 1
        bar.update(1)
        if not first_step_done:  # the first step includes tracing; keep it out of tokens/s
            first_step_done = True
            t_log, done_since_log = time.perf_counter(), 0
        if step % cfg.log_every == 0 or step == steps:
            loss_val = float(loss)
            if not math.isfinite(loss_val):  # keep the last finite checkpoint, not the diverged weights
                raise FloatingPointError(
                    f"{desc}: loss became {loss_val} at step {step}; lower this stage's lr or raise its "
                    f"warmup_steps, and use a new --name (the stage folder {run_dir} holds the old config)"
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
            save_checkpoint(manager, step, write_dir)  # under a strategy every worker saves (collective)
            log.flush()
        if step >= steps:
            break
    bar.close()
    log.flush()
    if distributed:
        cleanup_worker_dir(chief, write_dir)
    return TrainResult(steps, loss_val, tokens_per_s, time.perf_counter() - t0, start, built)


def _local_step(model, loss_fn, optimizer, step_var):
    """One device: a traced step; variables are listed after the first batch builds the model."""
    variables = []

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss, metrics = loss_fn(x, y, True)
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        step_var.assign_add(1)
        return loss, metrics

    def step(x, y):
        if not variables:
            model(x[:1])  # build lazily-created variables before the first traced step
            variables.extend(model.trainable_variables)
        return train_step(x, y)

    return step


class _NullLog:
    """Non-chief workers: no metrics.csv, no TensorBoard."""

    rows: list = []

    def log(self, step, values):
        pass

    def flush(self):
        pass


def lm_loss(model: keras.Model) -> LossFn:
    """Next-token cross-entropy, mean over tokens: the FP teacher's objective."""

    def fn(x, y, training):
        logits = model(x, training=training)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return ce, {}

    return fn


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    np.random.seed(seed)
