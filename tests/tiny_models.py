"""Tiny random-initialised diffusers pipelines (fixed seed), saved with the real pipelines' save_pretrained.

Every CLIP / T5 tower uses an offline tokenizer over lowercase letters with a 16-token window, so a prompt of more
than 14 letters is truncated; Z-Image's Qwen3 reads a byte-level BPE without merges (one token per byte) through a
Qwen3-style chat template, in a 48-token window. Each build takes well under a second on the CPU.
"""

from __future__ import annotations

import math
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from didr.evaluation.inception import FIDInception

WINDOW = 16
QWEN_WINDOW = 48
LETTERS = string.ascii_lowercase
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's chat template for one user turn: the same strings, generation prompt and enable_thinking switch
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def clip_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE (no merges): every letter is a token, word-final letters carry </w>."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*LETTERS, *(c + "</w>" for c in LETTERS)]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=WINDOW)


def t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer over word-initial and inner letters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=WINDOW)


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE over the 256 byte symbols, no merges, Qwen's special tokens and a Qwen3-style chat template."""
    vocab = {symbol: i for i, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    vocab |= {token: len(vocab) + i for i, token in enumerate(QWEN_SPECIAL)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], model_max_length=QWEN_WINDOW, extra_special_tokens=QWEN_SPECIAL[1:]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen_encoder(hidden: int) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=256 + len(QWEN_SPECIAL),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=QWEN_WINDOW,
    )
    return Qwen3Model(config)


def clip_encoder(hidden: int, projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=2 + 2 * len(LETTERS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=WINDOW,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def t5_encoder(d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=3 + 2 * len(LETTERS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4
    )
    return T5EncoderModel(config)


def tiny_vae(shift_factor: float | None = None, scaling_factor: float = 0.5) -> AutoencoderKL:
    """16x16 RGB <-> 4 x 8 x 8 latents."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def vp_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD1.5's scaled-linear betas, no clipping (so pred_original_sample is the raw conversion)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def save_sd(folder: Path, prediction_type: str = "epsilon", latent: bool = False, seed: int = 0):
    """SD-style: UNet2DConditionModel (32, 64) over 3 x 16 x 16 pixels, or 4 x 8 x 8 latents with a tiny VAE."""
    torch.manual_seed(seed)
    channels = 4 if latent else 3
    unet = UNet2DConditionModel(
        sample_size=8 if latent else 16,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae() if latent else None,
        text_encoder=clip_encoder(32, projection=False),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=vp_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return pipe


def save_pixart(folder: Path, seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-style: PixArtTransformer2DModel (learned sigma, 8 output channels) + T5 + tiny VAE."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=None,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(32),
        vae=tiny_vae(),
        transformer=transformer,
        scheduler=vp_scheduler(),
    )
    pipe.save_pretrained(folder)
    return pipe


def save_sd3(folder: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3-style: SD3Transformer2DModel + FlowMatchEuler; CLIP 16 + CLIP 32 (padded to 64) then T5 64; shifted VAE."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=48,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=clip_encoder(16, projection=True),
        tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(32, projection=True),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(64),
        tokenizer_3=t5_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return pipe


def save_sdxl(folder: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-style: text_time UNet over 4 x 8 x 8 latents; CLIP 16 + CLIP 32 with projection (cross-attention 48,
    pooled 32, 6 time ids x 8 + 32 = 80 added features); Euler, as SDXL base ships."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=clip_encoder(16, projection=False),
        text_encoder_2=clip_encoder(32, projection=True),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return pipe


def save_flux(folder: Path, guidance_embeds: bool = True, seed: int = 0) -> FluxPipeline:
    """FLUX-style: FluxTransformer2DModel over 4 x 8 x 8 latents packed into 16 tokens of 16; CLIP 16 (pooled) + T5 32;
    guidance embedding (dev) or not (schnell); shifted VAE; dynamically shifted FlowMatchEuler."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=clip_encoder(16, projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return pipe


def save_zimage(folder: Path, seed: int = 0) -> ZImagePipeline:
    """Z-Image-style: ZImageTransformer2DModel (dim 32, 2x2 patches) over 4 x 8 x 8 latents; Qwen3 32; shifted VAE."""
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[128, 16, 16],
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=qwen_encoder(32),
        tokenizer=qwen_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return pipe


def clip_model_config(vocab_size: int, image_size: int) -> CLIPConfig:
    """A tiny CLIPModel (the PickScore / CLIP-score / aesthetic tower): width 32, one layer per tower, patch 8."""
    return CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": WINDOW,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "image_size": image_size,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )


def save_clip_model(folder: Path, image_size: int = 32, seed: int = 0) -> CLIPModel:
    """A tiny random CLIPModel with its tokenizer, saved like a hub CLIP repository."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    model = CLIPModel(clip_model_config(len(tokenizer), image_size))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The real weights file's entries (BatchNorm counters and the 1008-way classifier included), randomised so that
    activations keep their scale through the 94 layers: He-normal convolutions, BatchNorm statistics near identity."""
    generator = torch.Generator().manual_seed(seed)
    state = FIDInception().state_dict()
    state |= {"fc.weight": torch.empty(1008, 2048), "fc.bias": torch.empty(1008)}
    for key, value in state.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            value.normal_(0, math.sqrt(2 / value[0].numel()), generator=generator)
        elif key.endswith(("bn.weight", "running_var")):
            value.uniform_(0.5, 1.5, generator=generator)
        elif key.endswith(("bias", "running_mean")):
            value.normal_(0, 0.1, generator=generator)
    return state
