"""The README's extension example runs and does what it says."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the README example, run end to end


def load_example():
    path = Path(__file__).parents[1] / "examples" / "custom_reward_and_denoiser.py"
    spec = importlib.util.spec_from_file_location("custom_reward_and_denoiser", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_reward_and_denoiser_example_gains_reward_and_moves_towards_the_data():
    out = load_example().main(steps=200)
    assert out["reward_under_exact_tilt"] == pytest.approx(0.698, abs=1e-3)  # sum_i cos(th_i) e^{2 cos th_i} / Z
    assert out["reward_after"] > out["reward_before"] + 0.2
    assert out["distance_to_data_after"] < out["distance_to_data_before"] - 0.1
