"""Reward-versus-fidelity Pareto fronts and their dominated hypervolume (docs/algorithm.md §7).

A point is (cost, reward): cost is a fidelity distance to minimise (FID), reward is to maximise.
"""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, by increasing cost. q dominates p when q.cost <= p.cost and
    q.reward >= p.reward with one strict."""
    front = []
    for i, (cost, reward) in enumerate(points):
        dominated = any(
            (c <= cost and r >= reward) and (c < cost or r > reward) for j, (c, r) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by the front and bounded by the reference point (worst cost, worst reward):
    sum_i (c_{i+1} - c_i) (r_i - r_ref) over the front sorted by cost, with c_{n+1} = c_ref."""
    cost_ref, reward_ref = reference
    front = [points[i] for i in pareto_front(points) if points[i][0] < cost_ref and points[i][1] > reward_ref]
    area = 0.0
    for k, (cost, reward) in enumerate(front):
        next_cost = front[k + 1][0] if k + 1 < len(front) else cost_ref
        area += (next_cost - cost) * (reward - reward_ref)
    return area


def dominates(ours: Sequence[tuple[float, float]], theirs: Sequence[tuple[float, float]]) -> bool:
    """Every point of `theirs` is matched by one of `ours` with cost <= and reward >= (docs/algorithm.md §7).

    A weak (coverage) test: no point need be strictly better, so a front passes against itself."""
    return all(any(c <= tc and r >= tr for c, r in ours) for tc, tr in theirs)
