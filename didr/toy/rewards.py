"""The embedded world's rewards, built to behave like the real ones (CLIP score, HPS / ImageReward, aesthetics).

Every reward maps images [B, 3, H, W] in [0, 1] and toy prompts to scores [B], differentiably in the images, with
tensor-only preprocessing (bilinear resize to the trained size, then to [-1, 1]).

- `AlignmentScorer` (CLIP-score analogue): a small CNN with one classification head per attribute;
  r = (1/4) sum_a log p_a(prompt's value of a | image).
- `PreferenceModel` (HPS analogue): a prompt-conditioned CNN trained with the Bradley-Terry loss on pairs judged by
  a simulated human, whose hidden utility is `HiddenUtility`; hackable by gradient ascent, like the real ones.
- `AestheticReward`: analytic, r = mean chroma + luminance contrast; hackable by oversaturation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from didr.toy.data import ATTRIBUTES, VOCAB, all_labels, make_dataset, parse_prompt, prompt_of, render, sample_labels
from didr.training.atomic import atomic_dir

LUMA = (0.299, 0.587, 0.114)
CLASSES = tuple(len(VOCAB[a]) for a in ATTRIBUTES)


def _labels(prompts: Sequence[str]) -> Tensor:
    """Attribute indices [B, 4] of toy prompts."""
    return torch.stack([parse_prompt(p) for p in prompts])


def _one_hot(labels: Tensor) -> Tensor:
    """Concatenated attribute one-hots [B, sum(CLASSES)] of labels [B, 4]."""
    return torch.cat([F.one_hot(labels[:, i], n) for i, n in enumerate(CLASSES)], dim=1).float()


def _luma(images: Tensor) -> Tensor:
    return (images * images.new_tensor(LUMA)[:, None, None]).sum(1)


def saturation(images: Tensor) -> Tensor:
    """Mean chroma, mean over pixels of max_c x - min_c x, [B]."""
    return (images.amax(1) - images.amin(1)).mean((1, 2))


def contrast(images: Tensor) -> Tensor:
    """Luminance contrast, the standard deviation over pixels of 0.299 R + 0.587 G + 0.114 B, [B]."""
    return _luma(images).flatten(1).std(1)


def blur(images: Tensor) -> Tensor:
    """The 3x3 binomial blur [1, 2, 1]^T [1, 2, 1] / 16 per channel, replicate padding."""
    k = images.new_tensor([1.0, 2.0, 1.0])
    kernel = (k[:, None] * k[None] / 16).expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


def high_frequency(images: Tensor) -> Tensor:
    """High-frequency energy, mean |x - blur(x)|, [B]: about 0.018 on clean toy images, 0.038 with noise 0.05."""
    return (images - blur(images)).abs().mean((1, 2, 3))


class AestheticReward:
    """r(x) = saturation(x) + contrast(x): mean chroma (max_c - min_c) plus luminance std. Hackable by oversaturation:
    pure primaries on a black-and-white pattern maximise it."""

    def __call__(self, images: Tensor, prompts: Sequence[str] | None = None) -> Tensor:
        return saturation(images) + contrast(images)


class HiddenUtility:
    """The simulated human's utility u(x, p), the toy world's gold reward:

    u = -2 log(1 + rmse(x, T_p) / 0.05) + 2 (1 - exp(-sat / 0.1)) + (1 - exp(-contrast / 0.1))
        - 2 |log((hf + 0.005) / (hf_data + 0.005))|,

    with T_p the prompt's template (the mean of 16 jittered renders) and hf_data the renders' mean high-frequency
    energy (0.018 at 16 px), so alignment, saturation and contrast have diminishing returns and detail is best at the
    clean data's level (blur and noise both cost)."""

    def __init__(self, size: int = 16):
        generator = torch.Generator().manual_seed(0)
        labels = all_labels()
        renders = (torch.stack([render(labels, size, generator) for _ in range(16)]) + 1) / 2
        self.templates = renders.mean(0)
        self.data_detail = high_frequency(renders.flatten(0, 1)).mean().item()
        self.size = size
        self._index = {tuple(row.tolist()): i for i, row in enumerate(labels)}

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        images = _resize(images, self.size)
        rows = [self._index[tuple(row.tolist())] for row in _labels(prompts)]
        rmse = ((images - self.templates[rows].to(images)) ** 2).mean((1, 2, 3)).sqrt()
        align = -2 * torch.log1p(rmse / 0.05)
        aesthetic = 2 * (1 - torch.exp(-saturation(images) / 0.1)) + (1 - torch.exp(-contrast(images) / 0.1))
        detail = -2 * torch.log((high_frequency(images) + 0.005) / (self.data_detail + 0.005)).abs()
        return align + aesthetic + detail


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class _Trunk(nn.Module):
    """3x3 conv -> two stride-2 convs -> h; f = SiLU(Linear([flatten(h), max over positions of h])), [B, features]:
    the flattened map keeps where things are, the max-pool what they are wherever they are."""

    def __init__(self, size: int, width: int, features: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.linear = nn.Linear(2 * width * ((size + 3) // 4) ** 2 + 2 * width, features)

    def forward(self, images: Tensor) -> Tensor:
        h = self.convs(images)
        return F.silu(self.linear(torch.cat([h.flatten(1), h.amax((2, 3))], 1)))


class AlignmentScorer(nn.Module):
    """r(x, p) = (1/4) sum_a log softmax(head_a(f(x)))[p_a]: the mean log-probability of the prompt's attributes.

    Log-probability rather than probability: it is log-linear in the logits like a CLIP score, and its gradient does
    not vanish on images that are far from the prompt (a probability saturates at 0 there)."""

    def __init__(self, size: int = 16, width: int = 32, features: int = 128):
        super().__init__()
        self.config: dict[str, Any] = {"kind": "alignment", "size": size, "width": width, "features": features}
        self.trunk = _Trunk(size, width, features)
        self.heads = nn.ModuleList(nn.Linear(features, n) for n in CLASSES)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate activations [B, features] of images in [0, 1]: the toy world's FID / KID / diversity space."""
        return self.trunk(_resize(images, self.config["size"]) * 2 - 1)

    def logits(self, images: Tensor) -> list[Tensor]:
        """One logit tensor [B, n_a] per attribute, in ATTRIBUTES order."""
        feats = self.features(images)
        return [head(feats) for head in self.heads]

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        labels = _labels(prompts).to(images.device)
        logps = [F.log_softmax(lg, 1).gather(1, labels[:, i : i + 1])[:, 0] for i, lg in enumerate(self.logits(images))]
        return torch.stack(logps, 1).mean(1)


class PreferenceModel(nn.Module):
    """s(x, p) = w^T SiLU(A [f(x), f(x) * E onehot(p), E onehot(p)]) + b, trained by Bradley-Terry:
    P(x_a preferred to x_b) = sigmoid(s(x_a, p) - s(x_b, p))."""

    def __init__(self, size: int = 16, width: int = 32, features: int = 128):
        super().__init__()
        self.config: dict[str, Any] = {"kind": "preference", "size": size, "width": width, "features": features}
        self.trunk = _Trunk(size, width, features)
        self.embed = nn.Linear(sum(CLASSES), features)
        self.head = nn.Sequential(nn.Linear(3 * features, features), nn.SiLU(), nn.Linear(features, 1))

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        feats = self.trunk(_resize(images, self.config["size"]) * 2 - 1)
        cond = self.embed(_one_hot(_labels(prompts)).to(feats))
        return self.head(torch.cat([feats, feats * cond, cond], 1))[:, 0]


def _augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mild generator-like artefacts on [0, 1] images: a random blur mix and Gaussian noise of std up to 0.08."""
    n = images.shape[0]
    amount, sigma = torch.rand(2, n, 1, 1, 1, generator=generator)
    images = (1 - amount * 0.8) * images + amount * 0.8 * blur(images)
    return (images + 0.08 * sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)


def _perturb(labels: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Renders of `labels` in [0, 1] with random human-visible flaws: one wrong attribute (p = 0.25), saturation and
    contrast scaled by log-uniform factors, a colour shift, blur and noise (p = 0.3 each)."""
    n = labels.shape[0]
    u = torch.rand(n, 8, generator=generator)
    wrong = labels.clone()
    attribute = torch.randint(4, (n,), generator=generator)
    for i, classes in enumerate(CLASSES):
        pick = (u[:, 0] < 0.25) & (attribute == i)
        wrong[pick, i] = (wrong[pick, i] + torch.randint(1, classes, (n,), generator=generator)[pick]) % classes
    x = (render(wrong, size, generator) + 1) / 2
    luma = _luma(x)[:, None]
    x = luma + torch.exp(-1.2 + 1.8 * u[:, 1])[:, None, None, None] * (x - luma)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + torch.exp(-0.7 + 1.1 * u[:, 2])[:, None, None, None] * (x - mean)
    shift = 0.08 * torch.randn(n, 3, 1, 1, generator=generator)
    x = x + (u[:, 3] < 0.3)[:, None, None, None] * shift
    blurred = blur(blur(x))
    x = torch.where((u[:, 4] < 0.3)[:, None, None, None], x + u[:, 5, None, None, None] * (blurred - x), x)
    noise = 0.12 * u[:, 6, None, None, None] * torch.randn(x.shape, generator=generator)
    return (x + (u[:, 7] < 0.3)[:, None, None, None] * noise).clamp(0, 1)


def preference_pairs(
    n: int, size: int, generator: torch.Generator, utility: HiddenUtility
) -> tuple[Tensor, Tensor, list[str], Tensor, Tensor]:
    """n pairs for shared prompts: (images a, images b, prompts, utility gap u_a - u_b, human choice 1[a preferred]),
    the human choosing a with probability sigmoid(u_a - u_b) (logistic noise on the utilities)."""
    labels = sample_labels(n, generator)
    prompts = [prompt_of(row) for row in labels]
    a, b = _perturb(labels, size, generator), _perturb(labels, size, generator)
    gap = utility(a, prompts) - utility(b, prompts)
    choice = (torch.rand(n, generator=generator) < torch.sigmoid(gap)).float()
    return a, b, prompts, gap, choice


def gradient_ascent(reward: nn.Module, images: Tensor, prompts: Sequence[str], steps: int, lr: float) -> Tensor:
    """Projected Adam ascent on r(x, p) over the pixels, kept in [0, 1]: how a reward is hacked."""
    x = images.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        (-reward(x, prompts).sum()).backward()
        optimiser.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()


def train_alignment(
    size: int = 16, seed: int = 0, steps: int = 1200, batch: int = 64, lr: float = 3e-3
) -> tuple[AlignmentScorer, dict[str, float]]:
    """Cross-entropy on fresh augmented renders every step; held-out accuracy per attribute on clean and augmented
    `make_dataset` images of another seed."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AlignmentScorer(size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        labels = sample_labels(batch, generator)
        images = _augment((render(labels, size, generator) + 1) / 2, generator)
        loss = cast(Tensor, sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(model.logits(images))))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval().requires_grad_(False)
    held_out = make_dataset(2000, size, seed=10_000 + seed)
    clean = (held_out.images + 1) / 2
    metrics = {}
    for name, images in (("clean", clean), ("augmented", _augment(clean, generator))):
        for i, lg in enumerate(model.logits(images)):
            metrics[f"accuracy_{name}_{ATTRIBUTES[i]}"] = (lg.argmax(1) == held_out.labels[:, i]).float().mean().item()
    return model, metrics


def _bt_loss(model: PreferenceModel, a: Tensor, b: Tensor, prompts: Sequence[str], choice: Tensor) -> Tensor:
    """Bradley-Terry: -log sigmoid(+-(s_a - s_b)), the sign given by the human's choice."""
    return F.binary_cross_entropy_with_logits(model(a, prompts) - model(b, prompts), choice)


def train_preference(
    size: int = 16, seed: int = 0, steps: int = 800, batch: int = 64, lr: float = 3e-3
) -> tuple[PreferenceModel, dict[str, float]]:
    """Bradley-Terry on fresh simulated-human pairs every step; held-out BT loss before / after, accuracy against the
    human's noisy choices and against the hidden utility's order, and the noisy choices' ceiling E[max(q, 1 - q)]."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    utility = HiddenUtility(size)
    held_out = preference_pairs(2000, size, torch.Generator().manual_seed(20_000 + seed), utility)
    model = PreferenceModel(size)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps, pct_start=0.1)
    a, b, prompts, gap, choice = held_out
    with torch.no_grad():
        initial = _bt_loss(model, a, b, prompts, choice).item()
    for _ in range(steps):
        ta, tb, tprompts, _, tchoice = preference_pairs(batch, size, generator, utility)
        loss = _bt_loss(model, ta, tb, tprompts, tchoice)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval().requires_grad_(False)
    margin = model(a, prompts) - model(b, prompts)
    q = torch.sigmoid(gap)
    return model, {
        "bt_loss_initial": initial,
        "bt_loss_final": F.binary_cross_entropy_with_logits(margin, choice).item(),
        "pair_accuracy_human": ((margin > 0).float() == choice).float().mean().item(),
        "pair_accuracy_utility": ((margin > 0) == (gap > 0)).float().mean().item(),
        "pair_accuracy_human_ceiling": torch.maximum(q, 1 - q).mean().item(),
    }


def hack_report(model: PreferenceModel, size: int = 16, seed: int = 0, steps: int = 200) -> dict[str, float]:
    """Gradient ascent (`gradient_ascent`, lr 0.01) on the preference model from 64 data images: its score against the
    best of 1000 other data images, and what the hidden utility, saturation and high-frequency energy do meanwhile."""
    data = make_dataset(64, size, seed=30_000 + seed)
    before = (data.images + 1) / 2
    after = gradient_ascent(model, before, data.prompts, steps, lr=0.01)
    utility = HiddenUtility(size)
    report = {}
    for name, x in (("before", before), ("after", after)):
        with torch.no_grad():
            report[f"score_{name}"] = model(x, data.prompts).mean().item()
            report[f"utility_{name}"] = utility(x, data.prompts).mean().item()
            report[f"saturation_{name}"] = saturation(x).mean().item()
            report[f"high_frequency_{name}"] = high_frequency(x).mean().item()
    reference = make_dataset(1000, size, seed=40_000 + seed)
    with torch.no_grad():
        report["score_data_max"] = model((reference.images + 1) / 2, reference.prompts).max().item()
    return report


def save_toy_reward(model: AlignmentScorer | PreferenceModel, folder: str | Path) -> None:
    """folder/{model.safetensors, config.json} (the architecture, its kind and the toy vocabulary), no pickles."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    config = {**model.config, "vocab": VOCAB}
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


def train_toy_rewards(
    out_dir: str | Path,
    seed: int = 0,
    size: int = 16,
    progress: bool = True,
    alignment_steps: int = 1200,
    preference_steps: int = 800,
) -> dict:
    """Train the alignment scorer and the preference model and write, atomically (a temporary folder, then a rename),
    out_dir/{alignment,preference}/{model.safetensors,config.json} and out_dir/metrics.json; return the metrics.
    Runs on one intra-op thread (restored after): these nets are tiny, and extra OpenMP threads on a busy machine
    made them up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_toy_rewards(Path(out_dir), seed, size, progress, alignment_steps, preference_steps)
    finally:
        torch.set_num_threads(threads)


def _train_toy_rewards(
    out_dir: Path, seed: int, size: int, progress: bool, alignment_steps: int, preference_steps: int
) -> dict:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"seed": seed, "size": size}
    start = time.perf_counter()
    alignment, metrics["alignment"] = train_alignment(size, seed, steps=alignment_steps)
    metrics["alignment"]["seconds"] = time.perf_counter() - start
    if progress:
        print(f"alignment scorer: {json.dumps(metrics['alignment'])}", flush=True)
    start = time.perf_counter()
    preference, metrics["preference"] = train_preference(size, seed, steps=preference_steps)
    metrics["preference"]["seconds"] = time.perf_counter() - start
    metrics["preference_hack"] = hack_report(preference, size, seed)
    if progress:
        print(f"preference model: {json.dumps(metrics['preference'])}", flush=True)
        print(f"preference hack: {json.dumps(metrics['preference_hack'])}", flush=True)
    with atomic_dir(out_dir) as tmp:
        save_toy_reward(alignment, tmp / "alignment")
        save_toy_reward(preference, tmp / "preference")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def load_toy_reward(name: str, folder: str | Path) -> AlignmentScorer | PreferenceModel:
    """The frozen, eval-mode 'alignment' or 'preference' model from a `train_toy_rewards` folder."""
    kinds: dict[str, type[AlignmentScorer | PreferenceModel]] = {
        "alignment": AlignmentScorer,
        "preference": PreferenceModel,
    }
    if name not in kinds:
        raise ValueError(f"unknown toy reward {name!r}; trained ones: {sorted(kinds)}")
    path = Path(folder) / name
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.pop("vocab") != {k: list(v) for k, v in VOCAB.items()} or config.pop("kind") != name:
        raise ValueError(f"{path} was trained for another toy vocabulary or reward kind; retrain it")
    model = kinds[name](**config)
    model.load_state_dict(load_file(path / "model.safetensors"))
    return model.eval().requires_grad_(False)
