"""The training loop shared by the FP teacher and QAT: schedule, clip, step, log, checkpoint, resume.

One visible loop (nanoGPT style). The state that must survive a ``kill -9`` — model and
optimizer variables and the step counter — lives in a ``tf.train.Checkpoint``; TF writes each
checkpoint under a temporary name and publishes it by renaming the index file, so an
interrupted save leaves the previous checkpoint intact. Rerunning the same command restores it
and, because batches are a pure function of (seed, step), continues on exactly the batches the
interrupted run would have seen.

Damaged state is never a silent restart: before restoring, every kept checkpoint is read in full
(TF checks each tensor's CRC). A corrupt one (cut short, bit rot) is moved to ``ckpt/corrupt/`` and
training resumes from the previous kept checkpoint, with a one-line warning; a garbled
``checkpoint`` index is rebuilt from the ``ckpt-*`` files; when no readable checkpoint is left the
run stops with a one-line error. A full disk while saving is a one-line error, and the save's
``ckpt-N_temp`` leftovers are removed.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from .atomic import write_text_atomic
from .cli import UserError
from .config import TrainConfig

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
        _check_in_scope(strategy, model)
    chief = is_chief(strategy)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "ckpt"
    write_dir = ckpt_dir if chief else _worker_tmp_dir(run_dir, strategy)
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
            raise UserError(f"{latest}: cannot restore into this stage's model ({_first_line(e)}); it was "
                            f"written by a different config: use a new --name or delete {ckpt_dir}") from None
        start = int(step_var.numpy())
    log = MetricsLog(run_dir, start) if chief else _NullLog()
    if start >= steps:
        last = float(log.rows[-1]["loss"]) if log.rows else float("nan")
        if distributed:
            _cleanup_worker_dir(chief, write_dir)
        return TrainResult(start, last, float("nan"), 0.0, start, built)
    step_fn = (_distributed_step(model, loss_fn, cfg, strategy, optimizer, step_var) if distributed
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
        _cleanup_worker_dir(chief, write_dir)
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


class DistributeError(UserError):
    """A tf.distribute setup problem (TF_CONFIG, unreachable workers), reported as one line by the CLIs."""


class _NullLog:
    """Non-chief workers: no metrics.csv, no TensorBoard."""

    rows: list = []

    def log(self, step, values):
        pass

    def flush(self):
        pass


def is_default_strategy(strategy) -> bool:
    return type(strategy).__name__ == "_DefaultDistributionStrategy"


def parse_tf_config(env: str | None = None) -> dict:
    """``TF_CONFIG`` as a dict, checked: ``cluster`` with ``worker`` (and optional ``chief``) and
    a ``task`` naming one of them. One-line :class:`DistributeError` otherwise."""
    raw = os.environ.get("TF_CONFIG") if env is None else env
    if not raw:
        raise DistributeError("train.strategy multiworker needs TF_CONFIG (cluster + task); it is not set")
    try:
        tfc = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DistributeError(f"TF_CONFIG is not valid JSON ({e.msg} at column {e.colno})") from None
    cluster = tfc.get("cluster") if isinstance(tfc, dict) else None
    if not isinstance(cluster, dict) or not (cluster.get("worker") or cluster.get("chief")):
        raise DistributeError("TF_CONFIG names no worker: cluster.worker must list host:port addresses")
    task = tfc.get("task") or {}
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise DistributeError(f"TF_CONFIG task {task} is not in its cluster {cluster}")
    for addr in [a for k in cluster for a in cluster[k]]:
        host, _, port = str(addr).rpartition(":")
        if not host or not port.isdigit():
            raise DistributeError(f"TF_CONFIG address {addr!r} is not host:port")
    return tfc


def check_workers_reachable(tfc: dict, wait_s: float | None = None, connect_timeout: float = 0.5) -> None:
    """Wait until at least one other task of TF_CONFIG accepts TCP connections, else raise.

    While waiting, this process listens on its own address, so that peers running the same
    check see it before TF's server starts (no start-up deadlock). ``wait_s`` defaults to
    ``TFQAT_WORKER_WAIT_S`` or 30 s.
    """
    import socket

    if wait_s is None:
        wait_s = float(os.environ.get("TFQAT_WORKER_WAIT_S", "30"))
    cluster, task = tfc["cluster"], tfc["task"]
    me = cluster[task["type"]][task.get("index", 0)]
    others = [a for k in cluster for a in cluster[k] if a != me]
    if not others:
        return
    listener = None
    try:
        host, _, port = me.rpartition(":")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, int(port)))
        listener.listen(16)
    except OSError:
        if listener is not None:
            listener.close()
        listener = None
    deadline = time.monotonic() + wait_s
    try:
        while True:
            for addr in others:
                host, _, port = addr.rpartition(":")
                try:
                    with socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout):
                        return
                except OSError:
                    pass
            if time.monotonic() >= deadline:
                raise DistributeError(
                    f"TF_CONFIG names no reachable worker: nothing answered at {', '.join(others)} "
                    f"within {wait_s:g} s; start the other workers or fix TF_CONFIG's cluster")
            time.sleep(0.2)
    finally:
        if listener is not None:
            listener.close()


_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


def make_strategy(kind: str = "default", wait_s: float | None = None) -> tf.distribute.Strategy:
    """``default`` (one device), ``mirrored`` (all local GPUs, else the CPU) or ``multiworker``
    (MultiWorkerMirroredStrategy from ``TF_CONFIG``, after checking a peer is reachable).

    Create it at program start, before other TensorFlow work (collective ops must be configured
    before the runtime initialises). One per kind per process: later calls (the FP stage, then
    QAT) get the same object, as a process can configure its collectives only once.
    """
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind in _STRATEGIES:
        return _STRATEGIES[kind]
    if kind == "mirrored":
        _STRATEGIES[kind] = tf.distribute.MirroredStrategy()
        return _STRATEGIES[kind]
    if kind == "multiworker":
        tfc = parse_tf_config()
        check_workers_reachable(tfc, wait_s)
        try:
            _STRATEGIES[kind] = tf.distribute.MultiWorkerMirroredStrategy()
            return _STRATEGIES[kind]
        except (RuntimeError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DistributeError(f"cannot create MultiWorkerMirroredStrategy ({msg}); create it at "
                                  "program start, before other TensorFlow work") from None
    raise DistributeError(f"train.strategy: unknown strategy {kind!r}; use default, mirrored or multiworker")


def is_chief(strategy) -> bool:
    """True on the one task that writes checkpoints and reports."""
    ext = getattr(strategy, "extended", None)
    task_type = getattr(ext, "_task_type", None)
    task_id = getattr(ext, "_task_id", None)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    cluster = getattr(ext, "_cluster_spec", None)
    has_chief = bool(cluster is not None and "chief" in cluster.jobs)
    return task_type == "worker" and task_id == 0 and not has_chief


def _worker_tmp_dir(run_dir: Path, strategy) -> Path:
    ext = strategy.extended
    return run_dir / ".workers" / f"{getattr(ext, '_task_type', 'worker')}_{getattr(ext, '_task_id', 0)}"


def _check_in_scope(strategy, model) -> None:
    variables = model.weights
    if not variables:
        return
    v = variables[0]
    v = getattr(v, "value", v)
    try:
        ok = strategy.extended.variable_created_in_scope(v)
    except Exception:  # noqa: BLE001 - unknown variable kind: let TF complain later
        ok = True
    if not ok:
        raise DistributeError(f"{type(strategy).__name__}: the model was built outside strategy.scope(); "
                              "pass train_loop a factory or build it under the scope")


def _distributed_step(model, loss_fn, cfg, strategy, optimizer, step_var):
    """Replicas each take a slice of the global batch; gradients are summed, then clipped."""
    n = strategy.num_replicas_in_sync
    variables = model.trainable_variables

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss, metrics = loss_fn(x, y, True)
            scaled = loss / n
        grads = tape.gradient(scaled, variables)
        grads = [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads, _ = tf.clip_by_global_norm(grads, cfg.grad_clip)
        # Keras sums the replicas' gradients again inside apply_gradients: hand it 1/n each.
        optimizer.apply_gradients(zip([g / n for g in grads], variables))
        return loss, metrics

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        loss, metrics = strategy.run(replica_step, args=(x, y))
        loss = strategy.reduce(tf.distribute.ReduceOp.MEAN, loss, axis=None)
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in metrics.items()}
        step_var.assign_add(1)
        return loss, metrics

    def split(t):
        b = int(t.shape[0])
        if b % n:
            raise DistributeError(f"train.batch_size {b} is not divisible by the {n} replicas; make it a multiple")
        per = b // n
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: t[ctx.replica_id_in_sync_group * per:(ctx.replica_id_in_sync_group + 1) * per])

    return lambda x, y: train_step(split(x), split(y))


def _cleanup_worker_dir(chief: bool, write_dir: Path) -> None:
    if not chief:
        import shutil

        shutil.rmtree(write_dir, ignore_errors=True)


def lm_loss(model: keras.Model) -> LossFn:
    """Next-token cross-entropy, mean over tokens: the FP teacher's objective."""

    def fn(x, y, training):
        logits = model(x, training=training)
        ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return ce, {}

    return fn


def save_weights_atomic(model: keras.Model, path: Path) -> None:
    """``model.save_weights`` through a temporary file, so a crash never leaves half a file.

    The temporary name keeps the ``.weights.h5`` ending that Keras insists on.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        model.save_weights(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # h5py reports a full disk as a bare OSError with the C message
            raise write_error(e, path) from None
        raise


def load_weights_checked(model: keras.Model, path: str | os.PathLike, fix: str | None = None) -> None:
    """``model.load_weights(path)`` with one-line errors for a missing, damaged or mismatched file.

    Args:
        model: the built model to load into.
        path: a ``.weights.h5`` file.
        fix: what the user should do when the file is damaged (default: delete it and rerun the
            command that wrote it).

    Raises:
        UserError: no such file; not a readable HDF5 file (truncated, overwritten); a file that
            does not fit this model (another config).
    """
    import h5py

    path = Path(path)
    fix = fix or "delete it and rerun the command that wrote it"
    if not path.is_file():
        raise UserError(f"{path}: no such weights file; {fix}")
    try:
        with h5py.File(path, "r") as f:  # a truncated file fails here (HDF5 checks its end-of-file)
            f.visit(lambda _: None)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError on damage
        raise UserError(f"{path}: damaged weights file, not readable as HDF5 ({_first_line(e)}); {fix}") from None
    try:
        model.load_weights(str(path))
    except Exception as e:  # noqa: BLE001 - keras raises ValueError/KeyError/OSError for a mismatch
        raise UserError(f"{path}: cannot load into this model ({type(e).__name__}: {_first_line(e)}); it was "
                        f"written for another config, or it is damaged: {fix}") from None


def read_json_checked(path: str | os.PathLike, fix: str | None = None):
    """``json.loads`` of a file tfqat wrote, with a one-line :class:`UserError` naming the file and
    ``fix`` (default: delete it and rerun the command that wrote it) when it is damaged."""
    path = Path(path)
    fix = fix or "delete it and rerun the command that wrote it"
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged JSON ({_first_line(e)}); {fix}") from None


# ---- checkpoints: verify before restore, repair the index, clean up after a failed save ---------

_CKPT_FILE = re.compile(r"ckpt-(\d+)(\.index|\.data-\d+-of-\d+)$")
_TEMP_GLOB = "ckpt-*_temp*"  # TF writes ckpt-N_temp/part-* and renames it into place when complete


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)  # TF's op-function prefix
    return (text.splitlines() or [type(e).__name__])[0][:200]


def checkpoint_problem(prefix: str | os.PathLike) -> str | None:
    """None if the checkpoint at ``prefix`` (``.../ckpt-N``) reads in full, else why not (one line).

    Reads every tensor: TF's bundle reader checks each tensor's CRC, so a file cut short or a
    flipped bit is found here, before ``restore`` assigns half of the variables.
    """
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - IndexError (short read), OpError (bad magic, CRC), ...
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def find_restore_point(ckpt_dir: Path, repair: bool = True) -> str | None:
    """The newest checkpoint in ``ckpt_dir`` that reads in full (its prefix), or None for a fresh start.

    With ``repair`` (the chief): removes leftovers of an interrupted save (``ckpt-N_temp*``), moves
    corrupt checkpoints to ``ckpt_dir/corrupt/`` and rewrites the ``checkpoint`` index to list what
    is left, each repair announced by a one-line warning. Non-chief workers only read.

    Raises:
        UserError: checkpoint files exist but none reads in full, or an index names checkpoints
            whose files are gone: a restart from step 0 is the user's decision, never a silent one.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    if repair:
        for tmp in ckpt_dir.glob(_TEMP_GLOB):  # a save killed half-way
            _remove(tmp)
    index = ckpt_dir / "checkpoint"
    steps = sorted({int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _CKPT_FILE.match(p.name))}, reverse=True)
    state = _read_index(ckpt_dir) if index.is_file() else None
    index_ok = state is not None and bool(state.model_checkpoint_path)
    if not steps:
        if index.is_file():
            raise UserError(f"{index} lists checkpoints but {ckpt_dir} holds no ckpt-* files; restore them, "
                            f"or delete {ckpt_dir} to restart this stage from step 0")
        return None
    chosen, bad = None, []
    for n in steps:
        prefix = ckpt_dir / f"ckpt-{n}"
        problem = checkpoint_problem(prefix)
        if problem is None:
            chosen = n
            break
        bad.append((n, problem))
    if chosen is None:
        why = "; ".join(f"ckpt-{n}: {p}" for n, p in bad)
        raise UserError(f"no readable checkpoint in {ckpt_dir} ({why}); restore it from a backup, or delete "
                        f"{ckpt_dir} to restart this stage from step 0")
    named = Path(state.model_checkpoint_path).name if index_ok else None
    for n, problem in bad:
        if repair:
            quarantine = ckpt_dir / "corrupt"
            quarantine.mkdir(exist_ok=True)
            for p in ckpt_dir.glob(f"ckpt-{n}.*"):
                if _CKPT_FILE.match(p.name):
                    os.replace(p, quarantine / p.name)
        _warn(f"{ckpt_dir / f'ckpt-{n}'} is corrupt ({problem}); "
              f"{'moved it to ' + str(ckpt_dir / 'corrupt') + ', ' if repair else ''}"
              f"resuming from the previous checkpoint ckpt-{chosen}")
    if not index_ok:
        _warn(f"{index} is {'unreadable' if index.is_file() else 'missing'}; recovered it from the ckpt-* files: "
              f"resuming from ckpt-{chosen}")
    if repair and (bad or not index_ok or named != f"ckpt-{chosen}"):
        kept = [f"ckpt-{n}" for n in sorted(steps) if n <= chosen and n not in dict(bad)]
        # the index's text format, as CheckpointManager writes it (relative paths)
        text = f'model_checkpoint_path: "ckpt-{chosen}"\n' + "".join(
            f'all_model_checkpoint_paths: "{k}"\n' for k in kept)
        try:
            write_text_atomic(index, text)
        except OSError as e:
            raise write_error(e, index) from None
    return str(ckpt_dir / f"ckpt-{chosen}")


def _read_index(ckpt_dir: Path):
    """The ``checkpoint`` index as TF parses it, None when garbled (TF's own multi-line log of the
    parse error is silenced: the caller says it in one line)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        return tf.train.get_checkpoint_state(str(ckpt_dir))
    except (tf.errors.OpError, UnicodeDecodeError, ValueError):
        return None
    finally:
        logger.setLevel(level)


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "quota exceeded" in text or isinstance(e, tf.errors.ResourceExhaustedError)


def write_error(e: BaseException, path: Path | str) -> UserError:
    """A failed write as a one-line :class:`UserError` (disk full gets its own fix)."""
    if _disk_full(e):
        return UserError(f"disk full while writing {path}; free some space (df -h {Path(path).parent}) and rerun "
                         "the same command: it resumes from the last complete checkpoint")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
    return UserError(f"cannot write {path} ({reason}); fix the folder's permissions or free space and rerun "
                     "the same command")


def save_checkpoint(manager: tf.train.CheckpointManager, step: int, write_dir: Path) -> None:
    """``manager.save(checkpoint_number=step)``; a failed write removes its ``ckpt-N_temp`` files and
    becomes a one-line :class:`UserError` (the previous checkpoints stay as they were)."""
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
        for tmp in Path(write_dir).glob(f"ckpt-{step}_temp*"):
            _remove(tmp)
        if isinstance(e, OSError) or _disk_full(e) or isinstance(e, tf.errors.PermissionDeniedError):
            raise write_error(e, Path(write_dir) / f"ckpt-{step}") from None
        raise


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    np.random.seed(seed)
