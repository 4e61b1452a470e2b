"""Keyed CIFAR augmentation: padded random crop and horizontal flip as a pure function.

Each training sample's crop offsets and flip are a hash of ``(seed, epoch, sample index)``
instead of draws from a global random state. Consequences:

* the CPU path (per sample, in DataLoader workers) and the device-resident path (per batch, on
  the GPU) produce *identical* augmentations for the same seed and epoch;
* results do not depend on ``num_workers`` or on how batches are split across processes;
* a run interrupted mid-epoch and resumed sees exactly the images it would have seen.

The hash works on non-negative 31-bit integers in int64 arithmetic (no overflow), so it gives
the same numbers on every device. Offsets are uniform on ``0..2*pad`` and the flip a fair coin,
as in torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``; padding is
zeros (black), also as torchvision's default.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_M31 = 0x7FFFFFFF
_MULT = 0x45D9F3B


def mix31(x: Tensor) -> Tensor:
    """Integer hash of non-negative int64 values below 2**31 (result in the same range)."""
    x = x & _M31
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * _MULT) & _M31
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, index: Tensor) -> Tensor:
    """One 31-bit key per sample index for ``(seed, epoch)`` (seeds of any size: the bits above
    the 31st are hashed in, so seed ``2**31`` does not repeat seed 0's keys)."""
    base = mix31(torch.tensor(seed & _M31, dtype=torch.int64))
    high = seed >> 31  # Python int: arbitrary size (negative seeds too)
    while high:
        base = mix31(base ^ mix31(torch.tensor((high & _M31) ^ 0x5BD1E995, dtype=torch.int64)))
        high >>= 31
        if high == -1:  # the sign of a negative seed, folded in once
            base = mix31(base ^ 0x27D4EB2F)
            break
    base = mix31(base ^ (epoch & _M31))
    return mix31(base.to(index.device) ^ (index.to(torch.int64) & _M31))


def crop_flip_params(keys: Tensor, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Crop offsets ``dx, dy`` in ``[0, 2 pad]`` and a boolean ``flip`` for each key."""
    span = 2 * pad + 1
    dx = mix31(keys ^ 0x1234567) % span
    dy = mix31(keys ^ 0x2345678) % span
    flip = (mix31(keys ^ 0x3456789) & 1).bool()
    return dx, dy, flip


def pad_crop_flip(images: Tensor, dx: Tensor, dy: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Vectorised zero-padded crop and flip of a ``(B, C, H, W)`` batch (one gather)."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy.view(b, 1) + ar_h.view(1, h)  # (B, H)
    cols = torch.where(flip.view(b, 1), dx.view(b, 1) + (w - 1 - ar_w).view(1, w),
                       dx.view(b, 1) + ar_w.view(1, w))  # (B, W)
    flat = rows.view(b, h, 1) * (w + 2 * pad) + cols.view(b, 1, w)  # (B, H, W)
    gathered = padded.flatten(2).gather(2, flat.view(b, 1, h * w).expand(b, c, h * w))
    return gathered.view(b, c, h, w)


def channel_stats(mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
                  device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``mean`` and ``std`` as float32 ``(C, 1, 1)`` tensors on ``device`` (for :func:`normalize`).

    Make them once per loader: ``torch.tensor(list, device="cuda")`` copies from pageable host
    memory and waits for the GPU, which per batch would stall the stream every step.
    """
    def column(values: Sequence[float] | Tensor) -> Tensor:
        return torch.as_tensor(values, dtype=torch.float32).to(device).view(-1, 1, 1)

    return column(mean), column(std)


def normalize(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
              dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``(B, C, H, W)`` or ``(C, H, W)`` -> ``(x / 255 - mean) / std`` in ``dtype``.

    ``mean`` / ``std`` are sequences or the tensors of :func:`channel_stats` (same numbers).
    """
    if isinstance(mean, Tensor) and isinstance(std, Tensor):
        m, s = mean, std
    else:
        m, s = channel_stats(mean, std, images.device)
    return ((images.to(torch.float32) / 255.0 - m) / s).to(dtype)


class KeyedCropFlip:
    """Per-sample transform ``(image uint8 (C,H,W), key) -> normalized float tensor``.

    Args:
        mean: Per-channel mean (of images scaled to [0, 1]).
        std: Per-channel standard deviation.
        pad: Zero padding before the random crop (0 disables the crop).
        flip: Apply the random horizontal flip.
    """

    wants_key = True

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 4,
                 flip: bool = True) -> None:
        self.mean, self.std, self.pad, self.flip = tuple(mean), tuple(std), int(pad), bool(flip)

    def __call__(self, image: Tensor, key: Tensor | int) -> Tensor:
        keys = torch.as_tensor([int(key)], dtype=torch.int64)
        dx, dy, flip = crop_flip_params(keys, self.pad)
        if not self.flip:
            flip = torch.zeros_like(flip)
        out = pad_crop_flip(image.unsqueeze(0), dx, dy, flip, self.pad)[0]
        return normalize(out, self.mean, self.std)
