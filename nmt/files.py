"""Files written to last and known by content: durable renames and sha256 digests.

Every module that writes a file atomically (temp file, fsync, rename) makes the rename
durable with ``fsync_dir``; every module that names a file by its content uses ``sha256``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BLOCK_BYTES = 1 << 20  # read this much at a time: a multi-GB checkpoint is never in memory whole


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable: without this a power cut can undo it.

    Where directories cannot be opened or synced (Windows, some network file systems),
    the rename is as durable as the OS makes it.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temp file beside it, synced, renamed over
    it, the rename made durable. A reader never sees half a file, even after a crash."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))
