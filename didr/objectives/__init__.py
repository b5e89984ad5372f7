"""One small callable per method; each maps (x0, cond, generator) to (per-sample loss, logged scalars).

The methods by name, and the one factory that builds their objectives from the align settings, are didr/methods.py.
"""

from __future__ import annotations

from didr.objectives.di import DI, DIPlusPlus
from didr.objectives.didr import DIDR
from didr.objectives.dmd2 import DMD2
from didr.objectives.fake_score import FakeScoreLoss
from didr.objectives.reward_only import RewardOnly

__all__ = ["DI", "DIDR", "DMD2", "DIPlusPlus", "FakeScoreLoss", "RewardOnly"]
