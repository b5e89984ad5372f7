"""Alignment checkpoints: one safetensors file per save (never pickle), written atomically, the newest few kept.

Tensors are flattened under "<part>/<name>" keys: the trained parameters of each part (generator, EMA, fake score),
each optimiser's per-parameter state ("<optimiser>/<index>/<field>") and the RNG states ("rng/sampling", the loop's
torch.Generator, and "rng/torch", the global CPU generator). Everything else is JSON in the file's metadata: the
step, the run's identity (method, params, loop hyper-parameters) and each optimiser's param groups. Tensor shapes
are in the safetensors header; loading checks all of it against the live run before changing anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from didr.training.atomic import write_atomically

FORMAT = "didr-align-checkpoint/1"
NAME = re.compile(r"step-(\d+)\.safetensors")
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a CLI exits with it on Preempted, so a scheduler knows to requeue the run


class Preempted(Exception):
    """The run stopped on a signal after `step` steps, checkpointed at `checkpoint`."""

    def __init__(self, step: int, checkpoint: Path | None, signal_name: str):
        super().__init__(f"preempted by {signal_name} after {step} steps; resume from checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or belongs to another run; the one-line message names the file."""


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


def save_checkpoint(folder: str | Path, step: int, state: TrainingState, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep`; returns its path."""
    flat = {"rng/sampling": state.rng.get_state(), "rng/torch": torch.get_rng_state()}
    for part, tensors in state.tensors.items():
        flat.update({f"{part}/{name}": t.detach().contiguous() for name, t in tensors.items()})
    metadata = {"format": FORMAT, "step": str(step)} | {k: json.dumps(v) for k, v in state.identity.items()}
    for name, optimizer in state.optimizers.items():
        saved = optimizer.state_dict()
        other: dict[int, dict[str, Any]] = {}
        for index, fields in saved["state"].items():
            for field, value in fields.items():
                if isinstance(value, Tensor):
                    flat[f"{name}/{index}/{field}"] = value.contiguous()
                else:
                    other.setdefault(index, {})[field] = value
        metadata[name] = json.dumps({"param_groups": saved["param_groups"], "state": other})
    path = checkpoint_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(flat, tmp, metadata=metadata))
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: str | Path, state: TrainingState) -> int:
    """Check the file against `state` (identity, tensor names and shapes), then load it; returns its step.

    Raises CheckpointError naming the file for an unreadable file or one from another run, before changing `state`.
    """
    flat, metadata = _read(Path(path))
    _check(path, flat, metadata, state)
    with torch.no_grad():
        for part, tensors in state.tensors.items():
            for name, t in tensors.items():
                t.copy_(flat[f"{part}/{name}"])
    for name, optimizer in state.optimizers.items():
        saved = json.loads(metadata[name])
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
    return int(metadata["step"])


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors' own error types, or OSError
        reason = " ".join(str(error).split())
        raise CheckpointError(
            f"checkpoint {path} is unreadable (corrupt or truncated; delete it to resume from an older one): {reason}"
        ) from error


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
