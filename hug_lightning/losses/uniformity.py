"""Inter-class hyperspherical-uniformity terms on the class proxies (MHE, MHS, MGD).

Every public function takes proxies ``weight`` ``(K, d)`` of any scale (rows are L2-normalized
inside) and returns a scalar, float32 for half/float32 inputs and float64 for float64. All pairwise
quantities come from one ``K x K`` Gram matrix through ``||a - b||^2 = 2 - 2 <a, b>``; the diagonal
is handled by an in-place fill (no index selection, no data-dependent shape, no host sync), and
the gradients are written by hand (custom autograd Functions: a handful of kernels instead of the
dozens that op-by-op autograd launches). ``torch.compile`` can trace them; double backward is not
supported.

``eps`` is, throughout the package, a floor on squared norms and squared distances: a row with
``||w||^2 < eps`` is divided by ``sqrt(eps)`` instead of its norm (finite value and gradient at a
zero row; such a row is not a unit vector, and its "squared distances" stay ``2 - 2 <a, b>``,
close to 2 to every other row, not the true ``||a - b||^2``), and the Riesz energy uses
``max(||w_c - w_c'||^2, floor)``, so coincident proxies get a large finite penalty
(``floor^(-s/2)``, or ``-0.5 log floor`` for ``s = 0``) instead of being dropped or producing
Inf/NaN; the gradient through a clamped entry is 0. The distance floor is
``max(eps, 64 * machine epsilon)`` (:func:`distance_floor`): ``2 - 2 <a, b>`` carries a rounding
error of about ``1e-7`` in float32, so below ``7.6e-6`` a float32 distance is noise (a
``1e-8`` floor would turn that noise into penalties and gradients of ``1e5``-``1e7`` in random
directions); in float64 the floor is ``eps`` itself.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class InterSpec(NamedTuple):
    """Which inter-class term, with its options (see :class:`~hug_lightning.losses.HUGConfig`)."""

    variant: str = "mhe"
    energy_s: int = 2
    reduction: str = "mean"
    mhs_mode: str = "hard"
    mhs_tau: float = 0.1
    mgd_jitter: float = 1e-6
    mgd_normalize: bool = True
    eps: float = 1e-8


def as_loss_dtype(x: Tensor) -> Tensor:
    """Upcast half-precision tensors to float32; float32/float64 pass through unchanged."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """A context that turns autocast off, or a no-op when it is already off (cheaper)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def l2_normalize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Rows divided by ``max(||x_i||, sqrt(eps))`` (plain autograd; upcasts bf16/fp16)."""
    x = as_loss_dtype(x)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(math.sqrt(eps))


def distance_floor(eps: float, dtype: torch.dtype) -> float:
    """Floor on squared distances of unit rows: ``eps``, raised to 64 machine epsilons of
    ``dtype`` (``7.6e-6`` in float32, where ``2 - 2 <a, b>`` has a rounding error of ~``1e-7``)."""
    return max(eps, 64.0 * torch.finfo(dtype).eps)


def check_eps(eps: float, where: str) -> None:
    """``ValueError`` unless ``eps`` is a positive finite number."""
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
            and 0 < eps < math.inf):
        raise ValueError(f"{where}: eps must be a positive finite number, got {eps!r}.")


def pairwise_sq_distances(unit: Tensor) -> Tensor:
    """Squared distances ``2 - 2 <u_c, u_c'>`` of unit rows, ``(K, K)``, from one Gram matrix."""
    return torch.rsub(unit @ unit.T, 2.0, alpha=2.0)


def unit_forward(x: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Normalized rows, raw norms and clamped norms (for :func:`unit_backward`); no autograd."""
    nrm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    den = nrm.clamp_min(math.sqrt(eps))
    return x / den, nrm, den


def unit_backward(g: Tensor, y: Tensor, nrm: Tensor, den: Tensor, eps: float) -> Tensor:
    """Gradient through ``y = x / max(||x||, sqrt(eps))``: ``(g - y <y, g>) / ||x||``, or
    ``g / sqrt(eps)`` on rows where the floor is active."""
    dot = torch.where(nrm >= math.sqrt(eps), (g * y).sum(dim=-1, keepdim=True), 0.0)
    return torch.addcmul(g, y, dot, value=-1.0).div_(den)


def inter_forward(w: Tensor, spec: InterSpec) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Value of the inter term of unit rows ``w`` and the state its gradient needs."""
    k = w.shape[0]
    d2 = pairwise_sq_distances(w)
    if spec.variant == "mhe":
        s = spec.energy_s
        d2.diagonal().fill_(1.0 if s == 0 else math.inf)  # f(diag) = 0 exactly
        d2.clamp_min_(distance_floor(spec.eps, d2.dtype))
        e = d2.reciprocal() if s == 2 else d2.rsqrt() if s == 1 else d2.log().mul_(-0.5)
        scale = 1.0 / (k * (k - 1)) if spec.reduction == "mean" else 0.5
        return e.sum() * scale, (d2,)
    if spec.variant == "mhs" and spec.mhs_mode == "hard":
        d2.diagonal().fill_(math.inf)
        m = d2.amin()
        return -m, (d2, m)
    if spec.variant == "mhs":  # soft-min over unordered pairs = full off-diagonal minus log 2
        z = d2.mul_(-1.0 / spec.mhs_tau)
        z.diagonal().fill_(-math.inf)
        lse = torch.logsumexp(z.flatten(), dim=0)
        return (lse - math.log(2.0)) * spec.mhs_tau, (z, lse)
    d2.diagonal().fill_(0.0)  # mgd: Gaussian-kernel Gram matrix, float64 LU
    a = d2.double().neg_().exp_()
    a.diagonal().add_(spec.mgd_jitter)
    lu, piv, _ = torch.linalg.lu_factor_ex(a)
    value = -lu.diagonal().abs().log().sum()
    if spec.mgd_normalize:
        value = value / k
    return value.to(w.dtype), (a, lu, piv)


def inter_backward(
    w: Tensor, state: tuple[Tensor, ...], spec: InterSpec, coef: Tensor, out: Tensor | None = None
) -> Tensor:
    """Gradient of ``coef * inter`` with respect to the unit rows ``w``: ``-2 (F + F^T) w``.

    ``F = d inter / d D^2``; ``out`` optionally receives the result (a ``(K, d)`` view).
    """
    k = w.shape[0]
    if spec.variant == "mhe":
        (d2,) = state
        s = spec.energy_s
        # -f'(d2) up to a constant, 0 where clamped: threshold sends d2 <= eps to inf
        d2 = torch.threshold(d2, distance_floor(spec.eps, d2.dtype), math.inf)
        f = d2.pow(-2.0) if s == 2 else d2.pow(-1.5) if s == 1 else d2.reciprocal()
        if s == 0:
            f.diagonal().zero_()
        scale = 1.0 / (k * (k - 1)) if spec.reduction == "mean" else 0.5
        const = 2.0 * scale * (1.0 if s == 2 else 0.5)  # -2 * f' * scale / f
        out = torch.addmm(w, f + f.T, w, beta=0.0, alpha=const, out=out)
        return out.mul_(coef)
    elif spec.variant == "mhs" and spec.mhs_mode == "hard":
        d2, m = state
        ties = (d2 == m).to(w.dtype)
        f = ties * (coef * 2.0 / ties.sum())  # d(-min)/dD2 = -ties / n_ties
    elif spec.variant == "mhs":
        z, lse = state
        f = (z - lse).exp_().mul_(coef * 2.0)  # d(value)/dD2 = -softmax
    else:
        a, lu, piv = state
        eye = torch.eye(k, dtype=a.dtype, device=a.device)
        inv = torch.linalg.lu_solve(lu, piv, eye)
        f = inv.T * a  # d(-logdet)/dD2 = A^{-T} o A off the diagonal
        f.diagonal().zero_()
        f = f.to(w.dtype) * (coef * (-2.0 / k if spec.mgd_normalize else -2.0))
    return torch.mm(f + f.T, w, out=out)


class _InterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, spec: InterSpec) -> Tensor:
        w, nrm, den = unit_forward(as_loss_dtype(weight), spec.eps)
        value, state = inter_forward(w, spec)
        ctx.spec, ctx.dtype = spec, weight.dtype
        ctx.save_for_backward(w, nrm, den, *state)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        w, nrm, den, *state = ctx.saved_tensors
        with no_autocast(w.device.type):
            gw = inter_backward(w, tuple(state), ctx.spec, g)
            return unit_backward(gw, w, nrm, den, ctx.spec.eps).to(ctx.dtype), None


def inter_loss(weight: Tensor, spec: InterSpec) -> Tensor:
    """The inter term selected by ``spec`` (validated by the caller)."""
    if weight.dim() != 2 or weight.shape[0] < 2 or not weight.is_floating_point():
        raise ValueError(
            f"proxies must be a floating (K, d) matrix with K >= 2, got shape "
            f"{tuple(weight.shape)} and dtype {weight.dtype}."
        )
    check_eps(spec.eps, "inter-class term")
    with no_autocast(weight.device.type):
        return _InterFunction.apply(weight, spec)


def riesz_energy(
    weight: Tensor, s: int = 2, reduction: Literal["mean", "sum"] = "mean", eps: float = 1e-8
) -> Tensor:
    """MHE: Riesz s-energy of the normalized proxies over the ``K(K-1)/2`` unordered pairs.

    Args:
        weight: Proxies ``(K, d)``, any scale.
        s: 2 (released HUG: ``1/||w_c - w_c'||^2``), 1 (``1/||w_c - w_c'||``) or 0 (log energy
            ``log(1/||w_c - w_c'||)``).
        reduction: ``"mean"`` (the HUG form) or ``"sum"`` over unordered pairs.
        eps: Floor on squared norms and squared distances (positive; see
            :func:`distance_floor` for the float32 floor on distances).

    Returns:
        Scalar energy (lower is more uniform).
    """
    if s not in (0, 1, 2) or isinstance(s, bool):
        raise ValueError(f"riesz_energy: s must be 0, 1 or 2, got {s!r}.")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"riesz_energy: reduction must be 'mean' or 'sum', got {reduction!r}.")
    return inter_loss(weight, InterSpec("mhe", energy_s=s, reduction=reduction, eps=eps))


def mhs_loss(weight: Tensor, mode: Literal["hard", "soft"] = "hard", tau: float = 0.1,
             eps: float = 1e-8) -> Tensor:
    """MHS (maximum hyperspherical separation, Tammes): ``-min_{c<c'} ||w_c - w_c'||^2``.

    ``mode="hard"`` is the authors' form: only the arg-min pair gets gradient (split evenly over
    exact ties). ``mode="soft"`` is NOT the authors' form: the smooth surrogate
    ``-softmin = tau * logsumexp_{c<c'}(-||w_c - w_c'||^2 / tau)``, an upper bound of the hard loss
    that tends to it as ``tau -> 0`` and gives every pair a softmax-weighted gradient.

    Args:
        weight: Proxies ``(K, d)``, any scale.
        mode: ``"hard"`` (authors') or ``"soft"`` (smooth surrogate).
        tau: Soft-min temperature, positive (``mode="soft"`` only).
        eps: Floor on squared norms.

    Returns:
        Scalar loss (lower is more separated).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"mhs_loss: mode must be 'hard' or 'soft', got {mode!r}.")
    if not tau > 0:
        raise ValueError(f"mhs_loss: tau must be positive, got {tau}.")
    return inter_loss(weight, InterSpec("mhs", mhs_mode=mode, mhs_tau=tau, eps=eps))


def mgd_loss(weight: Tensor, jitter: float = 1e-6, normalize: bool = True,
             eps: float = 1e-8) -> Tensor:
    """MGD (maximum Gram determinant): ``-logdet(G + jitter I)``, ``G_cc' = exp(-|w_c - w_c'|^2)``.

    The log-determinant comes from an LU factorization in float64 (no failure, no host sync; the
    Gaussian-kernel matrix is positive definite for distinct proxies, and ``jitter > 0`` keeps it
    so when proxies coincide). Normalization is not given by the paper: ``normalize=True`` (the
    package default) divides by ``K``, a per-class quantity whose scale, like the pair mean of MHE,
    does not grow with ``K``; ``normalize=False`` is the plain ``-logdet`` (the form of the
    closed-form values at the simplex). Cost: the most expensive variant, an LU factorization
    and a solve of a ``K x K`` float64 matrix per step (about 3 ms of GPU time on an H200 at
    ``K = 1000``).

    Args:
        weight: Proxies ``(K, d)``, any scale.
        jitter: Added to the diagonal, ``>= 0`` (0 only for exact-value checks).
        normalize: Divide by ``K`` (default) or not.
        eps: Floor on squared norms.

    Returns:
        Scalar loss (lower is more uniform).
    """
    if not jitter >= 0:
        raise ValueError(f"mgd_loss: jitter must be >= 0, got {jitter}.")
    return inter_loss(weight, InterSpec("mgd", mgd_jitter=jitter, mgd_normalize=normalize, eps=eps))


__all__ = ["InterSpec", "as_loss_dtype", "distance_floor", "l2_normalize", "mgd_loss", "mhs_loss",
           "pairwise_sq_distances", "riesz_energy"]
