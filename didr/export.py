"""An aligned generator as a diffusers pipeline folder that diffusers loads alone (docs/export.md).

The one-step generator is x0 = D_theta(z, t*, c), z unit Gaussian fed unscaled as x_{t*} (docs/algorithm.md §2.1);
the K-step generator's deterministic sampler feeds z as x at t_0 and joins its K predictions at t_0 > ... > t_{K-1}
by DDIM (VP) or Euler (flow) steps to the next time, returning the last prediction (§8.1, std = 0). Stock diffusers
schedulers over the same times compute the same images with the aligned network:

- VP (UNet and PixArt pipelines): EulerDiscreteScheduler over the teacher's betas, called with sigmas =
  [s/a at t_0, ..., s/a at t_{K-1}, 0] and "leading" spacing. It scales the initial latents by sqrt(sigma_0^2 + 1)
  and each network input back by sqrt(sigma^2 + 1) = 1 / a, so the network sees x; it feeds the timestep its own
  log-sigma interpolation gives, t (T - 1) to float32 precision; its step in x / a is DDIM's, and the last one, to
  sigma 0, returns its pred_original_sample, the adapter's x0 = (x - s eps) / a or a x - s v (§1).
- Flow (SD3, FLUX, Z-Image pipelines): FlowMatchEulerDiscreteScheduler without shift, called with sigmas =
  [t_0, ..., t_{K-1}]: the network sees x at timestep 1000 t, and its Euler steps x + (t' - t) v end at 0 in
  x - t v = x0.

The call turns classifier-free guidance off (the generator has none: guidance_scale 1, Z-Image's 0) and passes what
makes each pipeline encode prompts and size latents as the adapter does (pipeline_arguments).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from didr.diffusion import Schedule, VPSchedule
from didr.fewstep import FewStepGenerator
from didr.generator import OneStepGenerator

NETWORK = {  # the pipeline classes an export supports, and the name of their denoising network
    "StableDiffusionPipeline": "unet",
    "StableDiffusionXLPipeline": "unet",
    "StableDiffusion3Pipeline": "transformer",
    "PixArtAlphaPipeline": "transformer",
    "FluxPipeline": "transformer",
    "ZImagePipeline": "transformer",
}
PADDED_PROMPTS = ("StableDiffusion3Pipeline", "PixArtAlphaPipeline", "FluxPipeline", "ZImagePipeline")  # pad T5 /
# Qwen tokens to the call's max_sequence_length, where the adapter pads to min(the tokenizer's window, its cap)
DEFAULT_SIZE = ("FluxPipeline", "ZImagePipeline")  # draw 1024 px unless told, not the network's own size
FIXED_ARGUMENTS: dict[str, dict[str, Any]] = {
    "PixArtAlphaPipeline": {"clean_caption": False, "use_resolution_binning": False},  # no caption rewriting, no
    # resizing to an aspect-ratio bin (which also refuses sample sizes other than 256-1024 px)
    "ZImagePipeline": {"guidance_scale": 0.0},  # its CFG is pos + w (pos - neg): w = 0 is one conditional pass
}
LORA_MODES = ("merge", "keep")
CALL_FILE = "sampler_call.json"  # the call arguments that reproduce the generator's sampler


def check_pipeline(pipeline_class: str, source: str) -> str:
    """The network key ('unet' / 'transformer') of a supported pipeline class; ValueError naming `source` if not."""
    if pipeline_class not in NETWORK:
        raise ValueError(f"{source}: cannot export a {pipeline_class}; supported: {sorted(NETWORK)}")
    return NETWORK[pipeline_class]


def generator_times(generator: OneStepGenerator | FewStepGenerator) -> list[float]:
    """The times the generator evaluates its network at, in the float32 it feeds them in: [t*] for one step,
    t_0 > ... > t_{K-1} for K steps (docs/algorithm.md §2.1, §8.1)."""
    times = generator.times if isinstance(generator, FewStepGenerator) else torch.tensor([generator.t_star])
    return times.float().tolist()


def sampler_scheduler(
    config: Mapping[str, Any], schedule: Schedule, times: Sequence[float]
) -> tuple[Any, dict[str, Any]]:
    """The scheduler of the exported pipeline and the call arguments under which its steps over `times` are the
    generator's deterministic sampler (the module docstring)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    t = torch.tensor(list(times), dtype=torch.float32)  # the generator's times, in its dtype
    if isinstance(schedule, VPSchedule):
        scheduler = EulerDiscreteScheduler.from_config(
            config, timestep_spacing="leading", interpolation_type="linear", final_sigmas_type="zero",
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, timestep_type="discrete",
        )  # fmt: skip
        a, s = schedule.alpha_sigma(t)
        sigmas = [*(s / a).tolist(), 0.0]
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            config, shift=1.0, use_dynamic_shifting=False, invert_sigmas=False, shift_terminal=None,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False,
        )  # fmt: skip
        sigmas = t.tolist()
    return scheduler, {"num_inference_steps": len(t), "guidance_scale": 1.0, "sigmas": sigmas}


def pipeline_arguments(pipeline_class: str, towers: list[Any], pixels: tuple[int, int]) -> dict[str, Any]:
    """Call arguments under which the pipeline encodes prompts and sizes latents as the adapter does
    (didr/backbones/loading.py): the T5 / Qwen window as max_sequence_length, the sample's `pixels` (H, W) as
    height and width where the pipeline's default is 1024, FIXED_ARGUMENTS. ValueError for an SD3 pipeline without
    T5, which diffusers fills with zero tokens the adapter does not add."""
    arguments: dict[str, Any] = dict(FIXED_ARGUMENTS.get(pipeline_class, {}))
    if pipeline_class in PADDED_PROMPTS:
        padded = [tower for tower in towers if not tower.is_clip]
        if not padded:
            raise ValueError(f"{pipeline_class} without text_encoder_3: diffusers appends zero T5 tokens that "
                             "didr's adapter does not, so no call reproduces the sampler")  # fmt: skip
        arguments["max_sequence_length"] = padded[0].window
    if pipeline_class in DEFAULT_SIZE:
        arguments["height"], arguments["width"] = pixels
    return arguments


def absent_components(folder: Path) -> dict[str, None]:
    """The components model_index.json lists as absent ([null, null]); from_pretrained needs them passed as None."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return {key: None for key, spec in index.items() if isinstance(spec, list) and spec[0] is None}


def _lora_layers(net: nn.Module) -> dict[str, Any]:
    """The network's peft LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in net.named_modules() if isinstance(module, LoraLayer)}


def base_state(net: nn.Module) -> dict[str, Tensor]:
    """The network's weights without its LoRA adapters, under the plain network's names."""
    return {
        key.replace(".base_layer.", "."): value.detach().clone()
        for key, value in net.state_dict().items()
        if "lora_" not in key
    }


def merged_state(net: nn.Module) -> dict[str, Tensor]:
    """The network's weights with each LoRA folded in: W + (alpha / r) B A (peft's delta); unchanged without LoRA."""
    state = base_state(net)
    for name, layer in _lora_layers(net).items():
        for adapter in layer.active_adapters:
            state[f"{name}.weight"] += layer.get_delta_weight(adapter).detach()
    return state


def plain_network(net: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A fresh network of `net`'s diffusers class and config holding `state` (no adapters)."""
    config: Any = net.config  # diffusers' FrozenDict
    network_class: Any = type(net)  # a diffusers ModelMixin
    fresh = network_class.from_config(config)
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def lora_layers(net: nn.Module) -> dict[str, Tensor]:
    """The network's LoRA weights in diffusers' format (what `save_lora_weights` writes and `load_lora_weights`
    reads); ValueError for a network without LoRA."""
    from peft.utils import get_peft_model_state_dict

    if not _lora_layers(net):
        raise ValueError(
            "export.lora: keep needs a LoRA run (finetune.lora_rank > 0); this run fine-tuned every weight"
        )
    return get_peft_model_state_dict(net)


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the run's params as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


def usage_snippet(
    folder: str, prompt: str, call: Mapping[str, Any], lora: bool, absent: Sequence[str], pixels: bool
) -> str:
    """Python that loads the folder with diffusers alone and draws one image with the sampler's call; `absent`: the
    required components the folder has none of (passed as None); a pipeline without a VAE returns its pixel
    samples in [-1, 1] as "latents"."""
    head = "import torch\nfrom diffusers import DiffusionPipeline\n\n"
    nones = "".join(f", {name}=None" for name in absent)
    head += f"pipe = DiffusionPipeline.from_pretrained({folder!r}{nones})\n"
    load = f"pipe.load_lora_weights({folder!r})\n" if lora else ""
    args = ", ".join(f"{key}={value!r}" for key, value in call.items())
    seeded = "generator=torch.Generator().manual_seed(0)"
    if pixels:
        draw = (
            f'x0 = pipe({prompt!r}, {args}, output_type="latent", {seeded}).images\n'
            "images = ((x0 + 1) / 2).clamp(0, 1)  # [B, 3, H, W] in [0, 1]\n"
        )
    else:
        draw = f'images = pipe({prompt!r}, {args}, output_type="pt", {seeded}).images  # [B, 3, H, W] in [0, 1]\n'
    return head + load + draw


def model_card(meta: dict[str, Any], snippet: str, title: str) -> str:
    """README.md: YAML metadata, a short description and the usage snippet."""
    front = yaml.safe_dump(meta, sort_keys=False, width=120)
    steps = meta["didr"]["steps"]
    sampler = (
        f"One scheduler step from noise level t* = {meta['didr']['t_star']}"
        if steps == 1
        else f"{steps} deterministic scheduler steps at times {meta['didr']['times']}"
    )
    return (
        f"---\n{front}---\n\n# {title}\n\n"
        f"A {steps}-step generator aligned by didr ({meta['didr']['method']}, {meta['didr']['setting']}) from "
        f"{meta['base_model']}. {sampler} reproduces didr's sampler; the call arguments are in `{CALL_FILE}`. "
        "Metrics: the run's row of didr's report.\n\n"
        f"```python\n{snippet}```\n"
    )


def read_card(folder: Path) -> dict[str, Any]:
    """The YAML metadata of an exported folder's README.md."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    return yaml.safe_load(text.split("---\n")[1])


def write_export(
    pipe: Any, network: nn.Module, scheduler: Any, call: Mapping[str, Any], lora: str, out: Path, card: str
) -> None:
    """Into the (empty) folder `out`: `pipe` with the aligned `network` (LoRA merged, or the base network plus the
    adapters for `load_lora_weights` when `lora` is 'keep') and `scheduler`, all safetensors; the call arguments
    (CALL_FILE) and the model card (README.md)."""
    if lora not in LORA_MODES:
        raise ValueError(f"export.lora: unknown value {lora!r}; choose one of {list(LORA_MODES)}")
    key = check_pipeline(type(pipe).__name__, "export")
    if lora == "keep" and not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"export.lora: keep needs a pipeline that loads LoRAs; {type(pipe).__name__} has no "
                         "load_lora_weights (use merge)")  # fmt: skip
    adapters = lora_layers(network) if lora == "keep" else None  # checked before anything is written
    weights = base_state(network) if adapters is not None else merged_state(network)
    pipe.register_modules(**{key: plain_network(network, weights), "scheduler": scheduler})
    pipe.save_pretrained(out, safe_serialization=True)
    if adapters is not None:
        type(pipe).save_lora_weights(out, **{f"{key}_lora_layers": adapters}, safe_serialization=True)
    (out / CALL_FILE).write_text(json.dumps(dict(call), indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(card, encoding="utf-8")
