"""L-infinity attacks (FGSM, PGD) and CIFAR-10-C-style corruptions, in pixel space ``[0, 1]``.

Pure functions (and one torchmetrics state, :class:`CorrectCounts`), no Lightning. Attacks and
corruptions take images in **pixel space** ``[0, 1]`` (undo the data pipeline's normalization
first with :func:`to_pixels`; :class:`hug_lightning.evaluation.RobustnessEvaluation` does it)
and return images in ``[0, 1]``.

Attacks. ``model_fn`` maps pixel images to the model's prediction scores (argmax = prediction).
The attack loss is the cross-entropy of those scores divided by ``temperature``,
``CE(model_fn(x) / T, y)``, maximized by signed-gradient ascent. For a cross-entropy head the
scores are the logits and ``T = 1`` is the usual attack. For the HUG head they are cosines to
the proxies, in ``[-1, 1]``: at ``T = 1`` the softmax of cosines is nearly uniform, so the loss is
close to ``mean_c cos_c - cos_y`` (a cosine-margin loss) and its gradient sign is a sensible
ascent direction (default). A small ``T`` (e.g. the fitted calibration temperature, ~0.2) is
the CE attack on calibrated probabilities; it saturates on confidently right samples, and on
a small trained HUG model it was no stronger than ``T = 1`` (FGSM at 8/255). Both attacks use only ``torch.autograd.grad`` with respect to
the input: model parameters never receive ``.grad``. They work under ``torch.no_grad`` and
``torch.inference_mode`` (gradients are re-enabled locally on cloned inputs).

Corruptions (Hendrycks & Dietterich, ICLR 2019). Severities 1-5 use the parameter tables of the
authors' ``make_cifar_c.py`` (github.com/hendrycks/robustness), re-implemented in PyTorch: same
distributions and kernels, not the same random draws as the released ``.npy`` files. Outputs
are rounded to the uint8 grid (the released script truncates with ``np.uint8``; rounding differs
by under 1/255 and is unbiased). Severity 0 returns the input unchanged (an exact copy).

Random draws (PGD's start, the noise corruptions) take one ``torch.Generator`` for the batch, or
a sequence of generators, one per image: each image's draws then come from its own generator
only, whatever batch it is in (:func:`image_generators` keys them by image content).
"""

from __future__ import annotations

import hashlib
import io
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchmetrics import Metric

ModelFn = Callable[[Tensor], Tensor]
#: one generator for the batch, one per image, or None (the global one)
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def image_generators(pixels: Tensor, seed: int, tag: str) -> list[torch.Generator]:
    """One CPU generator per image, seeded by ``(seed, tag, the image's uint8 content)``.

    Draws made with them are the same for an image whatever its batch, its position in it, the
    eval batch size or the number of processes (identical images share their draws).
    """
    u8 = (pixels.detach().float() * 255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    prefix = f"{int(seed)}/{tag}/".encode()
    out = []
    for img in u8.numpy():
        digest = hashlib.blake2b(prefix + img.tobytes(), digest_size=8).digest()
        out.append(torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))
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


class CorrectCounts(Metric):
    """Correct-prediction counts of several evaluations (clean, attacks, corruptions) of the same
    samples: integer sum states, so the DDP all-reduce is exact."""

    full_state_update = False

    def __init__(self, num: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Tensor, count: int) -> None:  # type: ignore[override]
        self.correct += correct.to(self.correct.device)
        self.total += count

    def compute(self) -> Tensor:
        """Accuracies; NaN when no sample was counted (not a 0 that reads as a measurement)."""
        return self.correct.double() / self.total.double()


# --------------------------------------------------------------------------- normalization
def _stats(like: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    shape = (1, -1) + (1,) * (like.dim() - 2)
    m = torch.tensor(tuple(mean), device=like.device, dtype=torch.float32).view(shape)
    return m, torch.tensor(tuple(std), device=like.device, dtype=torch.float32).view(shape)


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalized images ``(B, C, H, W)`` -> pixels ``clamp(x * std + mean, 0, 1)``, float32."""
    m, s = _stats(x, mean, std)
    return (x.float() * s + m).clamp(0, 1)


def from_pixels(p: Tensor, mean: Sequence[float], std: Sequence[float],
                dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel images -> normalized ``(p - mean) / std`` in ``dtype``."""
    m, s = _stats(p, mean, std)
    return ((p.float() - m) / s).to(dtype)


# --------------------------------------------------------------------------- attacks
def _input_gradient(model_fn: ModelFn, x: Tensor, y: Tensor,
                    temperature: float) -> tuple[Tensor, Tensor]:
    """Gradient of ``sum_i CE(model_fn(x_i) / T, y_i)`` w.r.t. ``x`` only, and the scores."""
    x = x.detach().requires_grad_(True)
    scores = model_fn(x)
    loss = F.cross_entropy(scores.float() / temperature, y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad, scores.detach()


def _check(eps: float, temperature: float) -> None:
    if eps < 0 or temperature <= 0:
        raise ValueError(f"eps must be >= 0 and temperature > 0, got {eps} and {temperature}.")


def fgsm(model_fn: ModelFn, x: Tensor, y: Tensor, eps: float,
         temperature: float = 1.0) -> Tensor:
    """Fast gradient sign method: ``clamp(x + eps * sign(grad_x CE(model_fn(x) / T, y)), 0, 1)``.

    Args:
        model_fn: Pixel images ``(B, C, H, W)`` in ``[0, 1]`` -> scores ``(B, K)``.
        x: Clean images in ``[0, 1]``.
        y: Labels ``(B,)``.
        eps: L-infinity radius in pixel units (``8 / 255`` ...); 0 returns a copy of ``x``.
        temperature: Divides the scores inside the cross-entropy (see the module docstring).

    Returns:
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in ``[0, 1]``.
    """
    _check(eps, temperature)
    with torch.inference_mode(False), torch.enable_grad():
        x0, y0 = x.detach().clone().clamp_(0, 1), y.detach().clone()
        if eps == 0:
            return x0
        grad, _ = _input_gradient(model_fn, x0, y0, temperature)
        return (x0 + eps * grad.sign()).clamp_(0, 1).detach()


def pgd(model_fn: ModelFn, x: Tensor, y: Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, random_start: bool = True,
        generator: Generators = None, temperature: float = 1.0,
        early_stop: bool = True) -> Tensor:
    """Projected gradient descent (Madry et al. 2018), L-infinity, signed steps.

    Args:
        model_fn: Pixel images ``(B, C, H, W)`` in ``[0, 1]`` -> scores ``(B, K)``.
        x: Clean images in ``[0, 1]``.
        y: Labels ``(B,)``.
        eps: L-infinity radius in pixel units; 0 returns a copy of ``x``.
        steps: Number of gradient steps.
        step_size: Step length; ``None``: ``eps / 4``.
        random_start: Start from a uniform point of the eps-ball (drawn with ``generator``).
        generator: Random generator of the start (any device), or one per image; ``None``:
            the global one.
        temperature: Divides the scores inside the cross-entropy (see the module docstring).
        early_stop: Keep, per sample, the first iterate the model misclassifies (the sample is
            counted as broken however later steps move); ``False`` returns the last iterate.

    Returns:
        Adversarial images, detached, with ``|x_adv - x| <= eps`` and values in ``[0, 1]``.
    """
    _check(eps, temperature)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    alpha = eps / 4 if step_size is None else float(step_size)
    with torch.inference_mode(False), torch.enable_grad():
        x0, y0 = x.detach().clone().clamp_(0, 1), y.detach().clone()
        if eps == 0:
            return x0
        lo, hi = (x0 - eps).clamp_(min=0), (x0 + eps).clamp_(max=1)
        x_adv = x0.clone()
        if random_start:
            u = _draw(torch.rand, x0.shape, generator, x0)
            x_adv = torch.minimum(torch.maximum(x0 + (2 * u - 1) * eps, lo), hi)
        done = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        frozen = x_adv.clone()
        for _ in range(steps):
            grad, scores = _input_gradient(model_fn, x_adv, y0, temperature)
            if early_stop:
                newly = (scores.argmax(-1) != y0) & ~done
                frozen[newly] = x_adv[newly]
                done |= newly
            x_adv = torch.minimum(torch.maximum(x_adv + alpha * grad.sign(), lo), hi).detach()
        if early_stop:
            x_adv = torch.where(done.view(-1, *[1] * (x0.dim() - 1)), frozen, x_adv)
        return x_adv.detach()


# --------------------------------------------------------------------------- corruptions
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


__all__ = ["CIFAR_C_PARAMS", "CORRUPTIONS", "NOISE_CORRUPTIONS", "CorrectCounts", "corrupt", "disk_kernel", "fgsm",
           "from_pixels", "image_generators", "pgd", "to_pixels"]
