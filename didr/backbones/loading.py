"""Build a Denoiser from a diffusers pipeline folder (model_index.json) or a hub id at a pinned revision."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from didr.backbones.adapter import DiffusersDenoiser
from didr.backbones.flow import SD3FlowDenoiser
from didr.backbones.flux import FluxDenoiser
from didr.backbones.hub import resolve_folder
from didr.backbones.pixart import PixArtDenoiser
from didr.backbones.text import PromptEncoder, TextTower
from didr.backbones.unet import UNetDenoiser
from didr.backbones.zimage import ZImageDenoiser
from didr.diffusion import FlowSchedule, VPSchedule

LIBRARIES = ("diffusers", "transformers")  # model_index.json may name no other module: loading one runs its code
TOWERS = ("", "_2", "_3")
TEXT = tuple(f"{kind}{suffix}" for suffix in TOWERS for kind in ("tokenizer", "text_encoder"))
COMPONENTS = ("unet", "transformer", "scheduler", "vae", *TEXT)


def text_towers(components: Mapping[str, Any], clip_layer: int | None, t5_length: int | None) -> list[TextTower]:
    """The (tokenizer, text_encoder), (tokenizer_2, text_encoder_2), ... pairs present, CLIP read at `clip_layer`."""
    towers = []
    for suffix in TOWERS:
        encoder = components.get(f"text_encoder{suffix}")
        if encoder is not None:
            clip = encoder.config.model_type.startswith("clip")
            towers.append(
                TextTower(
                    components[f"tokenizer{suffix}"],
                    encoder,
                    hidden_layer=clip_layer if clip else None,
                    max_length=None if clip else t5_length,
                )
            )
    return towers


def _vp_prediction(components: Mapping[str, Any]) -> tuple[VPSchedule, str]:
    config = components["scheduler"].config
    return VPSchedule.from_scheduler_config(config), config.get("prediction_type", "epsilon")


def _flow_schedule(components: Mapping[str, Any]) -> FlowSchedule:
    return FlowSchedule(int(components["scheduler"].config["num_train_timesteps"]))


def vae_scale_factor(vae: Any | None) -> int:
    """Pixels per latent, 2^(len(block_out_channels) - 1), as diffusers' pipelines compute it (8 without a VAE)."""
    return 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(vae: Any) -> tuple[int, int]:
    """The latent (H, W) of the VAE's own sample_size in pixels (FLUX.1's VAE says 1024, the pipelines' default
    resolution), rounded as FluxPipeline / ZImagePipeline.prepare_latents do: 2 (pixels // (2 vae_scale_factor))."""
    size = vae.config.sample_size
    scale = vae_scale_factor(vae)
    # sample_size is an int or an (H, W) pair: two entries.
    return cast(
        "tuple[int, int]", tuple(2 * (int(n) // (2 * scale)) for n in ((size, size) if isinstance(size, int) else size))
    )


def _unet(pipeline: str, components: Mapping[str, Any], precision: str, config: Mapping[str, Any]) -> DiffusersDenoiser:
    """SD1.5 / SD2 read CLIP's last_hidden_state. Two-encoder (SDXL) pipelines read hidden_states[-2], pool
    text_encoder_2's projection and, with force_zeros_for_empty_prompt (the pipeline's default), use zeros as the
    negative."""
    schedule, prediction_type = _vp_prediction(components)
    net, vae, second = components["unet"], components.get("vae"), components.get("text_encoder_2")
    if net.config.addition_embed_type == "text_time":
        assert second is not None, f"{pipeline}: a text_time (SDXL) UNet comes with text_encoder_2"
        pooled = int(second.config.projection_dim)
        passed = 6 * int(net.config.addition_time_embed_dim) + pooled
        expected = net.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(
                f"{pipeline}: the UNet's added embedding takes {expected} features, but 6 time ids x "
                f"addition_time_embed_dim {net.config.addition_time_embed_dim} + pooled {pooled} give {passed}"
            )
    zeros = second is not None and bool(config.get("force_zeros_for_empty_prompt", True))
    text = PromptEncoder(text_towers(components, -2 if second is not None else None, None), zero_negative=zeros)
    return UNetDenoiser(net, schedule, text, vae, prediction_type, precision, vae_scale_factor(vae))


def _pixart(
    pipeline: str, components: Mapping[str, Any], precision: str, config: Mapping[str, Any]
) -> DiffusersDenoiser:
    """T5 with its attention mask, 120 tokens (PixArt-alpha) or 300 (PixArt-sigma), as diffusers' pipelines."""
    schedule, prediction_type = _vp_prediction(components)
    if prediction_type != "epsilon":
        raise ValueError(f"PixArt adapters predict epsilon; the scheduler says {prediction_type!r}")
    text = PromptEncoder(text_towers(components, None, 300 if "Sigma" in pipeline else 120), mask=True)
    vae = components.get("vae")
    scale = vae_scale_factor(vae) if vae is not None else 1
    return PixArtDenoiser(components["transformer"], schedule, text, vae, precision, vae_scale_factor=scale)


def _sd3(pipeline: str, components: Mapping[str, Any], precision: str, config: Mapping[str, Any]) -> DiffusersDenoiser:
    """SD3: CLIP hidden_states[-2] concatenated, padded to joint_attention_dim, then T5 (256 tokens) appended."""
    net = components["transformer"]
    text = PromptEncoder(text_towers(components, -2, 256), width=int(net.config.joint_attention_dim))
    return SD3FlowDenoiser(net, _flow_schedule(components), text, components.get("vae"), precision)


def _flux(pipeline: str, components: Mapping[str, Any], precision: str, config: Mapping[str, Any]) -> DiffusersDenoiser:
    """FLUX.1: CLIPTextModel's pooler_output only, T5 last_hidden_state (512 tokens, FluxPipeline's default)."""
    text = PromptEncoder(
        [
            TextTower(components["tokenizer"], components["text_encoder"], pooled_only=True),
            TextTower(components["tokenizer_2"], components["text_encoder_2"], max_length=512),
        ]
    )
    vae = components["vae"]
    return FluxDenoiser(
        components["transformer"], _flow_schedule(components), text, vae, precision, latent_size=latent_size(vae)
    )


def _zimage(
    pipeline: str, components: Mapping[str, Any], precision: str, config: Mapping[str, Any]
) -> DiffusersDenoiser:
    """Z-Image: the Qwen3 encoder's hidden_states[-2] over the chat-templated prompt, 512 tokens, with its mask."""
    tower = TextTower(
        components["tokenizer"], components["text_encoder"], hidden_layer=-2, max_length=512, chat_template=True
    )
    vae = components["vae"]
    return ZImageDenoiser(
        components["transformer"],
        _flow_schedule(components),
        PromptEncoder([tower], mask=True),
        vae,
        precision,
        latent_size=latent_size(vae),
    )


Builder = Callable[[str, Mapping[str, Any], str, Mapping[str, Any]], DiffusersDenoiser]
ADAPTERS: dict[str, Builder] = {
    "UNet2DConditionModel": _unet,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
    "ZImageTransformer2DModel": _zimage,
}


def network_class(index: Mapping[str, Any]) -> str:
    """The class name of the pipeline's denoising network ('unet' or 'transformer' entry)."""
    for key in ("unet", "transformer"):
        spec = index.get(key)
        if isinstance(spec, list) and spec[-1] is not None:
            return spec[-1]
    return "<none>"


def adapter_for(name: str, source: str) -> Builder:
    """The adapter builder of network class `name`; ValueError naming the class and where it was read."""
    if name not in ADAPTERS:
        raise ValueError(f"{source}: unknown network class {name!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[name]


def denoiser_from_components(
    pipeline: str, components: Mapping[str, Any], precision: str = "fp32", config: Mapping[str, Any] | None = None
) -> DiffusersDenoiser:
    """The adapter for loaded pipeline components (e.g. `pipe.components`) of pipeline class `pipeline`.

    `config` is the pipeline's own config (`pipe.config`, model_index.json), e.g. SDXL's force_zeros_for_empty_prompt;
    missing entries take the pipeline classes' defaults.
    """
    net = components.get("unet")
    net = components.get("transformer") if net is None else net
    return adapter_for(type(net).__name__, f"{pipeline} components")(pipeline, components, precision, config or {})


def resolve_source(source: str | Path, revision: str | None) -> Path:
    """A local pipeline folder, or the cached / downloaded snapshot of hub id `source` at `revision`."""
    path = Path(source).expanduser()
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json: not a diffusers pipeline folder")
    return resolve_folder(source, revision)


class PipelineFolderError(ValueError):
    """A pipeline folder's model_index.json or a component of it that cannot be used; the message names the file."""


def read_model_index(folder: Path) -> dict[str, Any]:
    """model_index.json of a pipeline folder; PipelineFolderError naming it if it is not a JSON object."""
    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PipelineFolderError(f"{index_file}: not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise PipelineFolderError(f"{index_file}: expected a JSON object")
    return index


def component_class(index_file: Path, name: str, spec: Any) -> Any:
    """The class of component `name` ([library, class] in model_index.json), imported only from LIBRARIES;
    PipelineFolderError naming the file and the key otherwise."""
    if not (isinstance(spec, list) and len(spec) == 2 and all(isinstance(part, str) for part in spec)):
        raise PipelineFolderError(f"{index_file}: {name}: expected [library, class], got {spec!r}")
    library, class_name = spec
    if library not in LIBRARIES:
        raise PipelineFolderError(f"{index_file}: {name}: library {library!r} is not allowed (one of {LIBRARIES})")
    found = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(found, type) or not hasattr(found, "from_pretrained"):
        raise PipelineFolderError(f"{index_file}: {name}: {library} has no loadable class {class_name!r}")
    return found


def load_component(folder: Path, name: str, spec: list[str]) -> Any:
    """One component through its own class's from_pretrained(folder, subfolder=name); PipelineFolderError naming the
    component's folder if its files are missing, truncated or corrupt."""
    cls = component_class(folder / "model_index.json", name, spec)
    try:
        return cls.from_pretrained(folder, subfolder=name)
    except Exception as error:  # each library raises its own types (OSError, SafetensorError, ValueError, ...)
        reason = " ".join(str(error).split())[:300]
        raise PipelineFolderError(f"{folder / name}: cannot load {spec[0]}.{spec[1]} ({reason})") from None


def load_denoiser(
    source: str | Path, revision: str | None = None, precision: str = "fp32", device: str = "cpu"
) -> DiffusersDenoiser:
    """The Denoiser of a diffusers pipeline: local folder with model_index.json, or hub id at a pinned revision."""
    folder = resolve_source(source, revision)
    index_file = folder / "model_index.json"
    index = read_model_index(folder)
    build = adapter_for(network_class(index), str(index_file))
    components = {
        key: load_component(folder, key, index[key])
        for key in COMPONENTS
        if isinstance(index.get(key), list) and index[key][0] is not None
    }
    return build(str(index.get("_class_name")), components, precision, index).to(device)
