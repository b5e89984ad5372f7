"""Rewards by name, and weighted, normalised mixtures of them.

Training and held-out evaluation rewards are chosen by name in params.yaml; `build_reward(name, **kwargs)` calls the
registered factory. The real rewards (hpsv2, imagereward, pickscore, laion_aesthetic, clip_score) are registered
here: their factories import their module, hence hpsv2, ImageReward and torchvision (the `rewards` extra), only when
called, accept and ignore `folder` (the trained-rewards folder a world's own rewards read), and pass their other
options (weights, revision, version, ...) to the module's loader.

This registry names no world: a world registers its own rewards with `register_reward` from a provider module that
didr/plugins.py lists (`load_plugins()` runs them before any lookup).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import cast

import torch
from torch import Tensor

from didr.rewards.base import Reward

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, factory: Callable[..., Reward]) -> None:
    """Register `factory(**kwargs) -> Reward` under `name` (an existing name is replaced)."""
    _FACTORIES[name] = factory


def known_rewards() -> list[str]:
    """The registered names, sorted."""
    return sorted(_FACTORIES)


def build_reward(name: str, **kwargs) -> Reward:
    """The reward registered under `name`, built with `kwargs`; ValueError naming it and the known names otherwise."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(known_rewards())}")
    return _FACTORIES[name](**kwargs)


class RewardMixture:
    """r(x, p) = sum_k w_k (r_k(x, p) - mean_k) / std_k; mean_k = 0 and std_k = 1 when no normalisation is given."""

    def __init__(
        self,
        rewards: Mapping[str, Reward],
        weights: Mapping[str, float],
        normalisation: Mapping[str, tuple[float, float]] | None = None,
    ):
        if set(weights) != set(rewards):
            raise ValueError(f"weights must name exactly the rewards {sorted(rewards)}, got {sorted(weights)}")
        if normalisation is not None:
            if set(normalisation) != set(rewards):
                raise ValueError(
                    f"normalisation must name exactly the rewards {sorted(rewards)}, got {sorted(normalisation)}"
                )
            for name, (_, std) in normalisation.items():
                if not std > 0:
                    raise ValueError(f"normalisation std of {name!r} must be > 0, got {std}")
        self.rewards = dict(rewards)
        self.weights = dict(weights)
        self.normalisation = dict(normalisation) if normalisation is not None else {k: (0.0, 1.0) for k in rewards}

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        total: Tensor | int = 0
        for name, reward in self.rewards.items():
            mean, std = self.normalisation[name]
            total = total + self.weights[name] * (reward(images, prompts) - mean) / std
        return cast(Tensor, total)  # a Tensor once a reward is added; an empty mixture would return the int 0


def reward_statistics(reward: Reward, images: Tensor, prompts: Sequence[str]) -> tuple[float, float]:
    """(mean, std) of a reward over a reference batch, to set a `RewardMixture`'s normalisation."""
    with torch.no_grad():
        scores = reward(images, prompts).double()
    return scores.mean().item(), scores.std().item()


def _real(module: str, loader: str) -> Callable[..., Reward]:
    def factory(folder: str | Path | None = None, **options) -> Reward:
        try:
            return getattr(importlib.import_module(f"didr.rewards.{module}"), loader)(**options)
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f"didr.rewards.{module} cannot import {err.name!r}: install the `rewards` extra (make setup does)"
            ) from err

    return factory


register_reward("hpsv2", _real("hps", "load_hps"))
register_reward("imagereward", _real("image_reward", "load_image_reward"))
register_reward("pickscore", _real("pickscore", "load_pickscore"))
register_reward("laion_aesthetic", _real("aesthetic", "load_aesthetic"))
register_reward("clip_score", _real("clip_score", "load_clip_score"))
