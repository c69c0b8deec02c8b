"""Atomic file writes: the data goes to a temp file in the target's folder, then `os.replace`
puts it in place, so a crash leaves either the old file or the new one, never a partial one.

Pure Python; the compiler (schedules, profiles, records, charts) and the runtime (checkpoints)
write through it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)` to fill a temp file next to `path`, then move it over `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_new_text(path: str | os.PathLike[str], text: str) -> Path:
    """Like `atomic_write_text`, but never over an existing file: if `path` is taken, the next free
    of <stem>-2<suffix>, -3, ... Each name is claimed with `os.link`, which fails on an existing
    name, so concurrent writers (records stamped in the same second) cannot take the same one.
    Returns the path written."""
    p = Path(path)
    tmp = atomic_write_text(p.with_name(f".{p.name}.{os.getpid()}.new"), text)
    try:
        cand, i = p, 1
        while True:
            try:
                os.link(tmp, cand)
                return cand
            except FileExistsError:
                i += 1
                cand = p.with_name(f"{p.stem}-{i}{p.suffix}")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
