"""Where each method lands on a problem with a closed-form answer, and how fast (issue 2, item 6d).

Reference N(mu, Sigma) in 2D (anisotropic), quadratic reward r(x) = -0.5 (x - m)^T Q (x - m), target
p* ~ p_ref exp(r / beta) = N(m*, Sigma*). An affine one-step generator trains against its exact fake score, so
every gap to p* is the method's own. DI++ runs at alpha_rew = E_t[s^2 / a^2] / beta, the strength at which its
terminal reward matches DIDR's proxy as t -> 0 (docs/algorithm.md §5.3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from didr.backbones.gaussian import AffineFakeScore, AffineGenerator, GaussianDenoiser
from didr.diffusion import FlowSchedule, Schedule, UniformTime, VPSchedule, cosine_vp_config
from didr.objectives import DIDR, DIPlusPlus
from didr.rewards.analytic import QuadraticReward
from didr.training.loop import align

MEAN = (0.5, -0.3)
COV = ((1.0, 0.6), (0.6, 0.52))
CENTRE = (1.0, 1.0)
PRECISION = ((2.0, 0.3), (0.3, 0.5))
METHODS = ("didr-exact", "didr-tweedie", "didr-k-step", "didr-hybrid", "dipp")


@dataclass
class StudyRow:
    """One run: where it landed relative to p* (relative Frobenius errors) and how fast it settled."""

    schedule: str
    method: str
    beta: float
    t_max: float
    strength: float
    mean_error: float
    cov_error: float
    settle_step: int
    seconds: float


def _schedule(name: str) -> Schedule:
    return VPSchedule.from_scheduler_config(cosine_vp_config()) if name == "vp-cosine" else FlowSchedule()


def matched_alpha_rew(schedule: Schedule, times: UniformTime, beta: float) -> float:
    """alpha_rew = E_t[s^2 / a^2] / beta, estimated from 200k draws of the time sampler."""
    t = times(200_000, torch.Generator().manual_seed(0)).double()
    a, s = schedule.alpha_sigma(t)
    return (s**2 / a**2).mean().item() / beta


def run_one(schedule_name: str, method: str, beta: float, t_max: float, steps: int = 1200, seed: int = 0) -> StudyRow:
    """Train one affine generator and compare its law with the closed-form tilted Gaussian."""
    dtype = torch.float64
    schedule = _schedule(schedule_name)
    reference = GaussianDenoiser(torch.tensor(MEAN, dtype=dtype), torch.tensor(COV, dtype=dtype), schedule).frozen()
    reward = QuadraticReward(torch.tensor(CENTRE, dtype=dtype), torch.tensor(PRECISION, dtype=dtype))
    target_mean, target_cov = reward.tilt(reference.mean, reference.cov, beta)
    times = UniformTime(0.02, t_max)
    generator = reference.make_generator(t_star=0.98)
    fake = AffineFakeScore(generator, schedule)
    strength = 1 / beta
    if method == "dipp":
        strength = matched_alpha_rew(schedule, times, beta)
        objective: DIPlusPlus | DIDR = DIPlusPlus(reference, fake, reward, strength, times)
    else:
        mode = method.removeprefix("didr-")
        drs = reward.exact_drs(reference, beta) if mode == "exact" else mode
        steps_k = 4 if mode in ("k-step", "hybrid") else 1
        objective = DIDR(
            reference, fake, reward, beta, drs=drs, drs_steps=steps_k, t_max=1.0, time_sampling=times,
            weighting="uniform",
        )  # fmt: skip
    trajectory: list[tuple[int, torch.Tensor]] = []

    def record(step: int, logs: dict[str, float]) -> None:
        if step % 25 == 0 or step == steps - 1:
            mean, cov = generator.law()
            trajectory.append((step, torch.cat([mean, cov.flatten()])))

    start = time.perf_counter()
    result = align(
        generator, objective, reference.encode_prompts([""]), steps=steps, batch_size=256, fake=fake, lr=0.02,
        adam_betas=(0.9, 0.99), grad_clip=None, lr_schedule="cosine", ema_decay=0.9, seed=seed, on_step=record,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert isinstance(result.ema, AffineGenerator)  # the EMA is a copy of the affine generator
    mean, cov = result.ema.law()
    final = trajectory[-1][1]
    settled = [step for step, law in trajectory if (law - final).norm() > 0.02 * final.norm()]
    return StudyRow(
        schedule_name,
        method,
        beta,
        t_max,
        strength,
        ((mean - target_mean).norm() / target_mean.norm()).item(),
        ((cov - target_cov).norm() / target_cov.norm()).item(),
        settled[-1] + 25 if settled else 0,
        seconds,
    )


def run_study(
    schedules: tuple[str, ...] = ("vp-cosine", "flow"),
    methods: tuple[str, ...] = METHODS,
    betas: tuple[float, ...] = (0.5, 1.0, 2.0),
    t_maxes: tuple[float, ...] = (0.98, 0.6),
    steps: int = 1200,
) -> list[StudyRow]:
    """Every combination of the grid, in order."""
    torch.set_num_threads(1)
    return [
        run_one(schedule, method, beta, t_max, steps)
        for schedule in schedules
        for t_max in t_maxes
        for beta in betas
        for method in methods
    ]


def markdown_table(rows: list[StudyRow]) -> str:
    """The study as a Markdown table, one run a line."""
    lines = [
        "| schedule | t range | beta | method | strength | mean err | cov err | settles by step | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.schedule} | [0.02, {r.t_max}] | {r.beta} | {r.method} | {r.strength:.3g} | {r.mean_error:.3f} "
            f"| {r.cov_error:.3f} | {r.settle_step} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)
