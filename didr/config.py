"""The typed, strict view of params.yaml: unknown keys and bad values are errors naming the key and the file."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A bad params file: the message names the file and the key."""


@dataclass
class TeacherParams:
    """Teacher caching: for the toy world, train the teacher and the toy rewards from scratch."""

    kind: str = "vp"
    size: int = 16
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    n_images: int = 8192
    reward_seed: int = 0
    reward_alignment_steps: int = 1200
    reward_preference_steps: int = 800


@dataclass
class PromptParams:
    """Prompt files, one prompt a line (UTF-8)."""

    train: str = "data/prompts/toy_train.txt"
    eval: str = "data/prompts/toy_eval.txt"


@dataclass
class RewardParams:
    """The training reward and the held-out evaluation rewards, by registry name."""

    train: str = "toy_preference"
    eval: list[str] = field(default_factory=lambda: ["toy_preference", "toy_aesthetic", "toy_alignment", "toy_utility"])


@dataclass
class WarmupParams:
    """Fake-score warm-up on the un-aligned generator's samples."""

    t_star: float = 0.9
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4


@dataclass
class AlignParams:
    """One alignment run; `strength` is beta for didr, alpha_rew for dipp, the reward weight for dmd2."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    fake_lr: float = 1e-4
    fake_updates: int = 2
    ema_decay: float = 0.95
    grad_clip: float = 10.0
    teacher_guidance: float = 3.0
    t_min: float = 0.02
    t_max_sampling: float = 0.98
    drs: str = "tweedie"
    drs_steps: int = 1
    drs_t_max: float = 0.5
    checkpoint_every: int = 100


@dataclass
class SampleParams:
    """Evaluation images: per prompt, from each one-step generator and from the teacher with N steps and CFG."""

    per_prompt: int = 2
    teacher_steps: int = 25
    teacher_guidance: float = 3.0
    seed: int = 1234


@dataclass
class Params:
    """Everything an experiment needs, as in params.yaml."""

    seed: int = 0
    teacher: TeacherParams = field(default_factory=TeacherParams)
    prompts: PromptParams = field(default_factory=PromptParams)
    rewards: RewardParams = field(default_factory=RewardParams)
    warmup: WarmupParams = field(default_factory=WarmupParams)
    align: AlignParams = field(default_factory=AlignParams)
    sample: SampleParams = field(default_factory=SampleParams)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{where}{'.' if where else ''}{unknown[0]}: unknown key (known: {sorted(hints)})")
    return cls(**{k: _coerce(v, hints[k], f"{where}{'.' if where else ''}{k}") for k, v in data.items()})


def _validate(p: Params) -> None:
    checks = [
        ("teacher.kind", p.teacher.kind in ("vp", "flow"), "must be 'vp' or 'flow'"),
        ("teacher.size", p.teacher.size >= 8, "must be >= 8"),
        ("warmup.t_star", 0 < p.warmup.t_star <= 1, "must lie in (0, 1]"),
        ("align.drs_t_max", 0 < p.align.drs_t_max <= 1, "must lie in (0, 1]"),
        ("align.drs_steps", p.align.drs_steps >= 1, "must be >= 1"),
        ("align.t_min", 0 <= p.align.t_min < p.align.t_max_sampling <= 1, "needs 0 <= t_min < t_max_sampling <= 1"),
        ("sample.per_prompt", p.sample.per_prompt >= 1, "must be >= 1"),
    ]
    for section in ("teacher", "warmup", "align"):
        for name in ("steps", "batch_size"):
            checks.append((f"{section}.{name}", getattr(getattr(p, section), name) >= 1, "must be >= 1"))
    for key, ok, what in checks:
        if not ok:
            raise ConfigError(f"{key} {what}")


def load_params(path: str | Path) -> Params:
    """Read and check a params file (YAML); ConfigError names the file and the offending key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid UTF-8 YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        params = _build(Params, data, "")
        _validate(params)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return params


def params_json(params: Params) -> str:
    """The params as JSON, saved next to every output."""
    return json.dumps(dataclasses.asdict(params), indent=1, sort_keys=True)
