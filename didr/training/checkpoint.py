"""Alignment checkpoints: one safetensors file per save (never pickle), written atomically, the newest few kept.

Tensors are flattened under "<part>/<name>" keys: the trained parameters of each part (generator, EMA, fake score),
each optimiser's per-parameter state ("<optimiser>/<index>/<field>") and the RNG states ("rng/sampling", the loop's
torch.Generator, and "rng/torch", the global CPU generator). Everything else is JSON in the file's metadata: the
step, the run's identity (method, params, loop hyper-parameters), each optimiser's param groups and "sha256", a
checksum of all the rest (`checksum`). Tensor shapes are in the safetensors header; loading verifies the checksum and
the finiteness of every tensor, then checks all of it against the live run, before changing anything.
`load_latest_checkpoint` falls back from a damaged newest checkpoint to the newest intact one, and `check_finite`
stops a run whose loss, gradient norm or parameters are not finite, naming the last verified checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import Tensor

from didr.training.atomic import save_tensors
from didr.training.metrics_log import MetricsLog
from didr.training.preemption import PREEMPTED_EXIT_CODE, raise_if_interrupted  # noqa: F401 (the code: re-exported)

FORMAT = "didr-align-checkpoint/1"
NAME = re.compile(r"step-(\d+)\.safetensors")


class Preempted(Exception):
    """The run stopped on a signal after `step` steps, checkpointed at `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(f"preempted by {signal_name} after {step} steps; resume from checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or belongs to another run; the one-line message names the file."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that is unreadable, fails its checksum or holds non-finite values (an older one may be intact)."""


@dataclass
class TrainingState:
    """The live objects a checkpoint captures; `identity` (JSON-able) must match the file's to load it."""

    tensors: dict[str, dict[str, Tensor]]
    optimizers: dict[str, torch.optim.Optimizer]
    rng: torch.Generator
    identity: dict[str, Any]


def checkpoint_path(folder: str | Path, step: int) -> Path:
    """The file of the checkpoint taken after `step` steps."""
    return Path(folder) / f"step-{step:06d}.safetensors"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first (none if the folder does not exist)."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if NAME.fullmatch(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(cast("re.Match[str]", NAME.fullmatch(p.name))[1]))  # all match NAME


def flatten_state(state: TrainingState, torch_rng: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors a checkpoint stores, by name (the RNG states, each part's tensors, the optimisers' tensor states),
    and per optimiser what is not a tensor (its param groups and scalar states), JSON-able."""
    flat = {"rng/sampling": state.rng.get_state(), "rng/torch": torch_rng}
    for part, tensors in state.tensors.items():
        flat.update({f"{part}/{name}": t.detach().contiguous() for name, t in tensors.items()})
    optimizers = {}
    for name, optimizer in state.optimizers.items():
        saved = optimizer.state_dict()
        other: dict[int, dict[str, Any]] = {}
        for index, fields in saved["state"].items():
            for field, value in fields.items():
                if isinstance(value, Tensor):
                    flat[f"{name}/{index}/{field}"] = value.contiguous()
                else:
                    other.setdefault(index, {})[field] = value
        optimizers[name] = {"param_groups": saved["param_groups"], "state": other}
    return flat, optimizers


def save_checkpoint(folder: str | Path, step: int, state: TrainingState, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep` and the temporary files a
    killed writer left; returns its path."""
    flat, optimizers = flatten_state(state, torch.get_rng_state())
    metadata = {"format": FORMAT, "step": str(step)} | {k: json.dumps(v) for k, v in state.identity.items()}
    metadata |= {name: json.dumps(saved) for name, saved in optimizers.items()}
    metadata["sha256"] = checksum(flat, metadata)
    path = checkpoint_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(flat, path, metadata)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    for stale in Path(folder).glob(".step-*.safetensors.tmp"):  # a killed writer's (its folder's lock is ours)
        stale.unlink(missing_ok=True)
    return path


def checkpoint_or_stop(
    done: int,
    total: int,
    signal_name: str | None,
    folder: str | Path | None,
    every: int,
    state: TrainingState,
    keep: int,
    log: MetricsLog,
    last: Path | None,
) -> Path | None:
    """After `done` of `total` steps (one process): checkpoint every `every` steps, at the end and when a stop signal
    arrived, the metric log flushed first (it never lags the newest checkpoint); then raise Preempted for the signal.
    Returns the newest checkpoint."""
    if folder is not None and (done % every == 0 or done == total or signal_name):
        log.flush()
        last = save_checkpoint(folder, done, state, keep)
    if signal_name:
        raise Preempted(done, last, signal_name)
    return last


def load_checkpoint(path: str | Path, state: TrainingState) -> int:
    """Verify the file (checksum, finite tensors), check it against `state` (identity, tensor names and shapes), then
    load it; returns its step.

    Raises CheckpointError naming the file for one from another run, DamagedCheckpointError for an unreadable or
    corrupt one, before changing `state`.
    """
    flat, metadata = _read(Path(path))
    _verify(path, flat, metadata)
    _check(path, flat, metadata, state)
    restore_state(state, flat, {name: json.loads(metadata[name]) for name in state.optimizers})
    return int(metadata["step"])


def restore_state(state: TrainingState, flat: dict[str, Tensor], optimizers: dict[str, Any]) -> None:
    """The inverse of flatten_state: copy the tensors into `state`'s, load each optimiser (its tensor states from
    `flat`, the rest from `optimizers`), set both RNGs."""
    with torch.no_grad():
        for part, tensors in state.tensors.items():
            for name, t in tensors.items():
                t.copy_(flat[f"{part}/{name}"])
    for name, optimizer in state.optimizers.items():
        saved = optimizers[name]
        fields = {int(i): f for i, f in saved["state"].items()}
        for index, tensors in _optimizer_tensors(flat, name).items():
            fields.setdefault(index, {}).update(tensors)
        groups = [
            {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
            for g in saved["param_groups"]
        ]
        optimizer.load_state_dict({"state": fields, "param_groups": groups})
    state.rng.set_state(flat["rng/sampling"])
    torch.set_rng_state(flat["rng/torch"])


def load_latest_checkpoint(folder: str | Path, state: TrainingState) -> tuple[int, Path | None]:
    """Load the newest intact checkpoint of `folder` into `state`: (its step, its path), or (0, None) if the folder
    holds none. A damaged one (unreadable, checksum mismatch, non-finite values) is skipped with a one-line warning
    naming it and why; DamagedCheckpointError if none is intact. One from another run raises CheckpointError at once."""
    found = list_checkpoints(folder)
    skipped: list[DamagedCheckpointError] = []
    for path in reversed(found):
        try:
            return load_checkpoint(path, state), path
        except DamagedCheckpointError as error:
            warnings.warn(f"skipping {error}", RuntimeWarning, stacklevel=2)
            skipped.append(error)
    if found:
        names = ", ".join(path.name for path in found)
        raise DamagedCheckpointError(f"{folder}: no intact checkpoint (damaged: {names}); the newest: {skipped[0]}")
    return 0, None


def check_checkpointing(
    checkpoint_dir: str | Path | None, every: int, keep: int, resume: bool, params: dict[str, Any] | None
) -> None:
    """ValueError, before any work, for checkpoint settings a training loop cannot use (the two loops share them)."""
    if every < 1 or keep < 1:
        raise ValueError(f"checkpoint_every, keep_checkpoints must be >= 1, got {every}, {keep}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    try:
        json.dumps(params)
    except TypeError as error:
        raise ValueError(f"params must be JSON-serialisable: {error}") from error


def resume_from(checkpoint_dir: str | Path | None, state: TrainingState, resume: bool) -> tuple[int, Path | None]:
    """(the step to start at, the checkpoint it was loaded from): with `resume`, the newest intact checkpoint of
    `checkpoint_dir` loaded into `state`; (0, None) where there is none. ValueError if the folder holds checkpoints
    but not `resume`, so that no run overwrites another's."""
    found = [] if checkpoint_dir is None else list_checkpoints(checkpoint_dir)
    if not found:
        return 0, None
    if not resume:
        raise ValueError(f"checkpoint_dir {checkpoint_dir} holds checkpoints ({found[-1].name}): pass resume=True")
    assert checkpoint_dir is not None  # found lists its checkpoints
    return load_latest_checkpoint(checkpoint_dir, state)


def checksum(flat: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the metadata (but its own "sha256" entry) and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(flat):
        t = flat[key].detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def check_finite(
    step: int, loss: Tensor | float, grad_norm: Tensor | float, tensors: Mapping[str, Tensor], last_good: Path | None
) -> None:
    """FloatingPointError naming the step, the culprit and the last verified checkpoint unless the loss, the gradient
    norm and every tensor of `tensors` (the trained parameters, by name) are finite."""
    culprit = None
    if not torch.isfinite(torch.as_tensor(loss)).all():
        culprit = "generator loss"
    elif not torch.isfinite(torch.as_tensor(grad_norm)).all():
        culprit = "gradient norm"
    else:
        culprit = next((f"parameter {name}" for name, t in tensors.items() if not torch.isfinite(t).all()), None)
    if culprit is not None:
        raise FloatingPointError(f"non-finite {culprit} at step {step}; last good checkpoint: {last_good or 'none'}")


def _verify(path: str | Path, flat: dict[str, Tensor], metadata: dict[str, str]) -> None:
    if "sha256" not in metadata:
        raise DamagedCheckpointError(f"checkpoint {path} has no checksum (not written by this version); delete it")
    if checksum(flat, metadata) != metadata["sha256"]:
        raise DamagedCheckpointError(f"checkpoint {path} fails its checksum (corrupt); delete it")
    for key, t in flat.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DamagedCheckpointError(f"checkpoint {path} holds non-finite values in {key}; delete it")


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors' own error types, or OSError
        raise_if_interrupted()  # a stop signal's Interrupted, disguised by safetensors: the file may well be intact
        reason = " ".join(str(error).split())
        raise DamagedCheckpointError(f"checkpoint {path} is unreadable (corrupt or truncated): {reason}") from error


def _check(path: str | Path, flat: dict[str, Tensor], metadata: dict[str, str], state: TrainingState) -> None:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a didr alignment checkpoint ({FORMAT})")
    for key, value in state.identity.items():
        saved, given = json.loads(metadata.get(key, "null")), json.loads(json.dumps(value))
        if saved != given:
            raise CheckpointError(f"checkpoint {path} is from another run: {key} differs: {_difference(saved, given)}")
    expected = {f"{part}/{name}": t for part, tensors in state.tensors.items() for name, t in tensors.items()}
    missing = sorted(expected.keys() - flat.keys())
    extra = sorted(k for k in flat.keys() - expected.keys() if k.partition("/")[0] in state.tensors)
    if missing or extra:
        raise CheckpointError(f"checkpoint {path}: tensors differ from this run's: missing {missing}, extra {extra}")
    for key, t in expected.items():
        if flat[key].shape != t.shape or flat[key].dtype != t.dtype:
            found, wanted = f"{list(flat[key].shape)} {flat[key].dtype}", f"{list(t.shape)} {t.dtype}"
            raise CheckpointError(f"checkpoint {path}: {key} is {found} in the file, {wanted} in this run")
    for name, optimizer in state.optimizers.items():
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for index, tensors in _optimizer_tensors(flat, name).items():
            for field, t in tensors.items():
                if index >= len(params) or (t.dim() and t.shape != params[index].shape):
                    raise CheckpointError(f"checkpoint {path}: {name}/{index}/{field} fits no parameter of this run")


def _optimizer_tensors(flat: dict[str, Tensor], name: str) -> dict[int, dict[str, Tensor]]:
    """The state tensors of optimiser `name`, by parameter index and field."""
    found: dict[int, dict[str, Tensor]] = {}
    for key, t in flat.items():
        owner, _, rest = key.partition("/")
        if owner == name:
            index, field = rest.split("/", 1)
            found.setdefault(int(index), {})[field] = t
    return found


def _difference(saved: Any, given: Any) -> str:
    if isinstance(saved, dict) and isinstance(given, dict):
        keys = [k for k in sorted(saved.keys() | given.keys()) if saved.get(k) != given.get(k)]
        return "; ".join(f"{k}={saved.get(k)!r} in the file, {given.get(k)!r} in this run" for k in keys)
    return f"{saved!r} in the file, {given!r} in this run"
