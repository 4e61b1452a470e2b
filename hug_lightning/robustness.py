"""L-infinity attacks (FGSM, PGD) in pixel space ``[0, 1]``, and the pixel-space conversions.

Pure functions (and one torchmetrics state, :class:`CorrectCounts`), no Lightning. Attacks take
images in **pixel space** ``[0, 1]`` (undo the data pipeline's normalization first with
:func:`to_pixels`; :class:`hug_lightning.evaluation.RobustnessEvaluation` does it) and return
images in ``[0, 1]``. The CIFAR-10-C corruptions live in :mod:`hug_lightning.corruptions` and
the per-image random draws in :mod:`hug_lightning.image_draws`; both are re-exported here
(``from hug_lightning.robustness import corrupt, image_generators`` keeps working).

Attacks. ``model_fn`` maps pixel images to the model's prediction scores (argmax = prediction).
The attack loss is the cross-entropy of those scores divided by ``temperature``,
``CE(model_fn(x) / T, y)``, maximized by signed-gradient ascent. For a cross-entropy head the
scores are the logits and ``T = 1`` is the usual attack. For the HUG head they are cosines to
the proxies, in ``[-1, 1]``: at ``T = 1`` the softmax of cosines is nearly uniform, so the loss is
close to ``mean_c cos_c - cos_y`` (a cosine-margin loss) and its gradient sign is a sensible
ascent direction (default). A small ``T`` (e.g. the fitted calibration temperature, ~0.2) is
the CE attack on calibrated probabilities; it saturates on confidently right samples, and on
a small trained HUG model it was no stronger than ``T = 1`` (FGSM at 8/255). Both attacks use
only ``torch.autograd.grad`` with respect to the input: model parameters never receive
``.grad``. They work under ``torch.no_grad`` and ``torch.inference_mode`` (gradients are
re-enabled locally on cloned inputs).

Random draws (PGD's start) take one ``torch.Generator`` for the batch, or a sequence of
generators, one per image: each image's draws then come from its own generator only, whatever
batch it is in (:func:`image_generators` keys them by image content).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from hug_lightning.corruptions import (CIFAR_C_PARAMS, CORRUPTIONS, NOISE_CORRUPTIONS, corrupt,
                                       disk_kernel)
from hug_lightning.image_draws import Generators, _draw, image_digests, image_generators

ModelFn = Callable[[Tensor], Tensor]


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


def cast_toward(a: Tensor, x: Tensor) -> Tensor:
    """``a`` in ``x``'s dtype, rounded toward ``x`` where rounding to nearest moves it away.

    For half-precision inputs (``bf16-true``): ``|result - x| <= |a - x|`` elementwise, so a
    perturbation computed in float32 does not grow in the cast (rounding to nearest added up to
    half a bf16 step, ~0.5/255 in pixels). Differentiable in ``a`` (the correction is constant).
    """
    r = a.to(x.dtype)
    if r.dtype == a.dtype:
        return r
    with torch.no_grad():
        wide = torch.promote_types(a.dtype, torch.float32)
        rw, xw = r.to(wide), x.to(wide)
        away = (rw - xw).abs() > (a.to(wide) - xw).abs()
        fix = torch.where(away, torch.nextafter(r, x), r) - r  # one step toward x
    return r + fix


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
        step_size: Step length, positive, in pixel units; ``None``: ``eps / 4``.
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
    if step_size is not None and not alpha > 0:
        raise ValueError(f"step_size must be positive (pixel units, e.g. 2 / 255) or None "
                         f"(eps / 4), got {step_size}.")
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


__all__ = ["CIFAR_C_PARAMS", "CORRUPTIONS", "NOISE_CORRUPTIONS", "CorrectCounts",
           "cast_toward", "corrupt", "disk_kernel", "fgsm", "from_pixels", "image_digests",
           "image_generators", "pgd", "to_pixels"]
