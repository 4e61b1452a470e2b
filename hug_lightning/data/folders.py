"""Class-folder image trees (``<split>/<class>/<image>``): scanning, decoding, clear errors.

Used by the CIFAR image-folder layout (decoded once into a uint8 tensor) and by the ImageNet
subsets (decoded per sample). Labels are indices of the sorted class-folder names.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2.functional import resize, to_dtype

from hug_lightning.data.base import BadDataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class CorruptImageError(BadDataError):
    """An image file could not be decoded (the message names the file)."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of ``split_dir`` (the class names)."""
    return sorted(e.name for e in os.scandir(split_dir)
                  if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(
    split_dir: Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, int]]]:
    """List ``(path, label)`` of the images under ``split_dir/<class>/``.

    Args:
        split_dir: Folder holding one sub-folder per class.
        classes: Class folder names to use, in label order; ``None`` takes all, sorted.

    Returns:
        The class names (label order) and the samples sorted by class, then file name.
    """
    split_dir = Path(split_dir)
    names = list(classes) if classes is not None else find_classes(split_dir)
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(names):
        folder = split_dir / name
        files = sorted(
            e.name for e in os.scandir(folder)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        samples.extend((folder / f, label) for f in files)
    return names, samples


def warn_unequal_classes(samples: Sequence[tuple[Path, int]], classes: Sequence[str],
                         split_dir: Path, name: str) -> None:
    """Warn when the class folders of a balanced data set (CIFAR) hold unequal numbers of images.

    Args:
        samples: ``(path, label)`` pairs of :func:`scan_class_folders`.
        classes: Class names in label order.
        split_dir: The folder scanned (named in the warning).
        name: The data set's name.
    """
    counts = Counter(label for _, label in samples)
    per_class = [counts.get(c, 0) for c in range(len(classes))]
    usual = max(sorted(set(per_class), reverse=True), key=per_class.count)
    odd = [f"{classes[c]}: {n}" for c, n in enumerate(per_class) if n != usual]
    if odd:
        rank_zero_warn(
            f"The class folders of {split_dir} hold unequal numbers of images "
            f"({', '.join(odd[:10])}{', ...' if len(odd) > 10 else ''}; the others {usual}), "
            f"where {name} has as many in every class: a partial extraction or copy? Complete "
            "it (re-extract the archive); this run goes on with the images there (a "
            "long-tailed profile is scaled down if a class cannot fill its share).")


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, raising :class:`CorruptImageError` naming the file on failure."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"Cannot read image file {path}: {err}. Replace the file, or pass "
            "--data.init_args.on_corrupt skip to skip unreadable images (they are listed)."
        ) from err


def read_rgb_tensor(path: Path) -> torch.Tensor:
    """Decode an image file into a ``(3, H, W)`` uint8 tensor.

    Uses torchvision's decoders (libjpeg-turbo, libpng: several times faster than PIL on small
    images) and falls back to PIL for other formats; raises :class:`CorruptImageError`. A
    16-bit PNG (decoded as uint16) is scaled to uint8 (copied into a uint8 tensor as it was,
    its values wrapped around: 32767 became 255).
    """
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)
    except (RuntimeError, ValueError):
        img = load_rgb(path)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_to_tensor(
    samples: Sequence[tuple[Path, int]],
    size: int,
    on_corrupt: Literal["raise", "skip"] = "raise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode small images into a ``(N, 3, size, size)`` uint8 tensor and ``(N,)`` labels.

    Images whose size differs from ``size`` are resized (bilinear, antialiased). Corrupt
    files raise, or are skipped with a warning that lists them when ``on_corrupt="skip"``.
    """
    images = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    keep: list[int] = []
    bad: list[str] = []
    for i, (path, _) in enumerate(samples):
        try:
            img = read_rgb_tensor(path)
        except CorruptImageError:
            if on_corrupt == "raise":
                raise
            bad.append(str(path))
            continue
        if img.shape[-2:] != (size, size):
            img = resize(img, [size, size], antialias=True)
        images[len(keep)] = img
        keep.append(i)
    if bad:
        log.warning("Skipped %d unreadable image(s): %s", len(bad), ", ".join(bad[:20]))
    labels = torch.tensor([samples[i][1] for i in keep], dtype=torch.long)
    return images[: len(keep)].clone() if bad else images, labels
