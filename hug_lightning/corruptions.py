"""CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019) of pixel images in ``[0, 1]``.

Pure functions, no Lightning; re-exported by :mod:`hug_lightning.robustness` (``from
hug_lightning.robustness import corrupt`` keeps working). Images are in **pixel space**
``[0, 1]`` (undo the data pipeline's normalization first with
:func:`hug_lightning.robustness.to_pixels`) and come back in ``[0, 1]``.

Severities 1-5 use the parameter tables of the authors' ``make_cifar_c.py``
(github.com/hendrycks/robustness), re-implemented in PyTorch: same distributions and kernels,
not the same random draws as the released ``.npy`` files. Outputs are rounded to the uint8 grid
(the released script truncates with ``np.uint8``; rounding differs by under 1/255 and is
unbiased). Severity 0 returns the input unchanged (an exact copy).

The noise corruptions take one ``torch.Generator`` for the batch, or a sequence of generators,
one per image (see :mod:`hug_lightning.image_draws`).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hug_lightning.image_draws import Generators, _draw

#: CIFAR-10-C parameters (``make_cifar_c.py``), one entry per severity 1-5.
CIFAR_C_PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],  # std of additive N(0, c^2)
    "shot_noise": [500, 250, 100, 75, 50],  # Poisson(x * c) / c
    "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],  # salt-and-pepper fraction
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # disk, alias
    "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],  # sigma (skimage: truncate 4, mode nearest)
    "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],  # (x - channel mean) * c + channel mean
    "jpeg_compression": [80, 65, 58, 50, 40],  # PIL JPEG quality
}
CORRUPTIONS = tuple(CIFAR_C_PARAMS)
#: the corruptions that draw random numbers
NOISE_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise")


def _poisson(rate: Tensor, generator: Generators) -> Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else rate.device
        return torch.poisson(rate.float().to(device), generator=generator).to(rate.device)
    return torch.stack([torch.poisson(r.float().to(g.device), generator=g).to(rate.device)
                        for r, g in zip(rate, generator, strict=True)])


def disk_kernel(radius: float, alias_blur: float) -> Tensor:
    """The defocus kernel of ``make_cifar_c.py``: a normalized disk on a 17x17 grid blurred by a
    3x3 Gaussian of std ``alias_blur`` (as ``cv2.GaussianBlur``), cropped to its support."""
    grid = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-torch.arange(-1, 2, dtype=torch.float64) ** 2 / (2 * alias_blur**2))
    g /= g.sum()
    kernel = F.conv2d(disk.view(1, 1, 17, 17), torch.outer(g, g).view(1, 1, 3, 3), padding=1)[0, 0]
    r = int(radius) + 1  # the disk spans |i| <= floor(radius); the 3x3 blur adds one pixel
    return kernel[8 - r:9 + r, 8 - r:9 + r].contiguous()


def _filter(x: Tensor, kernel: Tensor, mode: str) -> Tensor:
    """Per-channel 2-D correlation with a square kernel, ``mode`` padding (``reflect`` is
    OpenCV's default BORDER_REFLECT_101, ``replicate`` is skimage's ``nearest``)."""
    c, p = x.shape[1], kernel.shape[-1] // 2
    weight = kernel.to(x.device, x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(F.pad(x, (p, p, p, p), mode=mode), weight, groups=c)


def _jpeg(x: Tensor, quality: int) -> Tensor:
    """JPEG round trip through PIL (as ``make_cifar_c.py``), image by image on the CPU."""
    u8 = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    out = torch.empty_like(u8)
    for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, "JPEG",
                                                                         quality=int(quality))
        dec = np.asarray(Image.open(buf).convert("L" if img.shape[-1] == 1 else "RGB"))
        out[i] = torch.from_numpy(dec.reshape(img.shape).copy()).permute(2, 0, 1)
    return out.to(x.device, x.dtype) / 255


def corrupt(x: Tensor, name: str, severity: int, generator: Generators = None,
            quantize: bool = True) -> Tensor:
    """Apply a CIFAR-10-C corruption to pixel images.

    Args:
        x: Images ``(B, C, H, W)`` in ``[0, 1]`` (JPEG needs C = 1 or 3).
        name: One of :data:`CORRUPTIONS`.
        severity: 0 (identity: an exact copy of ``x``) to 5.
        generator: Random generator of the noise corruptions (any device), or one per image;
            ``None``: the global one.
        quantize: Round the result to the uint8 grid (CIFAR-10-C stores uint8 images).

    Returns:
        Corrupted images in ``[0, 1]``, same shape, device and dtype as ``x``.
    """
    if name not in CIFAR_C_PARAMS:
        raise ValueError(f"Unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}.")
    if not 0 <= int(severity) <= 5:
        raise ValueError(f"severity must be in 0..5, got {severity}.")
    if severity == 0:
        return x.clone()
    c = CIFAR_C_PARAMS[name][int(severity) - 1]
    x = x.detach()
    if name == "gaussian_noise":
        out = x + c * _draw(torch.randn, x.shape, generator, x)
    elif name == "shot_noise":
        out = _poisson(x.clamp(0, 1) * c, generator).to(x.dtype) / c
    elif name == "impulse_noise":  # skimage random_noise(mode="s&p", amount=c), per element
        flip = _draw(torch.rand, x.shape, generator, x) <= c
        salt = _draw(torch.rand, x.shape, generator, x) <= 0.5
        out = torch.where(flip, salt.to(x.dtype), x)
    elif name == "defocus_blur":
        out = _filter(x, disk_kernel(*c), "reflect")
    elif name == "gaussian_blur":
        r = int(4 * c + 0.5)
        g = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float64) ** 2 / (2 * c**2))
        g /= g.sum()
        out = _filter(x, torch.outer(g, g), "replicate")
    elif name == "contrast":
        means = x.mean(dim=(-2, -1), keepdim=True)
        out = (x - means) * c + means
    else:  # jpeg_compression: already on the uint8 grid
        return _jpeg(x.clamp(0, 1), c)
    out = out.clamp(0, 1)
    return (out * 255).round() / 255 if quantize else out


__all__ = ["CIFAR_C_PARAMS", "CORRUPTIONS", "NOISE_CORRUPTIONS", "corrupt", "disk_kernel"]
