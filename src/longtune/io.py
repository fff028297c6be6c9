"""Atomic writes: a file or folder appears complete under its final name or not at all, even if the process is
killed mid-write. The one place that writes temp-then-rename (checkpoints, exports, metrics, caches, tables).

The temp lives in the destination's own folder, so the final `os.replace` is a rename within one filesystem
(atomic on POSIX); data is fsynced before the rename so that a crash cannot leave a renamed but empty file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file next to `path` for writing (`mode` "w" or "wb"); on a clean exit it is flushed, fsynced
    and renamed onto `path`; on an exception it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder `tmp` (a sibling of `final`) onto `final`, replacing an earlier one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


@contextmanager
def atomic_dir(final: str | Path, temp_name: str) -> Iterator[Path]:
    """A fresh empty folder `temp_name` next to `final` to write into; on a clean exit it replaces `final`, on an
    exception it is removed. `temp_name` is fixed (not random) so that a run killed mid-write leaves a name its
    next start recognises and cleans up."""
    final = Path(final)
    tmp = final.parent / temp_name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
