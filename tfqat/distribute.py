"""``tf.distribute`` for the training loop: the strategy a config names (``default``,
``mirrored``, ``multiworker`` from a checked ``TF_CONFIG``), which task is the chief, and the
distributed train step (each replica a slice of the global batch; gradients all-reduced, then
clipped).

Setup problems (TF_CONFIG, unreachable workers, a model built outside the strategy's scope) are
:class:`DistributeError`: one line, no traceback, from every CLI.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import tensorflow as tf

from .cli import UserError


class DistributeError(UserError):
    """A tf.distribute setup problem (TF_CONFIG, unreachable workers), reported as one line by the CLIs."""


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


def worker_tmp_dir(run_dir: Path, strategy) -> Path:
    ext = strategy.extended
    return run_dir / ".workers" / f"{getattr(ext, '_task_type', 'worker')}_{getattr(ext, '_task_id', 0)}"


def check_in_scope(strategy, model) -> None:
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


def distributed_step(model, loss_fn, cfg, strategy, optimizer, step_var):
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


def cleanup_worker_dir(chief: bool, write_dir: Path) -> None:
    if not chief:
        import shutil

        shutil.rmtree(write_dir, ignore_errors=True)
