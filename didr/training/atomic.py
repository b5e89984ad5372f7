"""Atomic replacement of files and folders: build a temporary one beside the target, then os.replace it over.

What is written gets the permissions the umask allows (0o666 / 0o777 minus the umask: group-readable in a shared
project folder), not safetensors' or mkdtemp's private 0o600 / 0o700. The callers hold the target's lock
(didr/training/lock.py), so temporaries left beside it by a killed writer are stale and removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from didr.training.preemption import deferred_signals


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set and restore at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, mode: int = 0o666) -> None:
    """chmod `path` to `mode` minus the umask (0o666 for files, 0o777 for folders)."""
    path.chmod(mode & ~current_umask())


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it to `path` (readers never see a part).
    If `write` fails, the temporary file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        honour_umask(tmp)
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent, os.O_RDONLY)


def save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically (write_atomically); OSError naming the file when it cannot be written
    (a full disk: safetensors raises its own error type for it), the file as it was before."""

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as error:
            raise OSError(f"{path}: cannot be written ({' '.join(str(error).split())})") from None

    write_atomically(path, write)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(out: Path) -> None:
    """ValueError naming `out` if it exists and is not a folder (a stage never replaces a user's file)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder; choose another output path")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the `.<out>.*.tmp` folders and `.<out>.old` that a killed writer of `out` left; returns them."""
    old = out.with_name(f".{out.name}.old")
    stale = sorted(out.parent.glob(f".{out.name}.*.tmp")) + ([old] if old.exists() else [])
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `out`. If the block succeeds the folder replaces `out` (an old `out` is
    swapped aside first and removed after); if it fails the folder is removed and `out` is left as it was.
    ValueError if `out` is a file; temporaries a killed writer left are removed first."""
    out = Path(out)
    check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    honour_umask(staging, 0o777)  # mkdtemp's 0o700 would otherwise stay on `out`
    try:
        yield staging
        for path in staging.rglob("*"):  # files written by libraries (safetensors: 0o600) inside the folder
            honour_umask(path, 0o777 if path.is_dir() else 0o666)
        with deferred_signals():  # a stop signal between the two renames would leave no `out`
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(staging, out)
                shutil.rmtree(old)
            else:
                os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
