"""The intra-class term and the combined HUG loss (inter uniformity + intra variability).

Default = the authors' released ``HUG_MHE``::

    loss = alpha * mean_{c<c'} 1/||w_c - w_c'||^2
         + beta * mean_{c present} mean_{i: y_i = c} ||x_i - sg(w_{y_i})||

with ``x = h/||h||``, ``w = W/||W||`` and ``alpha = beta = 1``. Differences from the released code,
on purpose: normalizations and distances use an ``eps`` floor (no NaN at a zero feature, coincident
proxies penalized instead of dropped) and the class-balanced mean is computed without a loop:
per-class counts with ``index_add_`` and one weight per sample ``1/(n_{y_i} K_present)``, where
``K_present = (counts > 0).sum()`` stays a tensor. No ``.item()``, ``torch.unique`` or boolean
indexing: nothing waits on the device and shapes do not depend on the data. The whole loss is one
autograd Function (features and proxies normalized together, one gather ``w[y]`` for the intra
term, the Gram matrix for the inter term, gradients written by hand): about 36 kernels for forward
and backward on the default configuration, where op-by-op autograd launched about 90. Labels must
lie in ``[0, K)``; :func:`hug_loss` checks them on the CPU only (on a GPU that would sync: an
out-of-range label makes the gather fail with a device-side assert). ``HUGHead`` checks them on
CPU or when asked.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hug_lightning.losses.uniformity import (
    InterSpec,
    as_loss_dtype,
    check_eps,
    inter_backward,
    inter_forward,
    no_autocast,
    unit_backward,
    unit_forward,
)


@dataclass(frozen=True)
class HUGConfig:
    """Hyperparameters of :func:`hug_loss`, validated once at construction (Python only, no sync).

    See :class:`hug_lightning.heads.hug.HUGHead` for the meaning of each field.
    """

    variant: str = "mhe"
    alpha: float = 1.0
    beta: float = 1.0
    energy_s: int = 2
    mhs_mode: str = "hard"
    mhs_tau: float = 0.1
    mgd_jitter: float = 1e-6
    mgd_normalize: bool = True
    intra_power: int = 1
    intra_reduction: str = "class_balanced"
    detach_proxy: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ValueError:
            return ValueError(f"HUG: {name} must be {allowed}, got {value!r}.")

        if self.variant not in ("mhe", "mhs", "mgd"):
            raise bad("variant", self.variant, "one of 'mhe', 'mhs', 'mgd'")
        if not (0 <= self.alpha < math.inf and 0 <= self.beta < math.inf):  # rejects NaN, inf
            raise ValueError(
                f"HUG: alpha and beta must be finite and >= 0, got {self.alpha}, {self.beta}.")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("HUG: alpha and beta are both 0; the loss would be constant.")
        for name, allowed, text in (("energy_s", (0, 1, 2), "0, 1 or 2"),
                                    ("intra_power", (1, 2), "1 or 2")):
            value = getattr(self, name)  # an integer: 2.0 or True would be stored as given
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) \
                    or value not in allowed:
                raise bad(name, value, text)
        if self.mhs_mode not in ("hard", "soft"):
            raise bad("mhs_mode", self.mhs_mode, "'hard' or 'soft'")
        if not 0 < self.mhs_tau < math.inf:
            raise bad("mhs_tau", self.mhs_tau, "positive and finite")
        if not 0 <= self.mgd_jitter < math.inf:
            raise bad("mgd_jitter", self.mgd_jitter, "finite and >= 0")
        for name in ("mgd_normalize", "detach_proxy"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "True or False (a bool)")
        if self.intra_reduction not in ("class_balanced", "per_sample"):
            raise bad("intra_reduction", self.intra_reduction, "'class_balanced' or 'per_sample'")
        check_eps(self.eps, "HUG")
        spec = InterSpec(self.variant, self.energy_s, "mean", self.mhs_mode, self.mhs_tau,
                         self.mgd_jitter, self.mgd_normalize, self.eps)
        object.__setattr__(self, "_inter_spec", spec)  # built once: the loss reads it every step

    @property
    def inter_spec(self) -> InterSpec:
        """The inter-term part of the configuration (pair mean for MHE)."""
        return self._inter_spec  # type: ignore[attr-defined,no-any-return]


class HUGLossOutput(NamedTuple):
    """``total = alpha * inter + beta * intra``; all three are differentiable."""

    total: Tensor
    inter: Tensor
    intra: Tensor


class CountSync(NamedTuple):
    """Makes the intra term's batch statistics global under data parallelism (DDP).

    ``reduce`` sums a tensor over the ``world_size`` processes (a collective: every process
    calls it at the same step). With it each process weighs its samples by the GLOBAL batch's
    class counts (``class_balanced``) or size (``per_sample``), times ``world_size``, so the
    average of the processes' gradients (what DDP applies) is the gradient of the loss on the
    global batch: the single-process result.
    """

    reduce: Callable[[Tensor], Tensor]
    world_size: int


def class_balanced_weights(labels: Tensor, num_classes: int, dtype: torch.dtype,
                           sync: CountSync | None = None) -> Tensor:
    """Per-sample weights ``1 / (n_{y_i} K_present)``: their dot with per-sample values is the
    mean over the classes present of the per-class means. No host sync, no data-dependent
    shape. With ``sync``: ``R / (N_{y_i} K_global)`` from the counts ``N`` summed over the
    ``R`` processes (one all-reduce of ``K`` numbers)."""
    ones = torch.ones(labels.shape[0], dtype=dtype, device=labels.device)
    counts = torch.zeros(num_classes, dtype=dtype, device=labels.device).index_add_(0, labels, ones)
    if sync is not None:
        total = sync.reduce(counts)
        present = (total > 0).sum().to(dtype)
        return total.index_select(0, labels).mul_(present).reciprocal_().mul_(sync.world_size)
    inv_count = counts.index_select(0, labels).reciprocal_()
    return inv_count / inv_count.sum()  # sum_i 1/n_{y_i} = number of classes present


def per_sample_weights(labels: Tensor, dtype: torch.dtype, sync: CountSync) -> Tensor:
    """``R / B_global`` for every sample: the global batch mean, whatever the local sizes."""
    size = torch.full((1,), labels.shape[0], dtype=dtype, device=labels.device)
    return (sync.world_size / sync.reduce(size)).expand(labels.shape[0])


class _HUGFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, W: Tensor, labels: Tensor, cfg: HUGConfig, sync: CountSync | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b = h.shape[0]
        u, nrm, den = unit_forward(as_loss_dtype(torch.cat([h, W])), cfg.eps)
        x, w = u[:b], u[b:]
        inter, state = inter_forward(w, cfg.inter_spec)
        diff = x - w.index_select(0, labels)
        if cfg.intra_power == 1:  # exact distance; its gradient is set to 0 below sqrt(eps)
            dist = torch.linalg.vector_norm(diff, dim=-1)
        else:
            dist = diff.square().sum(dim=-1)
        if cfg.intra_reduction == "class_balanced":
            wt = class_balanced_weights(labels, W.shape[0], dist.dtype, sync)
            intra = torch.dot(dist, wt)
        elif sync is not None:
            wt = per_sample_weights(labels, dist.dtype, sync).contiguous()
            intra = torch.dot(dist, wt)
        else:
            wt, intra = None, dist.mean()
        total = torch.add(inter if cfg.alpha == 1 else inter * cfg.alpha, intra, alpha=cfg.beta)
        ctx.cfg, ctx.b, ctx.dtypes = cfg, b, (h.dtype, W.dtype)
        ctx.save_for_backward(u, nrm, den, diff, labels, dist, wt, *state)
        ctx.mark_non_differentiable(u)
        ctx.set_materialize_grads(False)
        return total, inter, intra, u

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, g_total: Tensor | None, g_inter: Tensor | None, g_intra: Tensor | None, _: Any
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        cfg, b = ctx.cfg, ctx.b
        u, nrm, den, diff, labels, dist, wt, *state = ctx.saved_tensors

        def coef(g: Tensor | None, weight: float, g_term: Tensor | None) -> Tensor | None:
            c = None if g is None else g * weight if weight != 1 else g
            return g_term if c is None else c if g_term is None else c + g_term

        gi, gb = coef(g_total, cfg.alpha, g_inter), coef(g_total, cfg.beta, g_intra)
        if gi is None and gb is None:
            return None, None, None, None, None
        with no_autocast(u.device.type):
            grad = torch.empty_like(u)
            gx, gw = grad[:b], grad[b:]
            if gi is None:
                gw.zero_()
            else:
                inter_backward(u[b:], tuple(state), cfg.inter_spec, gi, out=gw)
            if gb is None:
                gx.zero_()
            else:
                gd = gb * wt if wt is not None else gb / b  # d intra / d dist_i
                if cfg.intra_power == 1:  # d||v|| = v / ||v||; 0 when ||v|| <= sqrt(eps)
                    c = gd / torch.threshold(dist, math.sqrt(cfg.eps), math.inf)
                else:
                    c = gd * 2.0
                torch.mul(diff, c.reshape(-1, 1), out=gx)
                if not cfg.detach_proxy:
                    gw.index_add_(0, labels, gx, alpha=-1.0)
            grad = unit_backward(grad, u, nrm, den, cfg.eps)
        return grad[:b].to(ctx.dtypes[0]), grad[b:].to(ctx.dtypes[1]), None, None, None


def check_inputs(features: Tensor, weight: Tensor, labels: Tensor) -> None:
    """Shape/dtype checks that read only metadata (no device sync)."""
    if features.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"HUG: features must be (B, d) and proxies (K, d), got {tuple(features.shape)} "
            f"and {tuple(weight.shape)}."
        )
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"HUG: feature width {features.shape[1]} != proxy width {weight.shape[1]}."
        )
    if weight.shape[0] < 2:
        raise ValueError(f"HUG: needs K >= 2 proxies, got K={weight.shape[0]}.")
    if features.shape[0] < 1:
        raise ValueError("HUG: the batch is empty (B=0).")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"HUG: labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}."
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"HUG: labels must be an integer tensor (int64 or int32), got dtype {labels.dtype}."
        )
    if not (features.is_floating_point() and weight.is_floating_point()):
        raise ValueError("HUG: features and proxies must be floating point.")


def hug_terms(
    features: Tensor, weight: Tensor, labels: Tensor, config: HUGConfig,
    sync: CountSync | None = None,
) -> tuple[HUGLossOutput, Tensor]:
    """:func:`hug_loss` without the input checks, plus the normalized rows ``[x; w]`` (no grad),
    from which callers take cosine logits ``x @ w.T`` without normalizing again. ``sync``: see
    :class:`CountSync` (the returned intra value is then this process's share, times ``R``)."""
    with no_autocast(features.device.type):
        total, inter, intra, unit = _HUGFunction.apply(features, weight, labels, config, sync)
    return HUGLossOutput(total, inter, intra), unit


def hug_loss(
    features: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    config: HUGConfig | None = None,
    **options: Any,
) -> HUGLossOutput:
    """HUG loss of a batch: ``alpha * inter(W) + beta * intra(h, W, y)``.

    Args:
        features: Features ``h`` ``(B, d)``, any scale; bf16/fp16 are upcast to float32.
        weight: Proxies ``W`` ``(K, d)``, any scale.
        labels: Integer labels ``(B,)`` in ``[0, K)``: checked when they are on the CPU (free),
            not on accelerators (reading them back would sync; an out-of-range label then fails
            in the gather; :class:`~hug_lightning.heads.hug.HUGHead` can check them).
        config: A validated :class:`HUGConfig`; when omitted it is built from ``options``.
        **options: Fields of :class:`HUGConfig` (``variant``, ``alpha``, ``beta``, ``energy_s``,
            ``mhs_mode``, ``mhs_tau``, ``mgd_jitter``, ``mgd_normalize``, ``intra_power``,
            ``intra_reduction``, ``detach_proxy``, ``eps``); defaults give the released HUG-MHE.

    Returns:
        :class:`HUGLossOutput` ``(total, inter, intra)``, float32 (float64 for float64 inputs).
    """
    if config is None:
        config = HUGConfig(**options)
    elif options:
        raise ValueError("hug_loss: pass either config or keyword options, not both.")
    check_inputs(features, weight, labels)
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        k = weight.shape[0]
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= k:
            raise ValueError(f"HUG: label {low if low < 0 else high} is outside [0, {k}) "
                             f"(K = {k} proxies); labels must be class indices.")
    return hug_terms(features, weight, labels, config)[0]


__all__ = ["CountSync", "HUGConfig", "HUGLossOutput", "check_inputs", "class_balanced_weights",
           "hug_loss", "hug_terms", "per_sample_weights"]
