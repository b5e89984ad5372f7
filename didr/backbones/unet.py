"""diffusers UNet2DConditionModel over a VP schedule (SD1.5, SD2, SDXL-style added conditioning)."""

from __future__ import annotations

from torch import Tensor, nn

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.text import PromptEncoder
from didr.diffusion import VPSchedule, expand_like, x0_from_eps, x0_from_v

PREDICTION_TYPES = ("epsilon", "v_prediction")


class UNetDenoiser(DiffusersDenoiser):
    """x0 from a UNet's eps (x0 = (x_t - s eps) / a) or v (x0 = a x_t - s v) at timestep t (T - 1).

    When the embeds hold "text_embeds" and "time_ids" they go to the UNet as added_cond_kwargs (SDXL).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: VPSchedule,
        text: PromptEncoder,
        vae: nn.Module | None = None,
        prediction_type: str = "epsilon",
        precision: str = "fp32",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"UNet prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        super().__init__(net, schedule, text, vae, precision)
        self.prediction_type = prediction_type

    def predict_x0(self, x_t: Tensor, t: Tensor, embeds: dict[str, Tensor]) -> Tensor:
        """eps: x0 = (x_t - s eps) / a; v: x0 = a x_t - s v (SDXL's text_embeds / time_ids pass through)."""
        added = {k: embeds[k] for k in ("text_embeds", "time_ids") if k in embeds}
        out = self.native(
            x_t,
            timestep=self.schedule.model_timestep(t),
            encoder_hidden_states=embeds["hidden"],
            added_cond_kwargs=added if len(added) == 2 else None,
        )
        a, s = (expand_like(v, x_t) for v in self.schedule.alpha_sigma(t))
        return x0_from_eps(x_t, out, a, s) if self.prediction_type == "epsilon" else x0_from_v(x_t, out, a, s)
