"""Reference Inception features of real images (a folder or a list file), saved as safetensors, and FID / KID of a
sample set's features against them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor
from tqdm import tqdm

from didr.evaluation.inception import NAME, FeatureInputError, FIDInception
from didr.training.atomic import write_atomically

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Reference:
    """Features [N, 2048] (float32) of N real images center-cropped and resized to `size` x `size`, and the extractor
    and weights file (sha256) that computed them."""

    features: Tensor
    extractor: str
    weights_sha256: str
    size: int


def image_paths(source: Path) -> list[Path]:
    """The images of a folder (recursively, sorted by path) or of a list file (one path a line, relative to the list
    file's folder; blank lines skipped); FeatureInputError naming `source` if it is missing or lists none."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif source.is_file():
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = [source.parent / line.strip() for line in lines if line.strip()]
    else:
        raise FeatureInputError(f"{source}: no such image folder or list file")
    if not paths:
        raise FeatureInputError(f"{source}: no images")
    return paths


def load_image(path: Path, size: int) -> Tensor:
    """An image [3, size, size] in [0, 1]: RGB, the largest centered crop of the target's aspect ratio, resized with
    PIL's (antialiased) bicubic filter."""
    try:
        with Image.open(path) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)
    except OSError as error:
        raise FeatureInputError(f"{path}: not a readable image ({error})") from None
    return torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1).float() / 255


def compute_features(model: FIDInception, paths: list[Path], size: int, batch: int = 50, workers: int = 4) -> Tensor:
    """Features [N, 2048] (float32, on the CPU) of the images at `paths`, read by `workers` threads and passed through
    the model (on its device) `batch` at a time, with a progress bar."""
    device = next(model.parameters()).device
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    out = []
    with ThreadPoolExecutor(workers) as pool, torch.no_grad():
        for chunk in tqdm(chunks, desc="Inception features", unit="batch"):
            images = torch.stack(list(pool.map(lambda p: load_image(p, size), chunk)))
            out.append(model.features(images.to(device)).float().cpu())
    return torch.cat(out)


def build_reference(source: Path, model: FIDInception, size: int, batch: int = 50) -> Reference:
    """The reference features of the images of `source` (see image_paths) at `size` x `size`."""
    features = compute_features(model, image_paths(source), size, batch)
    return Reference(features, NAME, model.weights_sha256, size)


def save_reference(reference: Reference, path: Path) -> None:
    """Write `features` [N, 2048] float32 as safetensors, with extractor, weights_sha256, images and size as metadata,
    atomically."""
    metadata = {
        "extractor": reference.extractor,
        "weights_sha256": reference.weights_sha256,
        "images": str(len(reference.features)),
        "size": str(reference.size),
    }
    tensors = {"features": reference.features.float().contiguous()}
    write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_reference(path: Path, model: FIDInception | None = None) -> Reference:
    """A reference saved by save_reference; FeatureInputError naming the file if it is missing, unreadable, malformed,
    or (given `model`) computed by another extractor or other weights."""
    path = Path(path)
    if not path.is_file():
        raise FeatureInputError(f"{path}: reference features not found")
    try:
        with safe_open(path, "pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
            features = f.get_tensor("features") if keys == {"features"} else None
    except (SafetensorError, OSError) as error:
        raise FeatureInputError(f"{path}: not a readable safetensors file ({error})") from None
    fields = ("extractor", "weights_sha256", "images", "size")
    if features is None or any(k not in meta for k in fields):
        raise FeatureInputError(f"{path}: not a reference file (tensors {sorted(keys)}, metadata {sorted(meta)})")
    if features.ndim != 2 or features.shape[1] != 2048 or features.shape[0] != int(meta["images"]):
        raise FeatureInputError(f"{path}: features of shape {tuple(features.shape)} for {meta['images']} images")
    reference = Reference(features.float(), meta["extractor"], meta["weights_sha256"], int(meta["size"]))
    if model is not None and (reference.extractor, reference.weights_sha256) != (NAME, model.weights_sha256):
        raise FeatureInputError(
            f"{path}: computed by {reference.extractor} with weights {reference.weights_sha256[:12]}, "
            f"not {NAME} with weights {model.weights_sha256[:12]}"
        )
    return reference
