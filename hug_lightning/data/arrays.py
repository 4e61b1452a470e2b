"""In-memory image data sets: a uint8 tensor of images plus labels, and a transform."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Images held as one ``(N, C, H, W)`` uint8 tensor; ``transform`` runs per sample.

    Workers forked by the DataLoader share the tensor's memory (no copy per worker). Items may
    be requested as ``(index, key)``: a transform with ``wants_key = True`` then receives the
    key, which makes its randomness a function of the sample (see ``data/augment.py``).

    Args:
        images: ``(N, C, H, W)`` uint8 images.
        labels: ``(N,)`` int64 labels.
        transform: Callable on a ``(C, H, W)`` uint8 tensor, returning the model input.
        indices: Optional subset (a view: the images are not copied).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
        indices: Sequence[int] | Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) uint8 tensor, got {images.dtype} "
                             f"{tuple(images.shape)}.")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels.")
        self.images = images
        self.labels = labels.long()
        self.transform = transform
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else self.images.shape[0]

    accepts_keys = True

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        i, key = item if isinstance(item, tuple) else (item, None)
        j = int(self.indices[i]) if self.indices is not None else int(i)
        image = self.images[j]
        if self.transform is not None:
            if getattr(self.transform, "wants_key", False):
                if key is None:
                    key = int(torch.randint(0, 2**31 - 1, ()))
                image = self.transform(image, key)
            else:
                image = self.transform(image)
        return image, int(self.labels[j])

    @property
    def targets(self) -> Tensor:
        """Labels of the samples in this (sub)set, in order."""
        return self.labels if self.indices is None else self.labels[self.indices]

    def subset(self, indices: Sequence[int] | Tensor,
               transform: Callable | None = None) -> "TensorImageDataset":
        """A view on some samples (indices relative to this set), optionally re-transformed."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.indices is not None:
            idx = self.indices[idx]
        return TensorImageDataset(self.images, self.labels, transform or self.transform, idx)
