"""Random draws keyed per image: the same numbers for an image whatever batch it is in.

The randomized parts of the robustness evaluation (PGD's random start in
:mod:`hug_lightning.robustness`, the noise corruptions in :mod:`hug_lightning.corruptions`)
take one ``torch.Generator`` for the batch, or a sequence of generators, one per image: each
image's draws then come from its own generator only. :func:`image_generators` keys such
generators by image content (:func:`image_digests`, once per batch); :func:`_draw` draws with
either form. Pure torch, no Lightning.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence, Union

import torch
from torch import Tensor

#: one generator for the batch, one per image, or None (the global one)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def image_digests(pixels: Tensor) -> list[bytes]:
    """A content digest per image (of its uint8 pixels): compute it once per batch and key every
    draw of that batch from it (:func:`image_generators`)."""
    u8 = (pixels.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in u8.numpy()]


def image_generators(images: Tensor | Sequence[bytes], seed: int,
                     tag: str) -> list[torch.Generator]:
    """One CPU generator per image, seeded by ``(seed, tag, the image's uint8 content)``.

    Args:
        images: Pixel images ``(B, C, H, W)`` in ``[0, 1]``, or their :func:`image_digests`
            (several tags for one batch: hash the pixels once).
        seed: Seed of the evaluation.
        tag: What the draws are for (an attack and radius, a corruption and severity).

    Draws made with them are the same for an image whatever its batch, its position in it, the
    eval batch size or the number of processes (identical images share their draws).
    """
    digests = image_digests(images) if isinstance(images, Tensor) else images
    prefix = f"{int(seed)}/{tag}/".encode()
    out = []
    for digest in digests:
        key = hashlib.blake2b(prefix + digest, digest_size=8).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
    return out


def _draw(fn: Callable[..., Tensor], shape: torch.Size, generator: Generators,
          like: Tensor) -> Tensor:
    """``fn(shape)`` (``torch.rand``/``randn``) drawn on the generators' device, image by image
    for a sequence of generators, returned on ``like``'s device and dtype."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else like.device
        out = fn(shape, generator=generator, device=device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} images.")
        out = torch.stack([fn(shape[1:], generator=g, device=g.device) for g in generator])
    return out.to(like.device, like.dtype)


__all__ = ["Generators", "image_digests", "image_generators"]
