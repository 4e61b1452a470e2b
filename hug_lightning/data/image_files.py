"""Image files decoded per sample, in the DataLoader workers: :class:`ImageFileDataset`.

Used by the ImageNet subsets (:mod:`hug_lightning.data.imagenet`, which re-exports it); the
files and labels come from :func:`~hug_lightning.data.folders.scan_class_folders`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hug_lightning.data.folders import CorruptImageError, read_rgb_tensor

log = logging.getLogger(__name__)


class ImageFileDataset(Dataset):
    """Image files decoded per sample into ``(3, H, W)`` uint8 tensors, then ``transform``.

    Paths are held in one NumPy bytes array, which forked DataLoader workers share without
    copying (a list of strings gets copied page by page as its refcounts change). Items may be
    ``(index, key)``: the transform's random draws then depend on the key only (resumable).

    Args:
        samples: ``(path, label)`` pairs.
        transform: Callable on the uint8 image tensor (``None``: the tensor itself).
        on_corrupt: ``raise`` :class:`CorruptImageError` naming the file, or ``skip``: warn
            once per file and return the next readable image of the same class instead.
    """

    def __init__(self, samples: Sequence[tuple[str | Path, int]],
                 transform: Callable[[Tensor], Tensor] | None = None,
                 on_corrupt: Literal["raise", "skip"] = "raise") -> None:
        self._paths = np.array([os.fsencode(p) for p, _ in samples] or [b""])[:len(samples)]
        self.labels = self.targets = torch.tensor([int(y) for _, y in samples], dtype=torch.long)
        self.transform, self.on_corrupt, self._warned = transform, on_corrupt, set()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def paths(self) -> list[str]:  # file paths, in order
        return [os.fsdecode(p) for p in self._paths]

    def subset(self, indices: Sequence[int] | Tensor,
               transform: Callable[[Tensor], Tensor] | None = None) -> "ImageFileDataset":
        """The samples at ``indices``, with another ``transform``."""
        idx = torch.as_tensor(indices, dtype=torch.long).numpy()
        return ImageFileDataset(list(zip(self._paths[idx], self.labels[idx].tolist())),
                                transform, self.on_corrupt)

    def path(self, i: int) -> Path:  # file of sample i
        return Path(os.fsdecode(self._paths[i]))

    def _read(self, i: int) -> Tensor:
        try:
            return read_rgb_tensor(self.path(i))  # the error names the file
        except CorruptImageError:
            if self.on_corrupt == "raise":
                raise
        if i not in self._warned:  # once per file and worker
            self._warned.add(i)
            log.warning("Unreadable image %s replaced by another of its class.", self.path(i))
        same = (self.labels == self.labels[i]).nonzero().flatten().tolist()
        for j in same[same.index(i) + 1:] + same[:same.index(i)]:
            try:
                return read_rgb_tensor(self.path(j))
            except CorruptImageError:
                continue
        raise CorruptImageError(
            f"Every image of class {int(self.labels[i])} ({self.path(i).parent}) is unreadable, "
            f"e.g. {self.path(i)}: on_corrupt skip has none to use instead. Replace the files, "
            "or leave the class out of the subset.")

    accepts_keys = True  # EpochShardSampler gives (index, key): the key seeds the augmentation

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        i, key = item if isinstance(item, tuple) else (item, None)
        image = self._read(i)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[], enabled=key is not None):
                if key is not None:  # the draws become a function of (seed, epoch, index)
                    torch.default_generator.manual_seed(int(key))  # CPU only: CUDA untouched
                image = self.transform(image)
        return image, int(self.labels[i])
