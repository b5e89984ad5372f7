"""Peak memory of one SDXL alignment step at 1024x1024: computed on the CPU, measured on a GPU when there is one.

What runs is the project's own step: `didr.training.loop.align` for two steps (batch 1, one fake-score update per
generator step) on the objective `didr.methods.build_objective` builds from params.yaml's align section
(didr with the K = 1 Tweedie proxy, dipp, or dmd2 with the reward; teacher CFG 3, so every teacher call runs on a
batch of 2), built the way `didr.stages.align.run_align` builds it: the teacher is `denoiser_from_components` over
SDXL base 1.0's components built from their published configs with random weights; with
params.finetune.gradient_checkpointing, `checkpoint_frozen_parts(teacher)` (teacher UNet and VAE) and
build_objective's `checkpoint` flag (DIDR's proxy recomputes decode + reward in the backward); the generator and
the fake score are `didr.stages.common.new_generator` / `new_fake` with params.finetune (LoRA rank, gradient
checkpointing) and warmup.generator_weights; the reward is the library's `HPSv2Reward` around a transformers
CLIPModel of OpenCLIP ViT-H-14's dimensions (hpsv2's open_clip is not installed here). With generator_weights (the
SDXL presets' DMD2 UNet) the one stand-in is the file: `load_network_weights` copies a state dict read on the host
(map_location="cpu") into the generator's own base in place, so here it does nothing and the base keeps the
teacher's values; where the base lives and what it weighs are the library's.

Computed (always). Everything is built and run on fake tensors (torch FakeTensorMode: shapes, dtypes and autograd,
no data) under a TorchDispatchMode that registers the storage of every tensor an op returns and drops it when the
storage is freed (weak references): its live bytes are what CUDA's memory_allocated() would count, tensors that
share a storage (views, chunks, in-place results) counted once, a storage kept whole while any view of it lives.
Saved-for-backward tensors, checkpoint recomputation, gradients of activations, autocast's weight casts, AdamW's
temporaries all show up as they come and go, so no activation count is summed by hand. The step's peak is taken
over the second step: the first creates the AdamW moments and the other network's gradients, which then stay.
Fake tensors have no values: `.item()` reads 1 (only the logs, the finiteness check, the prompt draw and AdamW's
step count read one). Each configuration runs in its own process.
Measured (with CUDA): the same two steps on the GPU, torch.cuda.max_memory_allocated() per phase of step 2; the
table then shows both.

Fidelity of the computation:
- Autocast: CUDA autocast runs layer_norm and group_norm in fp32 (ATen's fp32 op list), CPU autocast does not;
  those two are registered fp32 for AutocastCPU here. The other differences of the lists (pow, exp, sum, softmax)
  concern small tensors in these networks.
- Attention: fake CPU tensors take the fused CPU flash attention, which saves q, k, v, the output and the
  log-sum-exp, as CUDA's flash and memory-efficient kernels do; no L x L matrix is kept.
- AdamW is built with foreach=True, the CUDA default (its sqrt(v) temporary is as large as the trainable weights).
- Not counted (not in memory_allocated, or not modelled): the CUDA context (~0.5 GiB), cuBLAS / cuDNN workspaces
  (a cuDNN convolution at 1024^2 may ask for hundreds of MiB), fragmentation (reserved minus allocated, often
  5-15 %). So "fits 80 GB" asks for a 10 % margin under the ~79 GiB an 80 GB H100 leaves to PyTorch.
Sanity checks (run with the rest, in the output): the tracker against glibc's allocator (mallinfo2) on real CPU
tensors of a tiny UNet, fp32 and bf16 + LoRA + checkpointing; the whole step with SDXL's structure at toy widths
on fake against real CPU tensors.

Assumptions (they are the code's, read from didr/):
- Weights stay fp32 in every configuration: 'bf16' is autocast only (didr.backbones.tuning.autocast), so trainable
  weights need no fp32 master copy; AdamW keeps two fp32 moments and an fp32 gradient per trainable parameter.
- Resident as run_align builds it: the teacher; with LoRA, the generator and the fake score share the teacher's
  frozen UNet weights (Denoiser.shared_copy) and add their adapters, unless generator_weights give the generator
  a base of its own (a whole UNet copy); full fine-tuning copies the whole UNet for each; the EMA copies the
  generator's trainable parameters only (frozen ones are shared); the VAE (encoder included); both SDXL text
  encoders (load_teacher loads the whole pipeline and the adapter moves its frozen parts to the device, though
  align only reads the cached prompt embeddings); the reward.
- Gradients of both networks stay allocated between updates (zero_grad(set_to_none=True) runs just before each
  network's own backward), so each network's gradients are alive during the other's phase.
- 'ckpt' is params.finetune.gradient_checkpointing and all it does in the library: the generator and fake score,
  the teacher UNet and the VAE (diffusers' own, per resnet / transformer block and per decoder block), and DIDR's
  proxy around decode + reward (non-reentrant torch.utils.checkpoint). No script-only switch remains. What the
  library does not checkpoint: the reward inside DI++'s and DMD2's reward term (their VAE decode is).
- The reward runs in fp32 (HPSv2Reward does not autocast; the adapter's autocast ends inside decode).
- Two cached prompts live on the device here; each more training prompt costs PROMPT_BYTES (hidden states and
  pooled embedding, and the stored zero negative, fp32).

Config sources: SDXL base 1.0's unet / vae / text_encoder / text_encoder_2 / scheduler configs as published in
stabilityai/stable-diffusion-xl-base-1.0 (the unet's as dumped from snapshot 462165984030d82259a11f4367a4eed129e94a7b
in huggingface.co/jffacevedo/flax_lcm_unet/raw/cf846497fa4e693d148e9c54a7ee37a76e1062dd/config.json); the built
networks have the released parameter counts (UNet 2,567,463,684, VAE 83,653,863, text encoders 123,060,480 +
694,659,840). HPSv2's ViT-H-14 from tgxs002/HPSv2 (866735e) hpsv2/src/open_clip/model_configs/ViT-H-14.json
(vision 32 x 1280, patch 14 at 224; text 24 x 1024; embed 1024): 986,109,441 parameters as a CLIPModel.

Run: python benchmarks/memory.py [--configs ...] [--jobs 1] [--no-write]  (replaces its section of
benchmarks/RESULTS.md)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
USABLE_GIB = 79.0  # an 80 GB H100 (81559 MiB) less the CUDA context
MARGIN = 0.9  # fragmentation, cuDNN / cuBLAS workspaces
T_STAR = 0.9  # params.yaml warmup.t_star
STRENGTH = {"didr": 0.03, "dipp": 3.0, "dmd2": 1.0}  # beta, alpha_rew, reward weight; memory does not depend on it
DMD2_UNET = {"file": "models/dmd2_sdxl_1step_unet_fp16.bin"}  # presets/sdxl-didr.yaml, sdxl-dipp.yaml
PHASES = {
    "fake: sample": "fake update, generator sample (no grad)",
    "fake: update": "fake score forward, backward, AdamW",
    "gen: forward": "generator forward",
    "gen: DRP": "DIDR's proxy: teacher (CFG, grad w.r.t. x_t), VAE decode, reward, backward",
    "gen: objective": "rest of the objective: fake / teacher x0 (no grad); dipp, dmd2: reward of the decoded "
    "sample with grad",
    "gen: backward": "generator backward, AdamW, EMA",
}

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D"), "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True, "norm_num_groups": 32,
}  # fmt: skip
SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}  # fmt: skip
SDXL_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
}  # fmt: skip
SDXL_TEXT = {  # CLIP ViT-L/14 text; OpenCLIP ViT-bigG/14 text with projection
    "": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
         "hidden_act": "quick_gelu", "projection_dim": 768},
    "_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
           "hidden_act": "gelu", "projection_dim": 1280},
}  # fmt: skip
HPS_CLIP = {
    "projection_dim": 1024,
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "hidden_act": "gelu"},
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "hidden_act": "gelu"},
}  # fmt: skip
TOKENS = 77
PROMPT_BYTES = 2 * (TOKENS * 2048 + 1280) * 4


@dataclass(frozen=True)
class Setup:
    """One configuration: the method, LoRA rank (0 = full fine-tuning), precision, params.finetune's gradient
    checkpointing, and whether warmup.generator_weights give the generator initial weights of its own."""

    label: str
    method: str
    lora_rank: int
    precision: str
    checkpointing: bool
    own_base: bool = False


SETUPS = {
    "didr-lora": Setup("didr K=1, LoRA r64 + ckpt + bf16, generator from the teacher", "didr", 64, "bf16", True),
    "didr-lora-own": Setup(
        "didr K=1, LoRA r64 + ckpt + bf16, generator from its own weights", "didr", 64, "bf16", True, True
    ),
    "dipp-lora-own": Setup(
        "dipp, LoRA r64 + ckpt + bf16, generator from its own weights", "dipp", 64, "bf16", True, True
    ),
    "dmd2-lora": Setup("dmd2 + reward, LoRA r64 + ckpt + bf16, generator from the teacher", "dmd2", 64, "bf16", True),
    "didr-full": Setup("didr K=1, full FT + ckpt + bf16", "didr", 0, "bf16", True),
}


class PhaseMeter:
    """Peak allocated bytes per phase of a step. `on_step` (align's callback) restarts the record after the first
    step and notes what is allocated then (weights, AdamW moments, both networks' gradients)."""

    def __init__(self) -> None:
        self.phase, self.peaks, self.resident = "build", {}, 0

    def current(self) -> int:
        raise NotImplementedError

    def take_peak(self) -> int:
        """The peak since the last call; the next one starts from the current bytes."""
        raise NotImplementedError

    def enter(self, phase: str) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.take_peak())
        self.phase = phase

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        if step == 0:
            self.enter("between steps")
            self.peaks, self.resident = {}, self.current()


class LiveBytes(PhaseMeter, TorchDispatchMode):
    """Bytes of the live storages of the tensors ops return; with `fake`, `.item()` reads 1."""

    def __init__(self, fake: bool) -> None:
        PhaseMeter.__init__(self)
        TorchDispatchMode.__init__(self)
        self.fake, self.live, self.peak = fake, 0, 0
        self.sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def current(self) -> int:
        return self.live

    def take_peak(self) -> int:
        peak, self.peak = self.peak, self.live
        return peak

    def _free(self, size: list[int], ref: weakref.ref) -> None:
        self.live -= size[0]

    def _track(self, storage: torch.UntypedStorage) -> None:
        entry = self.sizes.get(storage)
        if entry is None:
            size = [0]
            entry = self.sizes[storage] = (size, weakref.ref(storage, partial(self._free, size)))
        size = entry[0]
        self.live += storage.nbytes() - size[0]
        size[0] = storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            return {torch.bool: True}.get(args[0].dtype, 1.0 if args[0].is_floating_point() else 1)
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out


class CudaMeter(PhaseMeter):
    """The CUDA caching allocator's own counters."""

    def current(self) -> int:
        return torch.cuda.memory_allocated()

    def take_peak(self) -> int:
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak


class Labelled:
    """Calls `fn` in phase `name`, then goes on in phase `after`."""

    def __init__(self, fn: Callable[..., Any], meter: PhaseMeter, name: str, after: str):
        self.fn, self.meter, self.name, self.after = fn, meter, name, after

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.meter.enter(self.name)
        out = self.fn(*args, **kwargs)
        self.meter.enter(self.after)
        return out


class CLIPAsOpenCLIP(nn.Module):
    """A transformers CLIPModel behind the open_clip interface HPSv2Reward reads (visual.image_size, logit_scale,
    model(pixels, tokens) -> normalised image_features / text_features)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip, self.logit_scale = clip, clip.logit_scale
        size = clip.config.vision_config.image_size
        self.visual = nn.Module()
        self.visual.image_size = (size, size)

    def forward(self, pixels: Tensor, tokens: Tensor) -> dict[str, Tensor]:
        image = self.clip.get_image_features(pixel_values=pixels).pooler_output
        text = self.clip.get_text_features(input_ids=tokens).pooler_output
        return {
            "image_features": nn.functional.normalize(image, dim=-1),
            "text_features": nn.functional.normalize(text, dim=-1),
        }


def hps_reward() -> nn.Module:
    """HPSv2Reward over an HPSv2-sized CLIP, prompts tokenised as a full window of zeros."""
    from transformers import CLIPConfig, CLIPModel

    from didr.rewards.hps import HPSv2Reward

    model = CLIPAsOpenCLIP(CLIPModel(CLIPConfig(**HPS_CLIP)))
    return HPSv2Reward(model, lambda prompts: torch.zeros(len(prompts), TOKENS, dtype=torch.long))


def sdxl_teacher(precision: str) -> nn.Module:
    """The frozen SDXL base teacher through the library's adapter builder, random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from didr.backbones.loading import denoiser_from_components

    components = {
        "unet": UNet2DConditionModel(**SDXL_UNET),
        "vae": AutoencoderKL(**SDXL_VAE),
        "scheduler": EulerDiscreteScheduler(**SDXL_SCHEDULER),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**SDXL_TEXT[""])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT["_2"])),
        "tokenizer": None,
        "tokenizer_2": None,
    }
    return denoiser_from_components("StableDiffusionXLPipeline", components, precision).frozen()


def prompt_cache(n: int) -> Any:
    """n cached training prompts as load_prompts returns them (SDXL: zero negative, stored in full)."""
    from didr.backbones.base import Conditioning

    embeds = {"hidden": torch.randn(n, TOKENS, 2048), "pooled": torch.randn(n, 1280)}
    return Conditioning([f"prompt {i}" for i in range(n)], embeds, {k: torch.zeros_like(v) for k, v in embeds.items()})


def shard_units(net: nn.Module) -> dict[str, int]:
    """The parameters fsdp gathers at once, as `Processes.shard` shards `net` (every element of an nn.ModuleList, the
    innermost first, then the whole): the largest block's own ("block") and the rest, the root's ("root")."""
    blocks = [m for lst in net.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    claimed: set[int] = set()
    largest = 0
    for block in reversed(blocks):
        own = [p for p in block.parameters() if id(p) not in claimed]
        claimed |= {id(p) for p in own}
        largest = max(largest, sum(p.numel() for p in own))
    return {"block": largest, "root": sum(p.numel() for p in net.parameters() if id(p) not in claimed)}


def n_params(*modules: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable)


def n_bytes(*modules: nn.Module) -> int:
    """Bytes of the modules' parameters and buffers, a shared storage once."""
    seen = {
        id(t.untyped_storage()): t.untyped_storage().nbytes() for m in modules for t in (*m.parameters(), *m.buffers())
    }
    return sum(seen.values())


def frozen_bytes(*modules: nn.Module) -> int:
    """Bytes of the modules' frozen parameters and buffers, a shared storage once."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if not t.requires_grad]
    return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())


def run_step(setup: Setup, meter: PhaseMeter, keep: list[Any]) -> dict[str, Any]:
    """Build the SDXL step of `setup` as run_align does and run two steps of align under `meter`; sizes and
    per-phase peaks. The networks go to `keep`."""
    from didr.backbones.tuning import checkpoint_frozen_parts
    from didr.config import AlignParams
    from didr.diffusion import UniformTime
    from didr.methods import build_objective
    from didr.objectives import FakeScoreLoss
    from didr.stages.common import new_fake, new_generator
    from didr.training.loop import align

    teacher = sdxl_teacher(setup.precision)
    if setup.checkpointing:
        checkpoint_frozen_parts(teacher)
    reward = hps_reward()
    params = {
        "warmup": {"t_star": T_STAR, "generator_weights": DMD2_UNET if setup.own_base else None},
        "finetune": {"lora_rank": setup.lora_rank, "gradient_checkpointing": setup.checkpointing},
    }
    loaded: list[dict[str, str]] = []  # the weights file's values change no byte: see the docstring
    with mock.patch("didr.stages.common.load_network_weights", lambda denoiser, spec: loaded.append(spec)):
        generator, fake = new_generator(teacher, params).train(), new_fake(teacher, params)
    assert len(loaded) == setup.own_base
    a = AlignParams(batch_size=1, fake_updates=1)
    objective = build_objective(setup.method, STRENGTH[setup.method], teacher, fake, reward, a, setup.checkpointing)
    if setup.method == "didr":
        objective.estimator = Labelled(objective.estimator, meter, "gen: DRP", "gen: objective")
    generator.register_forward_pre_hook(
        lambda module, args: meter.enter("gen: forward" if torch.is_grad_enabled() else "fake: sample")
    )
    fake_loss = FakeScoreLoss(fake, UniformTime(a.t_min, a.t_max_sampling))
    with mock.patch("torch.optim.AdamW", partial(torch.optim.AdamW, foreach=True)):
        result = align(
            generator, Labelled(objective, meter, "gen: objective", "gen: backward"), prompt_cache(2), steps=2,
            batch_size=1, fake=fake, fake_loss=Labelled(fake_loss, meter, "fake: update", "fake: update"),
            fake_updates=1, lr=a.lr, fake_lr=a.fake_lr, grad_clip=a.grad_clip, ema_decay=a.ema_decay,
            on_step=meter.on_step,
        )  # fmt: skip
    meter.enter("done")
    vae, text = teacher.frozen_parts.vae, teacher.frozen_parts.text.modules
    unet_storages = {id(p.untyped_storage()) for p in teacher.net.parameters()}
    base = [p for p in generator.parameters() if not p.requires_grad and id(p.untyped_storage()) not in unet_storages]
    sizes = {
        "unet": n_params(teacher.net),
        "vae": n_params(vae),
        "text": n_params(*text),
        "reward": n_params(reward),
        "trainable": n_params(generator, fake, trainable=True),
        "own_base": sum(p.numel() for p in base),  # frozen generator weights not shared with the teacher
        "ema": n_bytes(result.ema, generator) - n_bytes(generator),  # the EMA's own storages
        "weights": n_bytes(teacher.net, generator, fake, vae, *text, reward, result.ema),
        "frozen": frozen_bytes(teacher.net, generator, fake, vae, *text, reward),  # fp32 weights no optimizer steps
        "text_bytes": n_bytes(*text),
        **shard_units(teacher.net),
    }
    sizes["optimizer"] = 12 * sizes["trainable"]  # fp32 gradient and two fp32 moments
    keep += [teacher, generator, fake, reward, result]
    return sizes | {"resident": meter.resident, "phases": {k: v for k, v in meter.peaks.items() if k in PHASES}}


def cuda_autocast_norms() -> torch.library.Library:
    """Make CPU autocast run layer_norm and group_norm in fp32, as CUDA autocast does; keep the Library alive."""
    lib = torch.library.Library("aten", "IMPL")
    autocast_cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(op: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def kernel(*args: Any, **kwargs: Any) -> Tensor:
            with torch._C._ExcludeDispatchKeyGuard(autocast_cpu):
                return op(
                    *[a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args], **kwargs
                )

        return kernel

    for name in ("layer_norm", "group_norm"):
        lib.impl(name, fp32(getattr(torch.ops.aten, name).default), "AutocastCPU")
    return lib


def computed(setup: Setup, keep: list[Any]) -> dict[str, Any]:
    """The step on fake CPU tensors, bytes from the storage tracker."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    library = cuda_autocast_norms()
    # peft moves each adapter to its base layer's device and dtype, which all are the fake CPU and fp32 here;
    # Module.to cannot even do that on fake parameters (swap_tensors refuses them), so it is the identity here
    stay = mock.patch("torch.nn.Module.to", lambda module, *args, **kwargs: module)
    with stay, FakeTensorMode(allow_non_fake_inputs=True), LiveBytes(fake=True) as meter:
        result = run_step(setup, meter, keep)
    keep.append(library)
    return result


def measured(setup: Setup, keep: list[Any]) -> dict[str, Any]:
    """The step on the GPU with random weights; an out-of-memory error is reported with the phase it hit."""
    meter = CudaMeter()
    torch.manual_seed(0)
    device = {"device": torch.cuda.get_device_name()}
    try:
        with torch.device("cuda"):
            return run_step(setup, meter, keep) | device
    except torch.OutOfMemoryError:
        return {"oom": meter.phase, "peak": max(meter.take_peak(), *meter.peaks.values(), 0)} | device


def heap_bytes() -> int:
    """Bytes glibc's malloc has handed out and not taken back (main arena plus mmapped chunks)."""

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def malloc_check() -> list[dict[str, Any]]:
    """The tracker against glibc on real CPU tensors: bytes a tiny UNet's forward leaves allocated (saved
    activations, output) and its backward gives back (less the gradients), fp32 full vs bf16 + LoRA + checkpointing."""
    from diffusers import UNet2DConditionModel

    from didr.backbones.tuning import add_lora, autocast

    rows = []
    for precision, lora, ckpt in (("fp32", 0, False), ("bf16", 4, True)):
        with LiveBytes(fake=False) as meter:
            torch.manual_seed(0)
            net = UNet2DConditionModel(
                sample_size=32, block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            )  # fmt: skip
            if lora:
                add_lora(nn.ModuleDict({"net": net}), lora)
            if ckpt:
                net.enable_gradient_checkpointing()
            x, context = torch.randn(16, 4, 32, 32), torch.randn(16, 8, 64)
            for _ in range(2):  # the first pass fills oneDNN's caches (not tensors, and CPU-only)
                net.zero_grad(set_to_none=True)
                marks = [(meter.live, heap_bytes())]
                with autocast(precision, x.device):
                    out = net(x, torch.full((16,), 500), encoder_hidden_states=context).sample
                marks.append((meter.live, heap_bytes()))
                out.float().square().mean().backward()
                del out
                marks.append((meter.live, heap_bytes()))
        label = f"tiny UNet, {'LoRA r4' if lora else 'full'}, {precision}{', ckpt' if ckpt else ''}"
        for stage, (before, after) in zip(("forward", "backward"), itertools.pairwise(marks), strict=True):
            rows.append({"case": f"{label}, {stage}: tracker vs malloc", "computed": after[0] - before[0],
                         "reference": after[1] - before[1]})  # fmt: skip
    return rows


def fake_check(keep: list[Any]) -> list[dict[str, Any]]:
    """The whole step on fake tensors against the same step on real CPU tensors (tracker on both), with SDXL's
    structure at toy widths: the bytes of the step's peak phase."""
    shrink = [
        mock.patch.dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                        attention_head_dim=(2, 4, 4), sample_size=16),
        mock.patch.dict(SDXL_VAE, block_out_channels=(32,) * 4, sample_size=128),
        mock.patch.dict(SDXL_TEXT, {k: {**v, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                        "num_attention_heads": 2} for k, v in SDXL_TEXT.items()}),
        mock.patch.dict(HPS_CLIP, {k: {**HPS_CLIP[k], "hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 2}
                                   for k in ("vision_config", "text_config")}),
    ]  # fmt: skip
    rows = []
    with contextlib.ExitStack() as stack:
        for patch in shrink:
            stack.enter_context(patch)
        for key in ("didr-lora", "dipp-lora-own", "didr-full"):
            fake = computed(SETUPS[key], keep)["phases"]
            with LiveBytes(fake=False) as meter:
                real = run_step(SETUPS[key], meter, keep)["phases"]
            phase = max(real, key=real.get)
            rows.append({"case": f"tiny SDXL-shaped {SETUPS[key].label}, peak ({phase}): fake vs real tensors",
                         "computed": fake[phase], "reference": real[phase]})  # fmt: skip
    return rows


def fits(peak: float) -> str:
    if peak <= MARGIN * USABLE_GIB * GIB:
        return "yes"
    return "tight" if peak <= USABLE_GIB * GIB else "no"


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def table_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per configuration: the resident split, the step's peak, where it happens (the GPU's figure when
    there is one)."""
    rows = []
    for key, r in results.items():
        c, m = r["computed"], r.get("measured")
        phase, peak = max(c["phases"].items(), key=lambda kv: kv[1])
        measured = "" if m is None else (f"OOM in {m['oom']}" if "oom" in m else gib(max(m["phases"].values())))
        other = c["resident"] - c["weights"] - c["optimizer"]
        rows.append(
            f"| {SETUPS[key].label} | {c['trainable'] / 1e6:,.0f} M | {gib(c['weights'])} | {gib(c['optimizer'])} | "
            f"{gib(other)} | {gib(peak - c['resident'])} | **{gib(peak)}** | {phase} | "
            + (f"{measured} | " if m is not None else "")
            + f"{fits(peak)} |"
        )
    return rows


def weight_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per configuration: what the resident weights are made of."""
    rows = []
    for key, r in results.items():
        c = r["computed"]
        shared = 4 * (c["unet"] + c["vae"] + c["text"] + c["reward"])
        trained = 4 * c["trainable"]
        rows.append(
            f"| {SETUPS[key].label} | {gib(shared)} | {gib(4 * c['own_base'])} | {gib(trained)} | {gib(c['ema'])} | "
            f"{gib(c['weights'])} |"
        )
    return rows


def phase_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per configuration: the peak of each phase of the step."""
    return [
        f"| {SETUPS[key].label} | "
        + " | ".join(gib(r["computed"]["phases"][p]) if p in r["computed"]["phases"] else "-" for p in PHASES)
        + " |"
        for key, r in results.items()
    ]


def saving_rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """One row per configuration: the savings the library does not make yet, from the byte counts."""
    rows = []
    for key, r in results.items():
        c = r["computed"]
        peak = max(c["phases"].values())
        # the text encoders are frozen too: in bf16 off the device they save their fp32 bytes once, not twice
        both = c["text_bytes"] + (c["frozen"] - c["text_bytes"]) / 2
        rows.append(
            f"| {SETUPS[key].label} | {gib(c['text_bytes'])} | {gib(c['frozen'])} | {gib(c['frozen'] / 2)} | "
            f"{gib(both)} | {gib(peak - both)} | {fits(peak - both)} |"
        )
    return rows


def report(results: dict[str, dict[str, Any]], sanity: list[dict[str, Any]], seconds: float, device: str) -> str:
    """The RESULTS.md section: the table, the weights, peaks per phase, savings left, sanity checks, assumptions."""
    c = next(iter(results.values()))["computed"]
    measured = any("measured" in r for r in results.values())
    lines = [
        f"## SDXL didr step memory (computed), {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}, "
        f"{device}; `python benchmarks/memory.py` took {seconds:.0f} s (one configuration at a time). SDXL base 1.0 "
        f"(UNet {c['unet']:,} params, VAE {c['vae']:,}, text encoders {c['text']:,}) with an HPSv2-sized reward "
        f"({c['reward']:,}), random weights, 1024x1024 (128x128 latents), batch 1, one fake update per generator "
        "step, teacher CFG 3 (batch 2 in every teacher call). Method: the library's align step (two steps, the "
        "second one measured) on fake tensors under a storage tracker, built as `run_align` builds it "
        "(`new_generator` / `new_fake`, `checkpoint_frozen_parts`, `build_objective(..., checkpoint)`), as the "
        "script's docstring explains. 'ckpt' is params.finetune.gradient_checkpointing and everything the library "
        "does with it: generator and fake score, the frozen teacher UNet and VAE, DIDR's proxy (decode + reward "
        "recomputed in the backward); no script-only switch. 'From the teacher': warmup.generator_weights unset, "
        "so with LoRA the generator, its EMA and the fake score share the teacher's frozen UNet weights "
        "(presets/sdxl-dmd2.yaml, the Z-Image presets). 'From its own weights': warmup.generator_weights set, as "
        "presets/sdxl-didr.yaml and sdxl-dipp.yaml start from DMD2's UNet, so the generator's base is a UNet copy "
        "of its own (the file's values are not read: they change no byte). GiB = 2^30 bytes; the resident "
        "columns are what is allocated when the second step starts.",
        "",
        "| configuration | trainable | resident weights | grads + AdamW | other resident | activations + "
        "temporaries | peak GiB | peak phase | " + ("measured GiB | " if measured else "") + "fits 80 GB |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if measured else "") + "---|",
        *table_rows(results),
        "",
        "Resident weights (GiB, fp32): the frozen teacher UNet, VAE, text encoders and reward, stored once and "
        "shared; the generator's own frozen base; the trainable weights of generator and fake score (LoRA "
        "adapters, or both whole UNets); the EMA's own copy (of the generator's trainable weights).",
        "",
        "| configuration | teacher + VAE + text + reward | generator's own base | trainable | EMA | total |",
        "|---|---|---|---|---|---|",
        *weight_rows(results),
        "",
        "Peak per phase of the step (GiB, computed):",
        "",
        "| configuration | " + " | ".join(PHASES) + " |",
        "|---" * (len(PHASES) + 1) + "|",
        *phase_rows(results),
        "",
        "Phases: " + "; ".join(f"{k}: {v}" for k, v in PHASES.items()) + ".",
        "",
        "Savings not implemented (GiB, from the byte counts; not options of the library): the text encoders stay on "
        "the device through align although it reads only cached prompt embeddings; frozen weights (teacher UNet, "
        "VAE, text encoders, reward, the generator's own base) are stored fp32 and cast by autocast at each use. "
        "'Peak with both' takes both off the resident part and leaves the activations as computed (stored bf16 "
        "weights would also drop autocast's transient casts, not counted).",
        "",
        "| configuration | text encoders off the device | frozen weights fp32 | saved storing them bf16 | "
        "saved by both | peak with both | fits 80 GB |",
        "|---|---|---|---|---|---|---|",
        *saving_rows(results),
        "",
        f"Each cached training prompt adds {PROMPT_BYTES / 2**20:.2f} MiB on the device (fp32 hidden states and "
        f"pooled embedding, and the stored zero negative): 10,000 prompts {gib(10_000 * PROMPT_BYTES)} GiB.",
        "",
        "Sanity checks (MiB): the tracker against glibc's mallinfo2 on real CPU tensors (bytes a pass leaves "
        "allocated; a first pass warms oneDNN's caches), and the whole step at toy widths on fake against real "
        "CPU tensors.",
        "",
        "| check | computed | reference | difference |",
        "|---|---|---|---|",
        *(
            f"| {row['case']} | {row['computed'] / 2**20:.1f} | {row['reference'] / 2**20:.1f} | "
            f"{(row['computed'] - row['reference']) / abs(row['reference']):+.1%} |"
            for row in sanity
        ),
        "",
        "Assumptions: weights fp32 everywhere ('bf16' is autocast, so no master copy); an fp32 gradient and two "
        "fp32 AdamW moments per trainable weight (foreach AdamW, as on CUDA); resident as run_align builds it "
        "(the teacher, the VAE, both text encoders, the reward, 2 cached prompts; LoRA copies sharing the "
        "teacher's frozen weights unless the generator has initial weights of its own; the EMA of the trainable "
        "weights only); both networks' gradients alive between their updates; the reward in fp32, checkpointed "
        "only inside DIDR's proxy. Not counted: the CUDA context, cuBLAS / cuDNN workspaces, fragmentation; hence "
        f"'fits' = peak <= {MARGIN:.0%} of {USABLE_GIB:.0f} GiB, 'tight' up to {USABLE_GIB:.0f} GiB.",
        "",
    ]
    return "\n".join(lines) + "\n"


SHARDS = (1, 2, 4, 8)
SHARDED_SETUPS = ("didr-lora", "didr-full")


def per_gpu(c: dict[str, Any], shards: int) -> dict[str, float]:
    """Bytes per GPU of the computed step `c` with its trained networks sharded over `shards` processes (strategy
    fsdp; 1: one process, as computed). Sharded (1/shards each): the trainable weights, their gradients and AdamW
    moments, the EMA, the generator's own base; replicated: the teacher UNet, VAE, text encoders and reward. With
    LoRA, sharding gives the generator, its EMA and the fake score frozen bases of their own (the teacher keeps
    its whole one), 3 x the UNet / shards. Gathered at a time: the largest block's weights and gradients, and the
    root's (what no block holds) of both networks (fp32).
    The step's activations and temporaries are the computed ones (the same per-process batch), AdamW's temporaries
    included as computed for one process: an upper bound."""
    shared = 4 * (c["unet"] + c["vae"] + c["text"] + c["reward"])
    sharded = 4 * c["trainable"] + c["optimizer"] + c["ema"] + 4 * c["own_base"]
    if shards > 1 and c["own_base"] == 0 and c["trainable"] < c["unet"]:  # LoRA on the teacher's base
        sharded += 3 * 4 * c["unet"]
    gathered = 0 if shards == 1 else 2 * 4 * (c["block"] + 2 * c["root"])
    transient = max(c["phases"].values()) - c["resident"]
    return {"replicated": shared, "sharded": sharded / shards, "gathered": gathered, "transient": transient,
            "peak": shared + sharded / shards + gathered + transient}  # fmt: skip


def shard_report(results: dict[str, dict[str, Any]], seconds: float) -> str:
    """The RESULTS.md section of the memory per GPU for 1, 2, 4 and 8 shards."""
    rows = []
    for key, c in results.items():
        for shards in SHARDS:
            m = per_gpu(c, shards)
            rows.append(
                f"| {SETUPS[key].label} | {shards} | {gib(m['replicated'])} | {gib(m['sharded'])} | "
                f"{gib(m['gathered'])} | {gib(m['transient'])} | **{gib(m['peak'])}** | {fits(m['peak'])} |"
            )
    units = next(iter(results.values()))
    lines = [
        f"## SDXL step memory per GPU, sharded (computed), {datetime.date.today()}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, torch {torch.__version__}; "
        f"`python benchmarks/memory.py --shards` took {seconds:.0f} s. The step of the section above (SDXL base "
        "1.0, 1024x1024, batch 1 per process, teacher CFG 3, computed on fake tensors), its trained networks "
        "sharded over 1, 2, 4 or 8 processes with `--strategy fsdp` (FSDP2 `fully_shard` on every block and on "
        "each network: docs/pipeline.md). Per GPU: replicated (teacher UNet, VAE, text encoders, reward, fp32); "
        "sharded (trainable weights, their fp32 gradients and two AdamW moments, the EMA, and with LoRA the "
        "frozen bases the generator, its EMA and the fake score then hold of their own, each / shards); gathered "
        f"(the largest block, {units['block'] / 1e6:.1f} M parameters, and each network's root, "
        f"{units['root'] / 1e6:.1f} M, whole with their gradients while they compute); "
        "activations and temporaries as computed for one process (AdamW's foreach temporaries included undivided: "
        "an upper bound). Not counted: the CUDA context, NCCL buffers, workspaces, fragmentation. 1 shard is the "
        "step computed again today (the section above may date from older code).",
        "",
        "| configuration | shards | replicated | sharded | gathered | activations + temporaries | peak GiB | "
        "fits 80 GB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "With LoRA, sharding saves little (the adapters, their moments and the EMA are 3 GiB whole) and costs the "
        "frozen bases' shards: `ddp` is the strategy for LoRA. Full fine-tuning needs sharding: "
        f"{gib(per_gpu(results['didr-full'], 1)['peak'])} GiB on one process, under 80 GB from 2 shards on "
        "(presets/sdxl-dmd2-full-x8.yaml: 8).",
        "",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str, head: str = "## SDXL didr step memory (computed)") -> None:
    """Replace this script's section of RESULTS.md (from its heading `head` to the next one), or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    start = old.find(head)
    if start < 0:
        before, after = old, ""
    else:
        end = old.find("\n## ", start + len(head))
        before, after = old[:start], "" if end < 0 else old[end + 1 :]
    path.write_text(before.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n" + ("\n" + after if after else ""))


def child(key: str | None, mode: str) -> Any:
    """One configuration (or the sanity check) in its own process: fresh allocator counters, registrations."""
    command = [sys.executable, __file__, "--mode", mode, *(["--one", key] if key else [])]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--jobs", type=int, default=1, help="configurations computed at once (one process each)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    shards_help = "only the memory per GPU for 1, 2, 4, 8 shards (LoRA and full fine-tuning): its own section"
    parser.add_argument("--shards", action="store_true", help=shards_help)
    parser.add_argument("--one", choices=list(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("computed", "measured", "sanity"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        # Fake parameters of deep-copied modules that an optimizer stepped crash torch (2.13 at least) when they are
        # freed (heap corruption in THPVariable_clear): the process keeps its networks and leaves without freeing.
        keep: list[Any] = []
        if args.mode == "sanity":
            torch.set_num_threads(1)
            print(json.dumps(malloc_check() + fake_check(keep)), flush=True)
        else:
            print(json.dumps((computed if args.mode == "computed" else measured)(SETUPS[args.one], keep)), flush=True)
        os._exit(0)
    began = time.perf_counter()
    if args.shards:
        with ThreadPoolExecutor(args.jobs) as pool:
            steps = pool.map(partial(child, mode="computed"), SHARDED_SETUPS)
            computed_steps = dict(zip(SHARDED_SETUPS, steps, strict=True))
        text = shard_report(computed_steps, time.perf_counter() - began)
        print(text)
        if not args.no_write:
            write_section(Path(__file__).with_name("RESULTS.md"), text, "## SDXL step memory per GPU, sharded")
        return
    keys = args.configs
    with ThreadPoolExecutor(args.jobs) as pool:  # with --jobs 1: the sanity check, then one configuration at a time
        sanity = pool.submit(child, None, "sanity")
        results = {
            key: {"computed": r} for key, r in zip(keys, pool.map(partial(child, mode="computed"), keys), strict=True)
        }
    for key in keys if torch.cuda.is_available() else []:
        results[key]["measured"] = child(key, "measured")  # one at a time on the GPU
    print(json.dumps(results), flush=True)
    gpu = results[keys[0]].get("measured", {}).get("device")
    device = f"measured on {gpu}" if gpu else "no GPU: computed only"
    text = report(results, sanity.result(), time.perf_counter() - began, device)
    print(text)
    if not args.no_write:
        write_section(Path(__file__).with_name("RESULTS.md"), text)


if __name__ == "__main__":
    main()
