"""Weights from a local path, or from the Hugging Face hub at a pinned revision (only the cache when offline).

An existing local path wins; otherwise `source` must be a hub id (owner/name) with a revision, read with
`local_files_only` under HF_HUB_OFFLINE, and any failure is one ModelUnavailableError line naming the model, the
revision and the hub's state. Teachers, reward models and initial generator weights all resolve through here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelUnavailableError(RuntimeError):
    """A hub model that is neither in the local cache nor downloadable (offline or unreachable hub)."""


def offline() -> bool:
    """True when the hub must not be contacted (HF_HUB_OFFLINE)."""
    import huggingface_hub.constants as hub

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return hub.is_offline_mode() or flag in {"1", "ON", "YES", "TRUE"}


def _hub_id(source: str | Path, revision: str | None, what: str) -> str:
    path = Path(source).expanduser()
    if not (isinstance(source, str) and HUB_ID.match(source)):
        raise FileNotFoundError(f"{what} not found: {path}")
    if revision is None:
        raise ValueError(f"hub model {source!r} needs a pinned revision (a commit hash); no local {what} {path} exists")
    return source


def _unavailable(source: str, revision: str | None, is_offline: bool, err: Exception) -> ModelUnavailableError:
    state = "offline (HF_HUB_OFFLINE)" if is_offline else "unreachable"
    return ModelUnavailableError(
        f"model {source!r} at revision {revision!r} is not in the local Hugging Face cache and the hub is {state} "
        f"({type(err).__name__})"
    )


def resolve_file(source: str | Path, revision: str | None, filename: str) -> Path:
    """A local file, `filename` inside a local folder, or `filename` of hub repo `source` at `revision`."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path} has no {filename}")
        return path / filename
    repo = _hub_id(source, revision, "weights file")
    from huggingface_hub import hf_hub_download

    is_offline = offline()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, local_files_only=is_offline))
    except Exception as err:
        raise _unavailable(repo, revision, is_offline, err) from err


def resolve_folder(source: str | Path, revision: str | None, patterns: Sequence[str] | None = None) -> Path:
    """A local folder, or the snapshot of hub repo `source` at `revision` (only files matching `patterns`, if given)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    repo = _hub_id(source, revision, "model folder")
    from huggingface_hub import snapshot_download

    is_offline = offline()
    try:
        # huggingface_hub annotates allow_patterns as list[str] | str, but iterates any sequence (our tuples too).
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=patterns,  # type: ignore[arg-type]
            local_files_only=is_offline,
        )
        return Path(folder)
    except Exception as err:
        raise _unavailable(repo, revision, is_offline, err) from err
