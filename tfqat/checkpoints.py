"""What a run writes and reads back, with one-line errors: weights files, JSON results and
``tf.train`` checkpoints.

The state that must survive a ``kill -9`` (model and optimizer variables, the step counter)
lives in a ``tf.train.Checkpoint``; TF writes each checkpoint under a temporary name and
publishes it by renaming the index file, so an interrupted save leaves the previous checkpoint
intact.

Damaged state is never a silent restart: before restoring, every kept checkpoint is read in full
(TF checks each tensor's CRC). A corrupt one (cut short, bit rot) is moved to ``ckpt/corrupt/`` and
training resumes from the previous kept checkpoint, with a one-line warning; a garbled
``checkpoint`` index is rebuilt from the ``ckpt-*`` files; when no readable checkpoint is left the
run stops with a one-line error. A full disk while saving is a one-line error, and the save's
``ckpt-N_temp`` leftovers are removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import keras
import tensorflow as tf

from .atomic import write_text_atomic
from .cli import UserError


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
    path = Path(path)
    fix = fix or "delete it and rerun the command that wrote it"
    check_weights_file(path, fix)
    try:
        model.load_weights(str(path))
    except Exception as e:  # noqa: BLE001 - keras raises ValueError/KeyError/OSError for a mismatch
        raise UserError(f"{path}: cannot load into this model ({type(e).__name__}: {first_line(e)}); it was "
                        f"written for another config, or it is damaged: {fix}") from None


def check_weights_file(path: str | os.PathLike, fix: str | None = None) -> None:
    """Raise a one-line :class:`UserError` naming ``path`` and ``fix`` unless it is a whole HDF5
    file: for callers that hand the file to code whose own errors would be a traceback."""
    import h5py

    path = Path(path)
    fix = fix or "delete it and rerun the command that wrote it"
    if not path.is_file():
        raise UserError(f"{path}: no such weights file; {fix}")
    try:
        with h5py.File(path, "r") as f:  # a truncated file fails here (HDF5 checks its end-of-file)
            f.visit(lambda _: None)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError on damage
        raise UserError(f"{path}: damaged weights file, not readable as HDF5 ({first_line(e)}); {fix}") from None


def read_json_checked(path: str | os.PathLike, fix: str | None = None):
    """``json.loads`` of a file tfqat wrote, with a one-line :class:`UserError` naming the file and
    ``fix`` (default: delete it and rerun the command that wrote it) when it is damaged."""
    path = Path(path)
    fix = fix or "delete it and rerun the command that wrote it"
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged JSON ({first_line(e)}); {fix}") from None


# ---- checkpoints: verify before restore, repair the index, clean up after a failed save ---------

_CKPT_FILE = re.compile(r"ckpt-(\d+)(\.index|\.data-\d+-of-\d+)$")
_TEMP_GLOB = "ckpt-*_temp*"  # TF writes ckpt-N_temp/part-* and renames it into place when complete


def first_line(e: BaseException) -> str:
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
        return f"{type(e).__name__}: {first_line(e)}"
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
    reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
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
