"""Sharded alignment checkpoints (fsdp runs): torch.distributed.checkpoint (DCP) in safetensors, any world size.

A checkpoint is a folder step-NNNNNN/: each process writes its shards of the same flat state as a safetensors
checkpoint (checkpoint.py: "<part>/<name>" trained tensors, "<optimiser>/<index>/<field>" optimiser states,
"rng/sampling", "rng/torch" from process 0) through DCP's HuggingFaceStorageWriter, into a temporary folder that
process 0 renames after every process has written; checkpoint.json holds the step, the run's identity, each
optimiser's param groups, each tensor's global shape and dtype, and a sha256 of every file. Loading verifies the
files, checks the identity and shapes, reads the whole state through DCP into fresh tensors laid out as this run's
(DCP reshards: a checkpoint of 2 processes loads into 1 or 4), checks them finite and only then changes the run.
A damaged newest checkpoint is skipped for the newest intact one, as in checkpoint.py. Never pickle: DCP's default
writer pickles its metadata, the HuggingFace one does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from didr.training.atomic import write_atomically
from didr.training.checkpoint import (
    CheckpointError,
    DamagedCheckpointError,
    TrainingState,
    flatten_state,
    list_checkpoints,
    raise_if_interrupted,
    restore_state,
)
from didr.training.distributed import Processes

FORMAT = "didr-align-sharded-checkpoint/1"
NAME = re.compile(r"step-(\d+)")
MANIFEST = "checkpoint.json"


def sharded_checkpoint_path(folder: str | Path, step: int) -> Path:
    """The folder of the sharded checkpoint taken after `step` steps."""
    return Path(folder) / f"step-{step:06d}"


def list_sharded_checkpoints(folder: str | Path) -> list[Path]:
    """The sharded checkpoints of `folder` (their folders), oldest first."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_sharded_checkpoint(
    folder: str | Path, step: int, state: TrainingState, keep: int, processes: Processes
) -> Path:
    """Write the checkpoint of `step` (every process its shards, at once), rename it into place, keep the newest
    `keep`; returns its folder."""
    final = sharded_checkpoint_path(folder, step)
    partial = final.with_name(f".{final.name}.tmp")
    if processes.main:
        shutil.rmtree(partial, ignore_errors=True)  # a killed writer's (its folder's lock is ours)
        partial.mkdir(parents=True)
    processes.barrier()
    flat, optimizers = _flatten(state, processes)
    with _one_process_is_meant():
        dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True))
    processes.barrier()  # every shard is written
    if processes.main:
        manifest = {
            "format": FORMAT, "step": step, "identity": json.loads(json.dumps(state.identity)),
            "optimizers": optimizers, "tensors": {k: [list(t.shape), str(t.dtype)] for k, t in flat.items()},
            "sha256": {f.name: _file_sha256(f) for f in sorted(partial.glob("*.safetensors"))},
        }  # fmt: skip
        write_atomically(partial / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))  # fsynced
        shutil.rmtree(final, ignore_errors=True)  # the same step again: a resumed run past a damaged checkpoint
        os.replace(partial, final)
        _fsync_folder(final.parent)
        for old in list_sharded_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    processes.barrier()
    return final


def load_sharded_checkpoint(path: str | Path, state: TrainingState, processes: Processes) -> int:
    """Verify the folder (files' sha256, identity, tensor names and shapes), read it into fresh tensors, check them
    finite, then load it into `state`; returns its step. CheckpointError (one from another run) or
    DamagedCheckpointError naming the folder, on every process alike, before changing `state`."""
    path = Path(path)
    manifest = _read_manifest(path)
    damaged = [name for i, (name, digest) in enumerate(sorted(manifest["sha256"].items()))
               if i % processes.world == processes.rank and _file_sha256(path / name) != digest]  # fmt: skip
    if processes.any(bool(damaged)):
        raise DamagedCheckpointError(f"checkpoint {path} fails its checksum (corrupt); delete it")
    _check(path, manifest, state)
    live, _ = _flatten(state, processes)
    fresh = {}  # laid out as this run's tensors (sharded where they are), the optimiser states as their parameters
    for key, (shape, dtype) in manifest["tensors"].items():
        if key in live:
            fresh[key] = torch.empty_like(live[key])
        elif _param_shaped(key, manifest, state):
            fresh[key] = torch.empty_like(_parameter(key, state))
        else:  # a scalar optimiser state (Adam's step)
            fresh[key] = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")))
    with _one_process_is_meant():
        dcp.load(fresh, storage_reader=HuggingFaceStorageReader(str(path)))
    culprit = next((k for k, t in fresh.items() if t.is_floating_point() and not _finite(t)), None)
    if processes.any(culprit is not None):
        raise DamagedCheckpointError(f"checkpoint {path} holds non-finite values in {culprit or 'a shard'}; delete it")
    restore_state(state, fresh, manifest["optimizers"])
    return int(manifest["step"])


def resume_sharded(
    checkpoint_dir: str | Path | None, state: TrainingState, resume: bool, processes: Processes
) -> tuple[int, Path | None]:
    """As checkpoint.resume_from, for sharded checkpoints: (the step to start at, the checkpoint loaded), the newest
    intact one, skipping damaged ones with a warning. ValueError for a folder of unsharded (ddp) checkpoints."""
    if checkpoint_dir is None:
        return 0, None
    if list_checkpoints(checkpoint_dir):
        raise ValueError(f"checkpoint_dir {checkpoint_dir} holds ddp checkpoints (step-*.safetensors): resume with ddp")
    found = list_sharded_checkpoints(checkpoint_dir)
    if not found:
        return 0, None
    if not resume:
        raise ValueError(f"checkpoint_dir {checkpoint_dir} holds checkpoints ({found[-1].name}): pass resume=True")
    skipped: list[DamagedCheckpointError] = []
    for path in reversed(found):
        try:
            return load_sharded_checkpoint(path, state, processes), path
        except DamagedCheckpointError as error:
            warnings.warn(f"skipping {error}", RuntimeWarning, stacklevel=2)
            skipped.append(error)
    names = ", ".join(path.name for path in found)
    raise DamagedCheckpointError(f"{checkpoint_dir}: no intact checkpoint (damaged: {names}); the newest: {skipped[0]}")


def _flatten(state: TrainingState, processes: Processes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The flat tensors of `state` (sharded ones as DTensors) and each optimiser's non-tensor state, as JSON."""
    torch_rng = torch.get_rng_state()
    if processes.world > 1:  # process 0's: the one a run of one process would have
        torch.distributed.broadcast(torch_rng, 0)
    return flatten_state(state, torch_rng)


def _parameter(key: str, state: TrainingState) -> Tensor:
    """The parameter of optimiser state `key` ("<optimiser>/<index>/<field>")."""
    name, index, _ = key.split("/", 2)
    optimizer = state.optimizers[name]
    return [p for group in optimizer.param_groups for p in group["params"]][int(index)]


def _param_shaped(key: str, manifest: dict[str, Any], state: TrainingState) -> bool:
    shape = manifest["tensors"][key][0]
    return key.partition("/")[0] in state.optimizers and bool(shape) and shape == list(_parameter(key, state).shape)


def _check(path: Path, manifest: dict[str, Any], state: TrainingState) -> None:
    saved_identity, identity = manifest["identity"], json.loads(json.dumps(state.identity))
    for key, value in identity.items():
        if saved_identity.get(key) != value:
            raise CheckpointError(f"checkpoint {path} is from another run: {key} differs")
    saved = manifest["tensors"]
    expected = {f"{part}/{name}": t for part, tensors in state.tensors.items() for name, t in tensors.items()}
    missing = sorted(expected.keys() - saved.keys())
    extra = sorted(k for k in saved.keys() - expected.keys() if k.partition("/")[0] in state.tensors)
    if missing or extra:
        raise CheckpointError(f"checkpoint {path}: tensors differ from this run's: missing {missing}, extra {extra}")
    for key, t in expected.items():
        if saved[key] != [list(t.shape), str(t.dtype)]:
            raise CheckpointError(f"checkpoint {path}: {key} is {saved[key]} in the file, {list(t.shape)} here")
    for name, optimizer in state.optimizers.items():
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        for key, (shape, _) in saved.items():
            owner, _, rest = key.partition("/")
            if owner != name:
                continue
            if int(rest.split("/")[0]) >= count or (shape and not _param_shaped(key, manifest, state)):
                raise CheckpointError(f"checkpoint {path}: {key} fits no parameter of this run")


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise_if_interrupted()
        raise DamagedCheckpointError(f"checkpoint {path} has no readable {MANIFEST}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a didr sharded alignment checkpoint ({FORMAT})")
    missing = sorted({"step", "identity", "optimizers", "tensors", "sha256"} - manifest.keys())
    if missing:
        raise DamagedCheckpointError(f"checkpoint {path}: {MANIFEST} lacks {', '.join(missing)}")
    return manifest


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP without a process group (a run of one process) saves and loads alone, warning that it assumes so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized")
        yield


def _finite(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return bool(torch.isfinite(local).all())


def _file_sha256(path: Path) -> str:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return "unreadable"


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
