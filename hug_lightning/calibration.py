"""Calibration: expected calibration error, NLL and temperature scaling (pure functions).

Score definition. Every head gives scores ``(N, K)`` whose argmax is the prediction; the
predicted probabilities are ``softmax(scores / T)``:

* cross-entropy head: the scores are logits and ``T = 1`` is the model's own distribution;
  temperature scaling (Guo et al., ICML 2017) may still be fitted as a post-hoc correction;
* HUG head: the scores are cosines to the proxies, in ``[-1, 1]``, and HUG has no softmax, so
  ``T = 1`` gives nearly uniform probabilities (``T = 1`` numbers, ``*_raw``, say little). ``T``
  must be fitted on held-out data; measured: about 0.14-0.25 (bench/RESULTS.md: 0.24 for a
  ResNet-18 at 15 epochs), i.e. a logit range of about 4-7.

:func:`fit_temperature` minimizes the validation NLL over ``T``. ``NLL(1/T)`` is convex in
``1/T`` (a log-sum-exp of functions linear in ``1/T`` minus a linear term), hence unimodal in
``log T``: a golden-section search over ``log T`` in float64 finds the minimum
deterministically (no random start, no learning rate). When the data are separable the NLL
keeps decreasing as ``T -> 0`` and the search returns the lower bound.

ECE is the top-label calibration error of Guo et al. over ``n_bins`` equal-width bins
``(b/n, (b+1)/n]`` (a confidence of 0 joins the first), l1 norm:
``sum_b |B_b|/N |acc(B_b) - conf(B_b)|``, always on the probabilities, never on raw scores.
It is computed here rather than by torchmetrics' ``multiclass_calibration_error``, whose
``[lo, hi)`` bins put every confidence of exactly 1.0 (a float32 softmax saturates at a logit
margin of about 17, common for cross-entropy) into an extra bin of its own, which can only raise
the ECE.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_INV_PHI = (math.sqrt(5) - 1) / 2  # 1 / golden ratio


def _check(logits: Tensor, labels: Tensor, temperature: float) -> None:
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"Expected logits (N, K) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    k = logits.shape[1]
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < k):
        raise ValueError(f"labels must be class indices in [0, {k}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}.")


def probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / T)`` in float32 (float64 inputs stay float64)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.softmax(z / temperature, dim=-1)


def negative_log_likelihood(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean ``-log softmax(logits / T)[y]``."""
    _check(logits, labels, temperature)
    z = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(z / temperature, labels.long())


def expected_calibration_error(logits: Tensor, labels: Tensor, temperature: float = 1.0,
                               n_bins: int = 15, norm: str = "l1") -> Tensor:
    """Top-label ECE of ``softmax(logits / T)`` over ``n_bins`` equal-width bins ``(lo, hi]``.

    Args:
        logits: Scores ``(N, K)`` (logits, or cosines for HUG).
        labels: True classes ``(N,)``.
        temperature: ``T`` of ``softmax(logits / T)``.
        n_bins: Number of confidence bins.
        norm: ``"l1"`` (ECE), ``"l2"`` or ``"max"`` (maximum calibration error).
    """
    _check(logits, labels, temperature)
    if norm not in ("l1", "l2", "max"):
        raise ValueError(f"norm must be 'l1', 'l2' or 'max', got {norm!r}.")
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}.")
    conf, pred = probabilities(logits, temperature).double().max(dim=-1)
    correct = (pred == labels.to(pred.device)).double()
    # bin b holds b/n < conf <= (b+1)/n; conf = 0 joins bin 0
    idx = (conf * n_bins).ceil().long().sub_(1).clamp_(0, n_bins - 1)
    zeros = conf.new_zeros(n_bins)
    count = zeros.index_add(0, idx, torch.ones_like(conf))
    gap = (zeros.index_add(0, idx, correct) - zeros.index_add(0, idx, conf)).abs()
    gap = gap / count.clamp_min(1)  # |acc(B_b) - conf(B_b)|, 0 for empty bins
    weight = count / conf.numel()
    if norm == "l1":
        ece = (weight * gap).sum()
    elif norm == "l2":
        ece = (weight * gap.square()).sum().sqrt()
    else:
        ece = gap.max()
    return ece.float()


@torch.no_grad()
def fit_temperature(logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (1e-3, 1e3),
                    tol: float = 1e-7, max_iter: int = 200) -> float:
    """Temperature minimizing ``NLL(softmax(logits / T), labels)``: golden-section on ``log T``.

    Args:
        logits: Validation scores ``(N, K)``.
        labels: Validation classes ``(N,)``.
        bounds: Search interval of ``T``; the minimum is clipped to it.
        tol: Stop when the bracket of ``log T`` is narrower than this.
        max_iter: At most this many NLL evaluations after the first two.

    Returns:
        The fitted temperature (a Python float; deterministic for given inputs, and the same
        for any order of the rows: the NLL is summed in sorted order, so a DDP gather, whose
        order differs from one process's, fits the single-process ``T`` to the last bit).
    """
    _check(logits, labels, 1.0)
    lo_t, hi_t = float(bounds[0]), float(bounds[1])
    if not 0 < lo_t < hi_t:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}.")
    if logits.shape[0] == 0:
        raise ValueError("fit_temperature needs at least one sample.")
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:  # every NLL would be nan and the search would walk to the upper bound
        raise ValueError(f"fit_temperature: {bad} of the {logits.shape[0]} score rows are not "
                         "finite (nan or inf; a diverged model?): fit on finite scores.")
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)

    def nll(u: float) -> float:  # summed in sorted order: the same for any order of the rows
        losses = F.cross_entropy(z * math.exp(-u), y, reduction="none")
        return float(losses.sort().values.sum()) / losses.numel()

    a, b = math.log(lo_t), math.log(hi_t)
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(max_iter):
        if b - a < tol:
            break
        if fc <= fd:  # minimum in [a, d]
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = nll(c)
        else:  # minimum in [c, b]
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = nll(d)
    best = min((nll(a), a), (fc, c), (fd, d), (nll(b), b))  # the ends cover boundary minima
    return math.exp(best[1])


__all__ = ["expected_calibration_error", "fit_temperature", "negative_log_likelihood",
           "probabilities"]
