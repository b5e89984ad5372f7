"""The alignment methods, each described once: its name, objective, strength axis, schema entry and help text.

Everything that names a method reads `METHODS`: the align stage builds the objective with `build_objective`, the
grid (didr/grid.py) reads the strength axis, the `didr align` command its names and help, and
tests/test_methods.py checks that the `grid.methods` entries of workflow/schemas/params.schema.yaml are the ones
`grid_methods_schema()` gives (Snakemake validates with the YAML file, so the schema is a file, not generated).
Adding a method is its objective module plus one `Method` here.

This module imports no torch: Snakemake and the launcher read the grid through it; an objective's class is imported
when it is first built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from didr.backbones.base import Denoiser
    from didr.config import AlignParams, PolicyParams
    from didr.objectives.common import TimeSampler
    from didr.objectives.didr import Damping
    from didr.rewards.base import Reward


@dataclass(frozen=True)
class Strength:
    """A method's strength: the grid axis (and run-id key) it is swept on, the objective's keyword argument it
    fills, what it means, and its bound (> 0 when `positive`, else >= 0)."""

    axis: str
    argument: str
    description: str
    positive: bool = False

    def schema(self) -> dict[str, Any]:
        """The grid axis's JSON schema: a non-empty list of numbers within the bound."""
        bound = {"exclusiveMinimum": 0} if self.positive else {"minimum": 0}
        return {"description": self.description, "type": "array", "minItems": 1, "items": {"type": "number", **bound}}


@dataclass(frozen=True)
class ObjectiveInputs:
    """What a method's objective is built from: the frozen teacher, the fake score, the training reward, the align
    settings and whether to recompute activations in the backward pass (params.finetune.gradient_checkpointing)."""

    teacher: Denoiser
    fake: Denoiser
    reward: Reward
    align: AlignParams
    checkpoint: bool = False

    @property
    def times(self) -> TimeSampler:
        """The noise times the integral KL samples on [align.t_min, align.t_max_sampling]: align.time_sampling."""
        from didr.diffusion import time_sampler

        return time_sampler(self.align.time_sampling, t_min=self.align.t_min, t_max=self.align.t_max_sampling)

    def drs_damping(self) -> Damping | None:
        """DIDR's gamma(t) from align.drs_gamma (§5.5), or None for no damping."""
        from didr.objectives.didr import signal_damping

        return signal_damping(self.teacher.schedule, self.align.drs_gamma) if self.align.drs_gamma else None

    def matching(self) -> dict[str, Any]:
        """The keyword arguments of a distribution-matching objective: teacher, fake score, times, teacher CFG."""
        return {
            "teacher": self.teacher,
            "fake": self.fake,
            "time_sampling": self.times,
            "teacher_guidance": self.align.teacher_guidance,
        }


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy method (loop "policy") is built from: align.policy, the number of training prompts and the
    generator's stochastic transitions (K - 1)."""

    policy: PolicyParams
    prompts: int
    transitions: int

    def settings(self, *keys: str) -> dict[str, Any]:
        """The align.policy settings `keys`, as keyword arguments of the same names."""
        return {key: getattr(self.policy, key) for key in keys}


@dataclass(frozen=True)
class FewStepInputs(ObjectiveInputs):
    """What an AC-DMD / RTDMD method (loop "rtdmd") is built from: the align inputs plus the few-step generator's
    transition eta, at which AC-DMD steps back with the CPS transition (docs/algorithm.md §8.7)."""

    eta: float = 0.9

    def acdmd(self) -> Any:
        """AC-DMD (§8.2) against the teacher with align.rtdmd.consistency_weight."""
        from didr.objectives.acdmd import ACDMD

        return ACDMD(**self.matching(), eta=self.eta, consistency_weight=self.align.rtdmd.consistency_weight)

    def grpo(self) -> Any:
        """SubGRPO (§8.3) with align.policy's group_size, clip_range, adv_clip, train_steps and step_range."""
        from didr.objectives.grpo import GRPO

        keys = ("group_size", "clip_range", "adv_clip", "train_steps", "step_range")
        return GRPO(**{key: getattr(self.align.policy, key) for key in keys})


LOOPS = ("align", "policy", "rtdmd")


@dataclass(frozen=True)
class Method:
    """One alignment method. `objective` is "module:Class"; `settings` maps the inputs (ObjectiveInputs for loop
    "align", didr.training.loop.align; PolicyInputs for loop "policy", didr.training.rl.train_policy; FewStepInputs
    for loop "rtdmd", didr.training.rtdmd.train_rtdmd) to the class's
    keyword arguments (the strength aside: `build_objective` passes it as `strength.argument`); `strength` is None
    for a method without one (its runs have no strength axis)."""

    name: str
    objective: str
    help: str
    settings: Callable[[Any], dict[str, Any]]
    strength: Strength | None = None
    loop: str = "align"

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"loop: unknown value {self.loop!r} of method {self.name}; choose one of {list(LOOPS)}")

    @property
    def axis(self) -> str | None:
        """The strength's grid axis, or None."""
        return None if self.strength is None else self.strength.axis

    def objective_class(self) -> type:
        module, _, name = self.objective.partition(":")
        return getattr(importlib.import_module(module), name)

    def schema(self) -> dict[str, Any]:
        """This method's entry of the schema's grid.methods: the align axes, plus its strength axis (required), or a
        list of such entries."""
        entry: dict[str, Any] = {"$ref": "#/$defs/align_axes"}
        if self.strength is not None:
            entry |= {"properties": {self.strength.axis: self.strength.schema()}, "required": [self.strength.axis]}
        entry |= {"unevaluatedProperties": False}
        return {"oneOf": [entry, {"type": "array", "minItems": 1, "items": entry}]}


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            name="didr",
            objective="didr.objectives.didr:DIDR",
            help="integral KL to the reward-tilted teacher p_ref exp(r / beta) (Diff-Instruct with Diffused Reward)",
            settings=lambda i: {
                **i.matching(),
                "reward": i.reward,
                "drs": i.align.drs,
                "drs_steps": i.align.drs_steps,
                "t_max": i.align.drs_t_max,
                "gamma": i.drs_damping(),
                "checkpoint": i.checkpoint,
            },
            strength=Strength("beta", "beta", "temperature of the tilt (smaller is stronger)", positive=True),
        ),
        Method(
            name="dipp",
            objective="didr.objectives.di:DIPlusPlus",
            help="integral KL to the guided teacher minus alpha times the reward (Diff-Instruct++)",
            settings=lambda i: {**i.matching(), "reward": i.reward},
            strength=Strength("alpha", "alpha_rew", "reward weight alpha_rew"),
        ),
        Method(
            name="dmd2",
            objective="didr.objectives.dmd2:DMD2",
            help="DMD2's distribution matching minus weight times the reward",
            settings=lambda i: {**i.matching(), "reward": i.reward},
            strength=Strength("weight", "reward_weight", "reward weight (0 is reward-free DMD2)"),
        ),
        Method(
            name="di",
            objective="didr.objectives.di:DI",
            help="integral KL to the guided teacher, no reward (Diff-Instruct)",
            settings=ObjectiveInputs.matching,
        ),
        Method(
            name="reward_only",
            objective="didr.objectives.reward_only:RewardOnly",
            help="the reward alone, no distribution term (the reward-hacking reference)",
            settings=lambda i: {"teacher": i.teacher, "reward": i.reward},
        ),
        Method(
            name="sdpo",
            objective="didr.objectives.sdpo:SDPO",
            help="dense reward difference learning over the few-step generator's stochastic transitions (SDPO)",
            settings=lambda i: {
                "prompts": i.prompts,
                "transitions": i.transitions,
                **i.settings("gamma", "clip_range", "adv_clip", "buffer_size", "min_count"),
            },
            loop="policy",
        ),
        Method(
            name="grpo",
            objective="didr.objectives.grpo:GRPO",
            help="group-relative policy optimisation of the final reward (Flow-GRPO; SubGRPO with train_steps)",
            settings=lambda i: i.settings("group_size", "clip_range", "adv_clip", "train_steps", "step_range"),
            loop="policy",
        ),
        Method(
            name="acdmd",
            objective="didr.objectives.rtdmd:RTDMD",
            help="AC-DMD: distribution matching at the few-step generator's intermediate states (RTDMD stage 1)",
            settings=lambda i: {"acdmd": i.acdmd()},
            loop="rtdmd",
        ),
        Method(
            name="rtdmd",
            objective="didr.objectives.rtdmd:RTDMD",
            help="RTDMD: align.rtdmd.acdmd_steps of AC-DMD, then SubGRPO plus the last-step reward hinge and AC-DMD",
            settings=lambda i: {
                "acdmd": i.acdmd(),
                "grpo": i.grpo(),
                "reward": i.reward,
                "reward_margin": i.align.rtdmd.reward_margin,
                "acdmd_weight": i.align.rtdmd.acdmd_weight,
                "acdmd_steps": i.align.rtdmd.acdmd_steps,
            },
            strength=Strength("weight", "reward_weight", "weight of the last-step reward hinge ReLU(margin - r)"),
            loop="rtdmd",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method `name`; ValueError naming the known ones otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def build_objective(
    method: str, strength: float, teacher: Denoiser, fake: Denoiser, reward: Reward, align: AlignParams,
    checkpoint: bool = False,
):  # fmt: skip
    """The objective of `method` at `strength` (beta for didr, alpha_rew for dipp, the reward weight for dmd2;
    ignored by a method without a strength), with the align settings it reads. `checkpoint` recomputes the proxy's
    decoder and reward in the backward pass (didr)."""
    m = get_method(method)
    if m.loop != "align":
        raise ValueError(f"method: {method} trains with the {m.loop} loop, not the align loop")
    kwargs = m.settings(ObjectiveInputs(teacher, fake, reward, align, checkpoint))
    if m.strength is not None:
        kwargs[m.strength.argument] = strength
    return m.objective_class()(**kwargs)


def build_policy_method(method: str, policy: PolicyParams, prompts: int, transitions: int):
    """The policy-gradient method `method` (loop "policy") with align.policy's settings, for `prompts` training
    prompts and a generator with `transitions` stochastic transitions."""
    m = get_method(method)
    if m.loop != "policy":
        raise ValueError(f"method: {method} trains with the align loop; build it with build_objective")
    return m.objective_class()(**m.settings(PolicyInputs(policy, prompts, transitions)))


def build_rtdmd_method(
    method: str, strength: float, teacher: Denoiser, fake: Denoiser, reward: Reward, align: AlignParams, eta: float
):  # fmt: skip
    """The AC-DMD / RTDMD method `method` (loop "rtdmd") at `strength` (rtdmd's reward weight), for a generator
    whose CPS transitions run at `eta`."""
    m = get_method(method)
    if m.loop != "rtdmd":
        raise ValueError(f"method: {method} trains with the {m.loop} loop, not the rtdmd loop")
    kwargs = m.settings(FewStepInputs(teacher, fake, reward, align, eta=eta))
    if m.strength is not None:
        kwargs[m.strength.argument] = strength
    return m.objective_class()(**kwargs)


def rtdmd_methods() -> list[str]:
    """The methods trained by the AC-DMD / RTDMD loop (didr/training/rtdmd.py)."""
    return [name for name, m in METHODS.items() if m.loop == "rtdmd"]


def policy_methods() -> list[str]:
    """The methods trained by the on-policy loop (didr/training/rl.py)."""
    return [name for name, m in METHODS.items() if m.loop == "policy"]


def grid_methods_schema() -> dict[str, Any]:
    """The schema's grid.methods.properties: one entry per method."""
    return {name: method.schema() for name, method in METHODS.items()}


def strength_axes() -> str:
    """The strength axes in words, as the schema and the command line describe them: beta (didr), alpha (dipp) or
    weight (dmd2)."""
    named = [f"{m.strength.axis} ({m.name})" for m in METHODS.values() if m.strength is not None]
    return ", ".join(named[:-1]) + f" or {named[-1]}" if len(named) > 1 else "".join(named)
