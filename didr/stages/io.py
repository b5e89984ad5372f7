"""What every stage reads and writes: prompt files, embedding shards, weights, params; all writes atomic."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import Tensor, nn

from didr.backbones.base import Conditioning
from didr.training.atomic import save_tensors, write_atomically


class StageInputError(ValueError):
    """A stage's input is missing or malformed; the message names the file."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, then rename it into place."""
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def trained_state(module: nn.Module) -> dict[str, Tensor]:
    """The tensors a stage saves of a trained copy: only its LoRA weights when it has any (the rest is the pinned
    teacher, or the pinned initial weights), else its whole state dict."""
    state = module.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    return lora or state


def save_weights(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A module's trained state (`trained_state`) as safetensors, written atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in trained_state(module).items()}
    save_tensors(state, path, metadata)


def load_weights(module: nn.Module, path: Path) -> None:
    """Load safetensors weights into `module`; StageInputError naming the file if missing or of another shape."""
    if not path.is_file():
        raise StageInputError(f"{path}: checkpoint not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as error:
        raise StageInputError(f"{path}: not a readable safetensors file ({error})") from None
    check_state(path, state, trained_state(module))
    module.load_state_dict(state, strict=False)


def check_state(path: Path, state: dict[str, Tensor], own: dict[str, Tensor]) -> None:
    """StageInputError naming `path` unless `state` has exactly the names and shapes of `own`."""
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise StageInputError(f"{path}: weights of another model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise StageInputError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")


def read_prompts(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 prompt file; StageInputError naming the file if missing, not a file, not UTF-8,
    empty, or holding a control character (a NUL, escape or other control byte but a tab: a damaged file).
    Any word is accepted: real text encoders tokenize any text, and so does the toy world's."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise StageInputError(f"{path}: prompt file not found") from None
    except IsADirectoryError:
        raise StageInputError(f"{path}: is a folder, not a prompt file") from None
    except UnicodeDecodeError as error:
        raise StageInputError(f"{path}: not UTF-8 (byte {error.start})") from None
    lines = text.split("\n")  # not splitlines(): it would split at a form feed or other control characters
    for number, line in enumerate(lines, 1):
        bad = next((c for c in line.rstrip("\r") if c != "\t" and unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise StageInputError(f"{path}: line {number} holds the control character {bad!r}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise StageInputError(f"{path}: no prompts")
    return prompts


def save_embeddings(cond: Conditioning, folder: Path, name: str, shard_size: int = 4096) -> list[Path]:
    """Encoded prompts as safetensors shards `{name}-00000.safetensors`, prompts in each shard's metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(cond), shard_size):
        index = torch.arange(start, min(start + shard_size, len(cond)))
        part = cond.select(index).to("cpu")
        tensors = {f"embeds.{k}": v.contiguous() for k, v in part.embeds.items()}
        tensors |= {f"negative.{k}": v.contiguous() for k, v in (part.negative or {}).items()}
        path = folder / f"{name}-{start // shard_size:05d}.safetensors"
        save_tensors(tensors, path, metadata={"prompts": json.dumps(part.prompts)})
        paths.append(path)
    return paths


def load_embeddings(folder: Path, name: str) -> Conditioning:
    """The Conditioning saved by save_embeddings, shards concatenated in order."""
    shards = sorted(folder.glob(f"{name}-*.safetensors"))
    if not shards:
        raise StageInputError(f"{folder}: no '{name}' embedding shards (run the teacher stage)")
    prompts: list[str] = []
    embeds: dict[str, list[Tensor]] = {}
    negative: dict[str, list[Tensor]] = {}
    for shard in shards:
        try:
            with safe_open(shard, "pt") as f:
                prompts += json.loads((f.metadata() or {})["prompts"])
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    group, sub = key.split(".", 1)
                    (embeds if group == "embeds" else negative).setdefault(sub, []).append(f.get_tensor(key))
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            reason = " ".join(str(error).split())
            raise StageInputError(f"{shard}: not a readable embedding shard (truncated or corrupt: {reason})") from None
    return Conditioning(
        prompts,
        {k: torch.cat(v) for k, v in embeds.items()},
        {k: torch.cat(v) for k, v in negative.items()} or None,
    )
