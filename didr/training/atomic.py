"""Atomic file replacement: write a temporary file in the same folder, fsync it, then os.replace it over the target."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it to `path` (readers never see a part)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _fsync(tmp, os.O_RDWR)
    os.replace(tmp, path)
    _fsync(path.parent, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
