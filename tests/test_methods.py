"""The method registry (didr/methods.py) is the one place that names a method: the grid, the schema, the command
line and the align stage's factory all read it, so a new method is its objective plus one registry entry."""

import inspect
import subprocess
import sys

import pytest
import torch
import yaml

from didr.backbones.gaussian import GaussianDenoiser
from didr.cli import build_parser
from didr.config import SCHEMA, AlignParams, PolicyParams
from didr.diffusion import FlowSchedule, LogitNormalTime, VPSchedule, cosine_vp_config
from didr.grid import Run, expand_grid, parse_run_id
from didr.methods import (
    METHODS,
    Method,
    ObjectiveInputs,
    Strength,
    build_objective,
    build_policy_method,
    grid_methods_schema,
    policy_methods,
    strength_axes,
)
from didr.objectives import DI, DIDR, DMD2, DIPlusPlus, RewardOnly
from didr.objectives.didr import signal_damping
from didr.objectives.grpo import GRPO
from didr.objectives.sdpo import SDPO
from didr.rewards.analytic import QuadraticReward

SCHEDULE = VPSchedule.from_scheduler_config(cosine_vp_config())
REWARD = QuadraticReward(torch.tensor([1.0, 1.0]), torch.tensor([[2.0, 0.3], [0.3, 0.5]]))
# per method: its objective class and where the built objective keeps the strength (None: it has none)
EXPECTED = {
    "didr": (DIDR, lambda o: o.estimator.beta),
    "dipp": (DIPlusPlus, lambda o: o.alpha_rew),
    "dmd2": (DMD2, lambda o: o.reward_weight),
    "di": (DI, None),
    "reward_only": (RewardOnly, None),
}
POLICY = {"sdpo": SDPO, "grpo": GRPO}  # the on-policy loop's methods (didr/training/rl.py), no strength axis
RTDMD_LOOP = ("acdmd", "rtdmd")  # the AC-DMD / RTDMD loop's methods (didr/training/rtdmd.py; tests/test_rtdmd.py)


def models():
    teacher = GaussianDenoiser(torch.tensor([0.5, -0.3]), torch.tensor([[1.0, 0.6], [0.6, 0.52]]), SCHEDULE).frozen()
    return teacher, teacher.trainable_copy()


def align_action(option):
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return next(a for a in commands.choices["align"]._actions if option in a.option_strings)


def test_the_schema_grid_and_command_line_name_the_registry_methods():
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))["properties"]["grid"]
    assert schema["properties"]["methods"]["properties"] == grid_methods_schema()  # names, axes, bounds, help
    assert f"The strength axis is {strength_axes()};" in " ".join(schema["description"].split())
    assert align_action("--method").metavar == "{" + ",".join(METHODS) + "}"
    assert all(f"{name}: {m.help}" in align_action("--method").help for name, m in METHODS.items())
    assert strength_axes() in align_action("--strength").help
    assert set(EXPECTED) | set(POLICY) | set(RTDMD_LOOP) == set(METHODS) and policy_methods() == list(POLICY)


def test_the_grid_reads_each_methods_strength_axis():
    grid = {"seeds": [0], "methods": {name: ({m.axis: [0.5]} if m.axis else {}) for name, m in METHODS.items()}}
    runs = expand_grid(grid)
    assert [run.method for run in runs] == list(METHODS)
    for run in runs:
        axis = METHODS[run.method].axis
        assert run.axes == ([(axis, 0.5)] if axis else [])
        assert run.strength == (0.5 if axis else 0.0)
        assert parse_run_id(run.id) == run
    with pytest.raises(ValueError, match="unknown method 'didrr'"):
        Run("didrr", 1.0, 0)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_factory_builds_each_methods_class_with_its_strength(name):
    cls, strength_of = EXPECTED[name]
    teacher, fake = models()
    a = AlignParams(teacher_guidance=2.5, t_min=0.05, t_max_sampling=0.9, drs="k-step", drs_steps=3, drs_t_max=0.7)
    objective = build_objective(name, 0.25, teacher, fake, REWARD, a, checkpoint=True)
    assert type(objective) is cls and METHODS[name].objective_class() is cls
    assert (strength_of is None) == (METHODS[name].strength is None)
    if strength_of is not None:
        assert strength_of(objective) == 0.25
        assert METHODS[name].strength.argument in inspect.signature(cls).parameters
    if name != "reward_only":  # the distribution-matching settings come from the align section
        assert (objective.time_sampling.t_min, objective.time_sampling.t_max) == (0.05, 0.9)
        guidance = objective.estimator.guidance if name == "didr" else objective.teacher_guidance
        assert guidance == 2.5 and objective.fake is fake
    if name == "didr":
        assert objective.t_max == 0.7 and objective.estimator.mode == "k-step" and objective.estimator.steps == 3
        assert objective.estimator.checkpoint


def test_align_settings_give_didrs_damping_and_every_matching_methods_times():
    """align.drs_gamma = 2 damps the DRS by abar(t)^2 on VP (a^2 + s^2 = 1); align.time_sampling reaches the matching
    term of every method, within [t_min, t_max_sampling]."""
    teacher, fake = models()
    a = AlignParams(drs_gamma=2.0, time_sampling="logit_normal", t_min=0.05, t_max_sampling=0.9)
    didr = build_objective("didr", 0.1, teacher, fake, REWARD, a)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(didr.gamma(t), SCHEDULE.abar(t) ** 2, rtol=1e-12, atol=0)
    assert build_objective("didr", 0.1, teacher, fake, REWARD, AlignParams()).gamma is None  # drs_gamma 0: none
    for name in ("didr", "dipp", "dmd2", "di"):
        times = build_objective(name, 0.1, teacher, fake, REWARD, a).time_sampling
        assert type(times) is LogitNormalTime and (times.t_min, times.t_max) == (0.05, 0.9)
    drawn = times(4096, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0.05 and drawn.max() <= 0.9 and abs(drawn.median().item() - 0.5) < 0.03  # sigmoid(N(0, 1))


def test_the_damping_on_a_flow_schedule_is_the_signals_share():
    """Rectified flow, a = 1 - t, s = t: at t = 0.75, a^2 / (a^2 + s^2) = 0.0625 / 0.625 = 0.1."""
    gamma = signal_damping(FlowSchedule(), 1.0)
    torch.testing.assert_close(gamma(torch.tensor([0.0, 0.5, 0.75])), torch.tensor([1.0, 0.5, 0.1]))
    torch.testing.assert_close(signal_damping(FlowSchedule(), 0.5)(torch.tensor([0.75])), torch.tensor([0.1**0.5]))


def test_a_new_method_is_one_registry_entry(monkeypatch):
    """A hinge-reward DMD2 registered at run time: the grid, the run ids, the command line and the factory take it."""
    method = Method(
        name="rtdmd",
        objective="didr.objectives.dmd2:DMD2",
        help="DMD2 with a hinged reward",
        settings=lambda i: {**i.matching(), "reward": i.reward, "reward_hinge": 0.0},
        strength=Strength("weight", "reward_weight", "reward weight"),
    )
    monkeypatch.setitem(METHODS, "rtdmd", method)
    (run,) = expand_grid({"seeds": [1], "methods": {"rtdmd": {"weight": [2.0], "lr": [0.1]}}})
    assert run.id == "method=rtdmd/weight=2/lr=0.1/seed=1" and parse_run_id(run.id) == run
    assert "rtdmd" in align_action("--method").metavar
    teacher, fake = models()
    objective = build_objective("rtdmd", 2.0, teacher, fake, REWARD, AlignParams())
    assert isinstance(objective, DMD2) and objective.reward_weight == 2.0 and objective.reward_hinge == 0.0


def test_the_policy_factory_builds_sdpo_and_grpo_from_align_policy():
    policy = PolicyParams(group_size=6, clip_range=2e-5, adv_clip=3.0, gamma=0.9, buffer_size=8, min_count=4,
                          train_steps=1, step_range=2)  # fmt: skip
    sdpo = build_policy_method("sdpo", policy, prompts=5, transitions=3)
    assert type(sdpo) is SDPO and sdpo.group_size == 2  # SDPO samples pairs whatever group_size says
    assert (sdpo.gamma, sdpo.clip_range, sdpo.adv_clip) == (0.9, 2e-5, 3.0)
    assert sdpo.normaliser.values.shape == (5, 3, 8) and sdpo.normaliser.min_count == 4
    grpo = build_policy_method("grpo", policy, prompts=5, transitions=3)
    assert type(grpo) is GRPO
    assert (grpo.group_size, grpo.clip_range, grpo.adv_clip, grpo.train_steps, grpo.step_range) == (6, 2e-5, 3.0, 1, 2)
    teacher, fake = models()
    with pytest.raises(ValueError, match="sdpo trains with the policy loop"):
        build_objective("sdpo", 0.0, teacher, fake, REWARD, AlignParams())
    with pytest.raises(ValueError, match="dmd2 trains with the align loop"):
        build_policy_method("dmd2", policy, 5, 3)
    with pytest.raises(ValueError, match="loop: unknown value 'offline'"):
        Method("x", "didr.objectives.di:DI", "help", ObjectiveInputs.matching, loop="offline")


def test_the_inputs_give_the_matching_arguments():
    teacher, fake = models()
    inputs = ObjectiveInputs(teacher, fake, REWARD, AlignParams(teacher_guidance=4.0))
    matching = inputs.matching()
    assert set(matching) == {"teacher", "fake", "time_sampling", "teacher_guidance"}
    assert matching["teacher_guidance"] == 4.0


def test_the_registry_and_the_grid_import_no_torch():
    """Snakemake and the launcher read the grid on every invocation: no torch import for that."""
    code = "import sys, didr.grid, didr.methods; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
