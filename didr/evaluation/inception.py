"""The FID Inception-v3 (pool3, 2048-d): TensorFlow's 2015-12-05 graph as ported by pytorch-fid, in plain torch.nn.

Same modules, state-dict keys and forward as pytorch-fid's `fid_inception_v3` (torchvision's Inception3 with the FID
patches: average pools that exclude padding in Mixed_5*, 6b-e and 7b, a max pool in Mixed_7c) cut at the final average
pool, and pytorch-fid's preprocessing: bilinear resize to 299x299 (align_corners=False, no antialias), then 2x - 1.
Weights come from a local file, never a download: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (95,628,359
bytes, sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2; the same file as torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`) or a safetensors file of the same state dict. The classifier `fc.*` and
BatchNorm `num_batches_tracked` entries of that file are accepted and ignored.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn


class FeatureInputError(ValueError):
    """A missing or malformed feature-extractor or reference file; the one-line message names the file."""


NAME = "pytorch-fid-inception-v3-pool3"
SIZE = 299
IGNORED_KEYS = ("fc.weight", "fc.bias")


class _Conv(nn.Module):
    """torchvision's BasicConv2d: bias-free convolution, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool(kind: str, x: Tensor) -> Tensor:
    if kind == "avg":  # TensorFlow's average pool ignores the zero padding
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.max_pool2d(x, 3, stride=2)  # "reduce"


class _Mixed(nn.Module):
    """An Inception block: named convolutions, and branches whose outputs are concatenated along channels. A branch
    is a list of steps: a convolution's name, a pool ("avg", "max", "reduce"), or a tuple of names applied to the same
    input and concatenated (Mixed_7's split 1x3 / 3x1 convolutions)."""

    def __init__(self, convs: dict[str, tuple], branches: list[list]):
        super().__init__()
        for name, args in convs.items():
            self.add_module(name, _Conv(*args))
        self.branches = branches

    def forward(self, x: Tensor) -> Tensor:
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, tuple):
                    y = torch.cat([self.get_submodule(name)(y) for name in step], 1)
                elif step in ("avg", "max", "reduce"):
                    y = _pool(step, y)
                else:
                    y = self.get_submodule(step)(y)
            outputs.append(y)
        return torch.cat(outputs, 1)


def _mixed_a(cin: int, pool: int) -> _Mixed:
    convs = {
        "branch1x1": (cin, 64, 1),
        "branch5x5_1": (cin, 48, 1),
        "branch5x5_2": (48, 64, 5, 1, 2),
        "branch3x3dbl_1": (cin, 64, 1),
        "branch3x3dbl_2": (64, 96, 3, 1, 1),
        "branch3x3dbl_3": (96, 96, 3, 1, 1),
        "branch_pool": (cin, pool, 1),
    }
    dbl = ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]
    return _Mixed(convs, [["branch1x1"], ["branch5x5_1", "branch5x5_2"], dbl, ["avg", "branch_pool"]])


def _mixed_b(cin: int) -> _Mixed:
    convs = {
        "branch3x3": (cin, 384, 3, 2),
        "branch3x3dbl_1": (cin, 64, 1),
        "branch3x3dbl_2": (64, 96, 3, 1, 1),
        "branch3x3dbl_3": (96, 96, 3, 2),
    }
    return _Mixed(convs, [["branch3x3"], ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], ["reduce"]])


def _mixed_c(cin: int, c7: int) -> _Mixed:
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
    convs = {
        "branch1x1": (cin, 192, 1),
        "branch7x7_1": (cin, c7, 1),
        "branch7x7_2": (c7, c7, row[0], 1, row[1]),
        "branch7x7_3": (c7, 192, col[0], 1, col[1]),
        "branch7x7dbl_1": (cin, c7, 1),
        "branch7x7dbl_2": (c7, c7, col[0], 1, col[1]),
        "branch7x7dbl_3": (c7, c7, row[0], 1, row[1]),
        "branch7x7dbl_4": (c7, c7, col[0], 1, col[1]),
        "branch7x7dbl_5": (c7, 192, row[0], 1, row[1]),
        "branch_pool": (cin, 192, 1),
    }
    single = ["branch7x7_1", "branch7x7_2", "branch7x7_3"]
    double = [f"branch7x7dbl_{i}" for i in range(1, 6)]
    return _Mixed(convs, [["branch1x1"], single, double, ["avg", "branch_pool"]])


def _mixed_d(cin: int) -> _Mixed:
    convs = {
        "branch3x3_1": (cin, 192, 1),
        "branch3x3_2": (192, 320, 3, 2),
        "branch7x7x3_1": (cin, 192, 1),
        "branch7x7x3_2": (192, 192, (1, 7), 1, (0, 3)),
        "branch7x7x3_3": (192, 192, (7, 1), 1, (3, 0)),
        "branch7x7x3_4": (192, 192, 3, 2),
    }
    seven = [f"branch7x7x3_{i}" for i in range(1, 5)]
    return _Mixed(convs, [["branch3x3_1", "branch3x3_2"], seven, ["reduce"]])


def _mixed_e(cin: int, pool: str) -> _Mixed:
    convs = {
        "branch1x1": (cin, 320, 1),
        "branch3x3_1": (cin, 384, 1),
        "branch3x3_2a": (384, 384, (1, 3), 1, (0, 1)),
        "branch3x3_2b": (384, 384, (3, 1), 1, (1, 0)),
        "branch3x3dbl_1": (cin, 448, 1),
        "branch3x3dbl_2": (448, 384, 3, 1, 1),
        "branch3x3dbl_3a": (384, 384, (1, 3), 1, (0, 1)),
        "branch3x3dbl_3b": (384, 384, (3, 1), 1, (1, 0)),
        "branch_pool": (cin, 192, 1),
    }
    split = ("branch3x3_2a", "branch3x3_2b")
    dbl = ["branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")]
    return _Mixed(convs, [["branch1x1"], ["branch3x3_1", split], dbl, [pool, "branch_pool"]])


def preprocess(images: Tensor) -> Tensor:
    """pytorch-fid's input transform of images [N, 3, H, W] in [0, 1]: bilinear resize to 299x299 (align_corners=False,
    no antialias), then scaling to [-1, 1]."""
    resized = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return 2 * resized - 1


class FIDInception(nn.Module):
    """Inception-v3 up to the 2048-d average pool (pool3), with the FID patches. `weights_sha256` names the loaded
    weights file (empty until `load_inception` fills it)."""

    def __init__(self):
        super().__init__()
        self.weights_sha256 = ""
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, 1, 1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _mixed_a(192, 32)
        self.Mixed_5c = _mixed_a(256, 64)
        self.Mixed_5d = _mixed_a(288, 64)
        self.Mixed_6a = _mixed_b(288)
        self.Mixed_6b = _mixed_c(768, 128)
        self.Mixed_6c = _mixed_c(768, 160)
        self.Mixed_6d = _mixed_c(768, 160)
        self.Mixed_6e = _mixed_c(768, 192)
        self.Mixed_7a = _mixed_d(768)
        self.Mixed_7b = _mixed_e(1280, "avg")
        self.Mixed_7c = _mixed_e(2048, "max")

    def forward(self, x: Tensor) -> Tensor:
        """pool3 features [N, 2048] of preprocessed images [N, 3, 299, 299] in [-1, 1]."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))

    def features(self, images: Tensor) -> Tensor:
        """pool3 features [N, 2048] (float32) of images [N, 3, H, W] in [0, 1]."""
        return self(preprocess(images))


def _read_state(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FeatureInputError(f"{path}: Inception weights not found (expected pt_inception-2015-12-05-6726825d.pth)")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise FeatureInputError(f"{path}: not a readable weights file ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FeatureInputError(f"{path}: not a state dict of tensors")
    return state


def load_inception(path: Path, device: str | torch.device = "cpu") -> FIDInception:
    """The FID Inception with weights from `path` (.pth state dict or .safetensors), in eval mode, without gradients;
    FeatureInputError naming the file if it is missing, unreadable, or of another architecture."""
    path = Path(path)
    state = _read_state(path)
    model = FIDInception()
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    extra = sorted(k for k in set(state) - set(own) if k not in IGNORED_KEYS and not k.endswith("num_batches_tracked"))
    missing = sorted(set(own) - set(state))
    if missing or extra:
        raise FeatureInputError(f"{path}: weights of another model (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, value in own.items():
        if state[key].shape != value.shape:
            raise FeatureInputError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    model.weights_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return model.eval().requires_grad_(False).to(device)
