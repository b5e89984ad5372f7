"""Single weight files from a local path or a hub repository at a pinned commit (the cache, or a download)."""

from __future__ import annotations

from pathlib import Path

from didr.backbones.loading import ModelUnavailableError, _offline


def resolve_file(file: str, source: str | None = None, revision: str | None = None) -> Path:
    """`file` itself when `source` is None, else `file` of hub repo `source` at commit `revision`, from the local
    Hugging Face cache (or downloaded when the hub is reachable); one-line errors naming what is missing."""
    if source is None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        return path
    if revision is None:
        raise ValueError(f"{source}/{file}: a hub file needs a pinned revision (a commit hash)")
    from huggingface_hub import hf_hub_download

    offline = _offline()
    try:
        return Path(hf_hub_download(source, file, revision=revision, local_files_only=offline))
    except Exception as err:
        state = "offline (HF_HUB_OFFLINE)" if offline else "unreachable"
        raise ModelUnavailableError(
            f"{file} of {source!r} at revision {revision!r} is not in the local Hugging Face cache and the hub is "
            f"{state} ({type(err).__name__})"
        ) from err
