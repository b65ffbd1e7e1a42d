"""Whole files or none: every file tfqat writes goes to a temporary name beside it, then is renamed.

A crash, a full disk or ``kill -9`` mid-write leaves the previous file (or no file), never half of
one, and never a stray temporary. No TensorFlow here: the runtime and android_bench use it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; a model or report is an ordinary file (0666 & ~umask), as open() makes it
_MODE = 0o666 & ~_umask()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, indent: int = 1) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")
