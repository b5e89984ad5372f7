"""One small callable per method; each maps (x0, cond, generator) to (per-sample loss, logged scalars)."""

from __future__ import annotations

from typing import Any

from didr.objectives.di import DI, DIPlusPlus
from didr.objectives.didr import DIDR
from didr.objectives.dmd2 import DMD2
from didr.objectives.fake_score import FakeScoreLoss
from didr.objectives.reward_only import RewardOnly

METHODS = {"di": DI, "dipp": DIPlusPlus, "dmd2": DMD2, "didr": DIDR, "reward_only": RewardOnly}


def build_objective(method: str, **kwargs: Any) -> DI | DIPlusPlus | DMD2 | DIDR | RewardOnly:
    """The objective of a method by name, built from its keyword arguments."""
    if method not in METHODS:
        raise ValueError(f"method: unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](**kwargs)


__all__ = ["DI", "DIDR", "DMD2", "METHODS", "DIPlusPlus", "FakeScoreLoss", "RewardOnly", "build_objective"]
