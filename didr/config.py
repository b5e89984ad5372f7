"""The typed, strict view of params.yaml: unknown keys and bad values are errors naming the key and the file.

The checks are those of workflow/schemas/params.schema.yaml, the schema Snakemake's `validate` uses too."""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_type_hints

import jsonschema
import yaml

SCHEMA = Path(__file__).with_name("params.schema.yaml")  # a link to workflow/schemas/params.schema.yaml


class ConfigError(ValueError):
    """A bad params file: the message names the file and the key."""


@dataclass
class TeacherParams:
    """Teacher caching: for the toy world (vp, flow) train the teacher and the toy rewards from scratch; for a
    pretrained pipeline, resolve `source` at the pinned `revision` into the local cache. Both cache the prompts'
    embeddings."""

    kind: str = "vp"
    source: str | None = None
    revision: str | None = None
    precision: str = "fp32"
    size: int = 16
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    n_images: int = 8192
    reward_seed: int = 0
    reward_alignment_steps: int = 1200
    reward_preference_steps: int = 800


@dataclass
class FinetuneParams:
    """How the generator and the fake score train: full fine-tuning (lora_rank 0) or LoRA, with or without
    gradient checkpointing."""

    lora_rank: int = 0
    gradient_checkpointing: bool = False


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
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class GeneratorParams:
    """The generator's sampler (docs/algorithm.md §8.1): steps K = 1 is the one-step generator at warmup.t_star;
    K > 1 a FewStepGenerator with K network evaluations at `times` (default 1 - k / K), whose stochastic transitions
    ('ddim', 'cps' or flow 'sde' at `eta`) the policy methods train; its deterministic forward trains under align."""

    steps: int = 1
    sampler: str = "ddim"
    eta: float = 1.0
    times: list[float] | None = None


@dataclass
class WarmupParams:
    """Fake-score warm-up on the un-aligned generator's samples."""

    t_star: float = 0.9
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    generator_weights: dict[str, str] | None = None
    generator: GeneratorParams = field(default_factory=GeneratorParams)


@dataclass
class PolicyParams:
    """The policy methods' settings (sdpo, grpo; docs/algorithm.md §8.3-8.5): per epoch (align.steps epochs at
    align.lr) `groups` prompts of `group_size` samples (SDPO: pairs), `inner_epochs` passes in minibatches of
    `groups_per_update` groups. SubGRPO trains `train_steps` of the first `step_range` transitions per epoch."""

    groups: int = 4
    group_size: int = 16
    groups_per_update: int | None = None
    inner_epochs: int = 1
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    gamma: float = 0.99
    buffer_size: int = 32
    min_count: int = 16
    train_steps: int | None = None
    step_range: int | None = None


@dataclass
class RTDMDParams:
    """acdmd / rtdmd (docs/algorithm.md §8.7): rtdmd runs `acdmd_steps` steps of AC-DMD, then SubGRPO (align.policy)
    plus acdmd_weight AC-DMD + weight ReLU(reward_margin - r) at the last step, at `stage_two_lr` (default align.lr);
    the fake's consistency weight."""

    acdmd_steps: int = 0
    stage_two_lr: float | None = None
    reward_margin: float = 3.0
    acdmd_weight: float = 1e-3
    consistency_weight: float = 0.01


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
    drs: str = "tweedie"  # the DRS proxy: tweedie, k-step, hybrid or curvature (docs/algorithm.md §5.4, §5.5)
    drs_steps: int = 1  # K of k-step / hybrid; the curvature proxy's GMRES iterations
    drs_t_max: float = 0.5
    drs_gamma: float = 0.0  # gamma(t) = (a^2 / (a^2 + s^2))^drs_gamma damps the DRS (docs/algorithm.md §5.5); 0: none
    time_sampling: str = "uniform"  # the integral KL's noise times on [t_min, t_max_sampling]: uniform or logit_normal
    checkpoint_every: int = 100
    evaluate_at: list[int] = field(default_factory=list)  # steps whose EMA generator is sampled and scored too
    policy: PolicyParams = field(default_factory=PolicyParams)
    rtdmd: RTDMDParams = field(default_factory=RTDMDParams)


@dataclass
class SampleParams:
    """Evaluation images: per prompt, from each one-step generator and from the teacher with N steps and CFG."""

    per_prompt: int = 2
    teacher_steps: int = 25
    teacher_guidance: float = 3.0
    seed: int = 1234


@dataclass
class ScoreParams:
    """Fidelity features: the toy classifier's (against rendered real images) or FID Inception's (against a
    reference file of real images' features)."""

    features: str = "toy_alignment"
    inception: str | None = None
    reference: str | None = None


@dataclass
class ExportParams:
    """`didr export`: the aligned LoRA merged into the network, or kept as adapters for `load_lora_weights`."""

    lora: str = "merge"


def default_grid() -> dict:
    return {"seeds": [0], "methods": {"didr": {"beta": [0.03]}}}


@dataclass
class Params:
    """Everything an experiment needs, as in params.yaml."""

    experiment: str = "embedded"
    seed: int = 0
    teacher: TeacherParams = field(default_factory=TeacherParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    prompts: PromptParams = field(default_factory=PromptParams)
    rewards: RewardParams = field(default_factory=RewardParams)
    warmup: WarmupParams = field(default_factory=WarmupParams)
    align: AlignParams = field(default_factory=AlignParams)
    sample: SampleParams = field(default_factory=SampleParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    export: ExportParams = field(default_factory=ExportParams)
    grid: dict = field(default_factory=default_grid)


def _build(cls: type, data: dict[str, Any]) -> Any:
    """The dataclass view of a schema-checked mapping (missing keys take the dataclass defaults)."""
    hints = get_type_hints(cls)
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = _build(cast(type, hint), value)  # a dataclass field's hint: the class, not an instance
        elif hint is float:
            value = float(value)
        values[key] = value
    return cls(**values)


def _key(path: Any) -> str:
    """A JSON path as a params key: grid.methods.didr.beta[1]."""
    key = ""
    for part in path:
        key += f"[{part}]" if isinstance(part, int) else f"{'.' if key else ''}{part}"
    return key


def schema_error(data: dict[str, Any]) -> str | None:
    """The most relevant schema violation of `data` as 'key: what is wrong', or None when it is valid."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is None:
        return None
    while error.validator == "oneOf" and error.context:  # a grid entry or a list of them: the branch of its type
        error = jsonschema.exceptions.best_match([e for e in error.context if e.validator != "type"] or error.context)
    key = _key(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        unexpected = re.findall(r"'([^']+)'", error.message.split("(")[-1])
        known = sorted(error.schema.get("properties", {}))
        return f"{key}{'.' if key else ''}{unexpected[0]}: unknown key (known: {', '.join(known)})"
    if error.validator == "required":
        missing = re.findall(r"'([^']+)'", error.message)[0]
        return f"{key}{'.' if key else ''}{missing}: missing"
    if error.validator == "minItems" and error.schema["minItems"] == 1:
        return f"{key}: no values"
    return f"{key or 'top level'}: {error.message}"


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` settings (as `didr <stage> --set` takes them) applied to a copy of the raw params."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        *sections, name = key.split(".")
        target = data
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {section} is not a section")
        value = yaml.safe_load(text)
        target[name] = float(value) if isinstance(value, str) and _is_float(value) else value
    return data


def _is_float(text: str) -> bool:
    """True for the numbers YAML 1.1 reads as strings, such as 1e-05."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _used_rewards(rewards: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, registry name) of the training reward and every evaluation reward."""
    names = [("rewards.train", rewards.get("train", RewardParams.train))]
    return names + [(f"rewards.eval[{i}]", name) for i, name in enumerate(rewards.get("eval", RewardParams().eval))]


def _unknown_reward(rewards: dict[str, Any]) -> str | None:
    from didr.plugins import load_plugins
    from didr.rewards.registry import known_rewards

    load_plugins()  # a world's own rewards (the toy ones) register themselves
    known, used = known_rewards(), _used_rewards(rewards)
    for key, name in used:
        if name not in known:
            return f"{key}: unknown reward {name!r} (registered: {', '.join(known)})"
    for name in rewards.get("models", {}):
        if name not in {used_name for _, used_name in used}:
            return f"rewards.models.{name}: not a reward of rewards.train or rewards.eval"
    return None


def _world_mismatch(data: dict[str, Any]) -> str | None:
    """Toy rewards and toy features exist only in the embedded world; a pretrained source must be a folder with a
    model_index.json or a hub id pinned to a commit."""
    from didr.backbones.hub import HUB_ID

    teacher = data.get("teacher", {})
    if teacher.get("kind", TeacherParams.kind) != "pretrained":
        return None
    for key, name in _used_rewards(data.get("rewards", {})):
        if name.startswith("toy_"):
            return f"{key}: {name} exists only in the embedded world (teacher.kind vp or flow), not for pretrained"
    if data.get("score", {}).get("features", ScoreParams.features) == "toy_alignment":
        return "score.features: toy_alignment exists only in the embedded world; use inception for a pretrained teacher"
    source = teacher["source"]
    if Path(source).exists():
        if not (Path(source) / "model_index.json").is_file():
            return f"teacher.source: {source} has no model_index.json (not a diffusers pipeline folder)"
        return None
    if not HUB_ID.match(source):
        return f"teacher.source: {source} is neither a local folder nor a hub id (owner/name)"
    if "revision" not in teacher:
        return f"teacher.revision: missing (the hub model {source} must be pinned to a commit)"
    return None


def _generator_problem(data: dict[str, Any]) -> str | None:
    """warmup.generator's times against its steps, the 'sde' sampler on a VP teacher, and the policy methods' needs
    (stochastic transitions; SubGRPO's train_steps <= step_range <= K - 1; min_count <= buffer_size)."""
    from didr.methods import policy_methods, rtdmd_methods

    g = {**dataclasses.asdict(GeneratorParams()), **data.get("warmup", {}).get("generator", {})}
    key = "warmup.generator"
    times = g["times"]
    if times is not None:
        if len(times) != g["steps"]:
            return f"{key}.times: holds {len(times)} values, {key}.steps is {g['steps']}"
        if any(b >= a for a, b in itertools.pairwise(times)):
            return f"{key}.times: must decrease strictly, got {times}"
    if g["sampler"] == "sde" and data.get("teacher", {}).get("kind", TeacherParams.kind) == "vp":
        return f"{key}.sampler: 'sde' (Flow-GRPO) needs a flow teacher, teacher.kind is vp"
    policy = {**dataclasses.asdict(PolicyParams()), **data.get("align", {}).get("policy", {})}
    if policy["min_count"] > policy["buffer_size"]:
        return "align.policy.min_count: must not exceed align.policy.buffer_size"
    if policy["groups_per_update"] is not None and policy["groups_per_update"] > policy["groups"]:
        return "align.policy.groups_per_update: must not exceed align.policy.groups"
    for method in data.get("grid", {}).get("methods", {}):
        if method in rtdmd_methods():
            problem = _rtdmd_problem(method, data, g, policy)
            if problem:
                return problem
        if method not in policy_methods():
            continue
        if g["steps"] < 2:
            return f"{key}.steps: {method} trains stochastic transitions and needs steps >= 2, got {g['steps']}"
        if g["eta"] == 0:
            return f"{key}.eta: {method} needs a stochastic sampler (eta > 0), got 0"
        if method == "grpo" and policy["train_steps"] is not None:
            limit = policy["step_range"] or g["steps"] - 1
            if not policy["train_steps"] <= limit <= g["steps"] - 1:
                return (
                    f"align.policy.train_steps: need train_steps <= step_range <= {g['steps'] - 1} transitions, got "
                    f"{policy['train_steps']}, {policy['step_range']}"
                )
    return None


def _rtdmd_problem(method: str, data: dict[str, Any], g: dict[str, Any], policy: dict[str, Any]) -> str | None:
    """acdmd / rtdmd: a flow teacher, a few-step 'cps' sampler; rtdmd: stochastic transitions, SubGRPO's train_steps <=
    step_range <= K - 1, and a stage 2 (align.rtdmd.acdmd_steps < align.steps)."""
    key = "warmup.generator"
    if data.get("teacher", {}).get("kind", TeacherParams.kind) == "vp":
        return f"teacher.kind: {method} (AC-DMD) needs a flow teacher, got vp"
    if g["steps"] < 2:
        return f"{key}.steps: {method} trains a few-step generator and needs steps >= 2, got {g['steps']}"
    if g["sampler"] != "cps":
        return f"{key}.sampler: {method} steps back with the 'cps' transition, got {g['sampler']!r}"
    if method != "rtdmd":
        return None
    if g["eta"] == 0:
        return f"{key}.eta: rtdmd needs a stochastic sampler (eta > 0), got 0"
    transitions = g["steps"] - 1
    chosen, limit = policy["train_steps"] or transitions, policy["step_range"] or transitions
    if not chosen <= limit <= transitions:
        return (
            f"align.policy.train_steps: need train_steps <= step_range <= {transitions} transitions, got "
            f"{policy['train_steps']}, {policy['step_range']}"
        )
    align = data.get("align", {})
    acdmd_steps = align.get("rtdmd", {}).get("acdmd_steps", RTDMDParams.acdmd_steps)
    steps = align.get("steps", AlignParams.steps)
    if acdmd_steps >= steps:
        return f"align.rtdmd.acdmd_steps: {acdmd_steps} leaves rtdmd no stage-2 step (align.steps is {steps})"
    return None


def _evaluate_at_problem(data: dict[str, Any]) -> str | None:
    """align.evaluate_at: increasing steps below every run's align.steps (a grid's steps axis included), for methods
    of the alignment loop only (the policy and RTDMD loops write no snapshots)."""
    from didr.grid import method_entries
    from didr.methods import METHODS

    steps = data.get("align", {}).get("evaluate_at", [])
    if not steps:
        return None
    if any(b <= a for a, b in itertools.pairwise(steps)):
        return f"align.evaluate_at: must increase strictly, got {steps}"
    methods = data.get("grid", {}).get("methods", {})
    run_steps = [data.get("align", {}).get("steps", AlignParams.steps)]
    run_steps += [value for _, _, axes in method_entries(methods) for value in axes.get("steps", [])]
    if steps[-1] >= min(run_steps):
        return f"align.evaluate_at: {steps[-1]} is not below align.steps ({min(run_steps)}; the final set is that step)"
    for method in methods:
        if METHODS[method].loop != "align":
            return f"align.evaluate_at: {method} trains in the {METHODS[method].loop} loop, which writes no snapshots"
    return None


def _grid_problem(data: dict[str, Any]) -> str | None:
    """Two entries of a method's list naming the same run."""
    from didr.grid import expand_grid

    if "grid" not in data:
        return None
    try:
        expand_grid(data["grid"])
    except ValueError as error:
        return str(error)
    return None


def load_params(path: str | Path, overrides: Sequence[str] = ()) -> Params:
    """Read and check a params file (YAML) against workflow/schemas/params.schema.yaml, after `overrides`;
    ConfigError names the file and the offending key in one line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid UTF-8 YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, list(overrides))
    problem = schema_error(data)
    if problem is None:
        a = {**dataclasses.asdict(AlignParams()), **data.get("align", {})}
        if not a["t_min"] < a["t_max_sampling"]:
            problem = "align.t_min: must be below align.t_max_sampling"
        problem = problem or _generator_problem(data) or _evaluate_at_problem(data) or _grid_problem(data)
        problem = problem or _unknown_reward(data.get("rewards", {})) or _world_mismatch(data)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    return _build(Params, data)


def params_json(params: Params) -> str:
    """The params as JSON, saved next to every output."""
    return json.dumps(dataclasses.asdict(params), indent=1, sort_keys=True)
