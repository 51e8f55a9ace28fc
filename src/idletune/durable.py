"""Small files written so that a crash or a power cut leaves either the old file or the new one."""
from __future__ import annotations

import os
import threading
from pathlib import Path


def temporary(path: Path) -> Path:
    """The name ``path`` is written under before it is renamed into place: this process's and
    thread's own, so two writers never share one."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: Path, text: str) -> None:
    """``text`` into ``path``: a temporary file, fsynced, renamed into place, the folder fsynced."""
    tmp = temporary(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def remove_durably(path: Path) -> None:
    """Remove ``path`` (if there) and fsync its folder, so the removal outlasts a power cut."""
    path.unlink(missing_ok=True)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """A file's data, or a folder's entries (a rename or removal in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
