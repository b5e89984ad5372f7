"""What the embedded world adds to the generic registries (didr/plugins.py lists this module).

- Rewards: toy_alignment and toy_preference (trained by the teacher stage; their factories take `folder`, the
  trained-rewards folder of `train_toy_rewards`), toy_aesthetic and toy_utility (analytic; they accept and ignore
  `folder`, so one call builds any toy reward).
- Fidelity features, toy_alignment: the alignment scorer's penultimate features against real images rendered for the
  same prompts, and per image whether the scorer reads the prompt's shape / colour / position / background;
  toy_random_conv: the random convolutional bank of didr/evaluation/random_features.py against the same renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from didr.evaluation.features import FeatureContext, FeatureSet, batched, register_features
from didr.evaluation.random_features import RandomConvFeatures
from didr.rewards.base import Reward
from didr.rewards.registry import register_reward
from didr.toy.data import ATTRIBUTES, parse_prompt, render
from didr.toy.rewards import AestheticReward, AlignmentScorer, HiddenUtility, load_toy_reward


def _trained(name: str):
    def factory(folder: str | Path) -> Reward:
        return load_toy_reward(name, folder)

    return factory


def _aesthetic(folder: str | Path | None = None) -> Reward:
    return AestheticReward()


def _utility(folder: str | Path | None = None, size: int = 16) -> Reward:
    return HiddenUtility(size)


def real_images(prompts: list[str], size: int, seed: int) -> Tensor:
    """Rendered toy-world images for the prompts, in [0, 1]: the real data the fidelity metrics compare against."""
    labels = torch.stack([parse_prompt(p) for p in prompts])
    return (render(labels, size, torch.Generator().manual_seed(seed)) + 1) / 2


class AlignmentFeatures(FeatureSet):
    """The trained alignment scorer's features; real images rendered with the experiment's seed."""

    def __init__(self, context: FeatureContext):
        scorer = load_toy_reward("alignment", context.teacher_dir / "rewards")
        assert isinstance(scorer, AlignmentScorer)
        self.scorer = scorer.to(context.device)
        self.seed = context.seed
        super().__init__(self.scorer.features, "toy_alignment", context.device)

    def real(self, prompts: list[str], size: int) -> Tensor:
        return self.features(real_images(prompts, size, self.seed))

    def prompt_match(self, images: Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """match_<attribute>: 1.0 where the scorer reads the prompt's value of the attribute (their means are the
        set's prompt-following accuracies)."""
        labels = torch.stack([parse_prompt(p) for p in prompts])
        scorer = self.scorer
        read = batched(lambda im, _: torch.stack([lg.argmax(1) for lg in scorer.logits(im)], 1), images, prompts,
                       self.device)  # fmt: skip
        return {f"match_{a}": (read[:, i] == labels[:, i]).double().numpy() for i, a in enumerate(ATTRIBUTES)}


def register() -> None:
    """Register the toy rewards and the toy fidelity features."""
    register_reward("toy_alignment", _trained("alignment"))
    register_reward("toy_preference", _trained("preference"))
    register_reward("toy_aesthetic", _aesthetic)
    register_reward("toy_utility", _utility)
    register_features("toy_alignment", AlignmentFeatures)
    register_features("toy_random_conv", lambda context: RandomConvFeatures(context, real_images, "toy_random_conv"))
