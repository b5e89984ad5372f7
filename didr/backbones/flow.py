"""diffusers SD3Transformer2DModel over the rectified-flow schedule (Stable Diffusion 3 / 3.5)."""

from __future__ import annotations

from torch import Tensor

from didr.backbones.adapter import DiffusersDenoiser
from didr.diffusion import expand_like, x0_from_flow_velocity


class SD3FlowDenoiser(DiffusersDenoiser):
    """x0 = x_t - t v, v = eps - x0 the transformer's velocity at timestep t * 1000 (as FlowMatchEuler feeds it).

    Built over a FlowSchedule; "pooled" goes to the transformer as pooled_projections.
    """

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """Rectified flow: the transformer predicts v = eps - x0 at timestep 1000 t; x0 = x_t - t v."""
        v = self.native(
            x_t,
            encoder_hidden_states=embeds["hidden"],
            pooled_projections=embeds["pooled"],
            timestep=self.schedule.model_timestep(t),
        )
        return x0_from_flow_velocity(x_t, v, expand_like(t, x_t))
