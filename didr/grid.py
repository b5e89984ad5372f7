"""The ablation grid of params.yaml as align runs with readable ids: method=didr/beta=0.03/seed=0.

One run id names one align output folder everywhere (Snakemake rules, DVC stages, the submitit launcher, the
report), so this module is the only place that turns a grid into runs and a run id back into `didr align` options.
Each method's strength axis (beta, alpha, weight, or none) is read from its entry of didr/methods.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from didr.methods import METHODS, get_method


def format_value(value: float | int | str) -> str:
    """A grid value as it appears in a run id (and on the command line): 0.03, 10, tweedie."""
    return format(value, "g") if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Run:
    """One align run: a method, its strength, the align settings it overrides, and its seed."""

    method: str
    strength: float
    seed: int
    overrides: tuple[tuple[str, float | int | str], ...] = ()

    def __post_init__(self) -> None:
        get_method(self.method)

    @property
    def axes(self) -> list[tuple[str, float | int | str]]:
        """(axis, value) pairs in id order: the strength axis first, then the overrides."""
        axis = METHODS[self.method].axis
        return ([(axis, self.strength)] if axis else []) + list(self.overrides)

    @property
    def setting(self) -> str:
        """The run id without the method: beta=0.03/seed=0."""
        return "/".join([*(f"{k}={format_value(v)}" for k, v in self.axes), f"seed={self.seed}"])

    @property
    def id(self) -> str:
        return f"method={self.method}/{self.setting}"

    def align_options(self) -> list[str]:
        """The `didr align` options that run it."""
        sets = [f"--set=align.{k}={format_value(v)}" for k, v in self.overrides]
        return ["--method", self.method, "--strength", format_value(self.strength), "--seed", str(self.seed), *sets]


def method_entries(methods: dict) -> list[tuple[str, str, dict]]:
    """(method, its params key, axes) for every entry of `grid.methods`: one per method, or one per item of a list."""
    entries = []
    for method, axes in methods.items():
        if isinstance(axes, list):
            entries += [(method, f"grid.methods.{method}[{i}]", item) for i, item in enumerate(axes)]
        else:
            entries.append((method, f"grid.methods.{method}", axes))
    return entries


def expand_grid(grid: dict) -> list[Run]:
    """Every run of a validated `grid` section: per method entry, the product of its axes, times every seed;
    ValueError names an entry that repeats a run of an earlier one."""
    runs: dict[str, Run] = {}
    for method, key, axes in method_entries(grid["methods"]):
        strength_axis = METHODS[method].axis
        names = [strength_axis] if strength_axis else []
        names += [name for name in axes if name != strength_axis]
        for values in itertools.product(*(axes[name] for name in names)):
            chosen = dict(zip(names, values, strict=True))
            strength = float(chosen.pop(strength_axis)) if strength_axis else 0.0
            for seed in grid["seeds"]:
                run = Run(method, strength, seed, tuple(chosen.items()))
                if run.id in runs:
                    raise ValueError(f"{key}: run {run.id} is already in an earlier entry")
                runs[run.id] = run
    return list(runs.values())


def parse_run_id(run_id: str) -> Run:
    """The Run a run id names (the inverse of Run.id); ValueError names a malformed id."""
    parts = run_id.split("/")
    try:
        pairs = [part.split("=", 1) for part in parts]
        fields = {k: v for k, v in pairs}
        method = fields.pop("method")
        seed = int(fields.pop("seed"))
    except (ValueError, KeyError):
        raise ValueError(f"run id {run_id!r}: expected method=<m>/<axis>=<value>/.../seed=<s>") from None
    if method not in METHODS:
        raise ValueError(f"run id {run_id!r}: unknown method {method!r}; choose one of {sorted(METHODS)}")
    axis = METHODS[method].axis
    strength = float(fields.pop(axis)) if axis in fields else 0.0
    return Run(method, strength, seed, tuple((k, parse_value(v)) for k, v in fields.items()))


def parse_value(text: str) -> float | int | str:
    """A value of a run id or a --set option: an int, else a float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def front_point(method: str, setting: str) -> tuple[str, str, int]:
    """A grid run's front, its strength on that front and its seed, from the method and the run setting its
    params.json records: the align settings a grid entry overrides name a variant of the method with a front of its
    own ('didr drs=k-step,drs_steps=2'), the strength axis is the front's parameter ('beta=0.001'). ValueError for a
    set that is no grid run's (the teacher, a warm start)."""
    run = parse_run_id(f"method={method}/{setting}")
    variant = ",".join(f"{key}={format_value(value)}" for key, value in run.overrides)
    strength = "/".join(f"{key}={format_value(value)}" for key, value in run.axes[: len(run.axes) - len(run.overrides)])
    return (f"{method} {variant}" if variant else method), strength, run.seed
