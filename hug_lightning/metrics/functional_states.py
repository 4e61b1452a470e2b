"""One-pass, DDP-summable sufficient statistics for the neural-collapse metrics.

The states are plain tensors in a ``dict``; every one is a
sum over samples, so the states of any partition of the data add up to the states of the whole
(the DDP reduction is a ``SUM``). With per-class pivots ``p_c`` and ``z_i = x_i - p_{y_i}``:

=============  ========  ===========================================================
key            shape     value
=============  ========  ===========================================================
``n``          K         weighted counts ``sum_i w_i`` per class (float: weights may be 0/1
                         masks for padded duplicates, or real)
``s``          K x d     ``sum_{i in c} w_i z_i``
``q``          K         ``sum_{i in c} w_i |z_i|^2``
``S``          d x d     ``sum_i w_i z_i z_i^T`` (only with ``track_cov``)
``*_sph``      as above  the same on spherical features ``x / |x|`` with pivots ``p^sph``
``ncc_n``      K         weighted count of samples scored by the NCC rule (reference + logits)
``ncc_agree``  K         ... of which NCC prediction == argmax logits
``ncc_correct`` K        ... of which NCC prediction == label
``lin_correct`` K        ... of which argmax logits == label
=============  ========  ===========================================================

Pivots are **not** states: they must be identical on every rank (use last epoch's synced
means); :func:`rebase_states` moves accumulated sums to new pivots exactly.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

__all__ = ["feature_states", "init_states", "ncc_predict", "rebase_states", "update_ncc_states",
           "update_states"]

States = MutableMapping[str, Tensor]
NCC_KEYS = ("ncc_n", "ncc_agree", "ncc_correct", "lin_correct")


def init_states(
    num_classes: int,
    dim: int,
    *,
    spherical: bool = True,
    track_cov: bool = True,
    ncc: bool = True,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Zero states for ``num_classes`` classes and ``dim``-dimensional features."""
    k, d = int(num_classes), int(dim)
    shapes: dict[str, tuple[int, ...]] = {"n": (k,), "s": (k, d), "q": (k,)}
    if track_cov:
        shapes["S"] = (d, d)
    if spherical:
        shapes.update({"s_sph": (k, d), "q_sph": (k,)})
        if track_cov:
            shapes["S_sph"] = (d, d)
    if ncc:
        shapes.update({key: (k,) for key in NCC_KEYS})
    return {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in shapes.items()}


def ncc_predict(features: Tensor, ref_means: Tensor, ref_valid: Tensor | None = None) -> Tensor:
    """Nearest-class-centre prediction ``argmin_c |x - r_c|^2`` against reference means.

    Computed as ``argmin_c (|r'_c|^2 - 2 <x - rbar, r'_c>)`` with ``rbar`` the average of the
    valid reference means and ``r'_c = r_c - rbar`` (section 3.3: drops the per-sample constant,
    keeps magnitudes small). Invalid classes (``ref_valid`` false, e.g. absent from the epoch
    that produced the means) are never predicted. Ties go to the lowest class index
    (``torch.argmin``). No host synchronisation.
    """
    ref = ref_means.to(features.dtype)
    if ref_valid is None:
        ref_valid = torch.isfinite(ref).all(dim=1)
    mask = ref_valid.to(ref.dtype)[:, None]
    ref = torch.where(mask > 0, ref, torch.zeros_like(ref))
    rbar = (ref * mask).sum(0) / mask.sum().clamp_min(1.0)
    rp = (ref - rbar) * mask
    scores = rp.square().sum(1)[None, :] - 2.0 * (features - rbar) @ rp.T
    scores = scores.masked_fill(~ref_valid.bool()[None, :], float("inf"))
    return scores.argmin(dim=1)


def _accumulate(states: States, sfx: str, x: Tensor, y: Tensor, w: Tensor, pivot: Tensor | None):
    z = x - pivot.to(x.dtype)[y] if pivot is not None else x
    wz = z * w[:, None]
    states["s" + sfx].index_add_(0, y, wz)
    states["q" + sfx].index_add_(0, y, (wz * z).sum(dim=1))
    if "S" + sfx in states:
        states["S" + sfx].addmm_(wz.T, z)


def update_states(
    states: States,
    features: Tensor,
    labels: Tensor,
    *,
    weight: Tensor | None = None,
    logits: Tensor | None = None,
    pivot: Tensor | None = None,
    pivot_sph: Tensor | None = None,
    ref_means: Tensor | None = None,
    ref_valid: Tensor | None = None,
) -> None:
    """Add a batch to ``states`` **in place** (no collectives, no host synchronisation).

    Args:
        states: Output of :func:`init_states`; only the keys present are updated.
        features: ``(..., d)`` features; cast to the states' dtype (float64) *before* any
            arithmetic, so bf16/fp16/fp32 inputs accumulate in float64.
        labels: ``(...)`` integer labels in ``[0, K)``.
        weight: Optional ``(...)`` per-sample weights (0 excludes a sample, e.g. the duplicates
            ``DistributedSampler`` pads with); default 1.
        logits: ``(..., K)`` model scores **including the bias**; NCC counters are updated
            only when both ``logits`` and ``ref_means`` are given.
        pivot, pivot_sph: ``(K, d)`` per-class pivots (default 0); must equal the pivots the
            states were accumulated with (see :func:`rebase_states`).
        ref_means, ref_valid: NCC reference means ``(K, d)`` and their validity mask ``(K,)``.
    """
    dtype = states["s"].dtype
    d = states["s"].shape[1]
    x = features.detach().reshape(-1, d).to(dtype)
    y = labels.detach().reshape(-1).long()
    w = (
        torch.ones_like(x[:, 0])
        if weight is None
        else weight.detach().reshape(-1).to(device=x.device, dtype=dtype)
    )
    states["n"].index_add_(0, y, w)
    _accumulate(states, "", x, y, w, pivot)
    if "s_sph" in states:
        _accumulate(states, "_sph", F.normalize(x, dim=1), y, w, pivot_sph)
    if "ncc_n" in states and logits is not None and ref_means is not None:
        pred_lin = logits.detach().reshape(x.shape[0], -1).argmax(dim=1)
        _count_ncc(states, x, y, w, pred_lin, ref_means, ref_valid)


def update_ncc_states(
    states: States,
    features: Tensor,
    labels: Tensor,
    predictions: Tensor,
    ref_means: Tensor,
    ref_valid: Tensor | None = None,
) -> None:
    """Add a batch to the NCC counters of ``states`` only, **in place**: the nearest class
    centre of each feature among ``ref_means`` against the ``(...)`` model ``predictions`` (the
    logits' argmax) and the labels, each sample counted once. :func:`update_states` does the
    same from logits; this one serves a second sweep over kept features once their own class
    means are known."""
    x = features.detach().reshape(-1, ref_means.shape[1]).to(states["ncc_n"].dtype)
    _count_ncc(states, x, labels.detach().reshape(-1).long(), torch.ones_like(x[:, 0]),
               predictions.detach().reshape(-1).to(x.device), ref_means, ref_valid)


def _count_ncc(states: States, x: Tensor, y: Tensor, w: Tensor, pred_lin: Tensor,
               ref_means: Tensor, ref_valid: Tensor | None) -> None:
    dtype = x.dtype
    pred_ncc = ncc_predict(x, ref_means, ref_valid)
    states["ncc_n"].index_add_(0, y, w)
    states["ncc_agree"].index_add_(0, y, w * (pred_ncc == pred_lin).to(dtype))
    states["ncc_correct"].index_add_(0, y, w * (pred_ncc == y).to(dtype))
    states["lin_correct"].index_add_(0, y, w * (pred_lin == y).to(dtype))


def rebase_states(states: States, old: Tensor, new: Tensor, sfx: str = "") -> dict[str, Tensor]:
    """Re-express the sums of one family (``sfx`` "" or "_sph") relative to new pivots.

    With ``D_c = p_c - p'_c`` and ``z' = z + D_c``: ``s' = s + n D``,
    ``q' = q + 2 <s_c, D_c> + n_c |D_c|^2``, ``S' = S + s^T D + D^T s + D^T diag(n) D``.
    Exact algebra (linear in the states, so it commutes with the DDP sum); returns **new**
    tensors for ``s, q, S`` of that family. Free of rounding when the states are empty.
    """
    n, s, q = states["n"], states["s" + sfx], states["q" + sfx]
    delta = (old - new).to(s.dtype)
    out = {
        "s" + sfx: s + n[:, None] * delta,
        "q" + sfx: q + 2.0 * (s * delta).sum(1) + n * delta.square().sum(1),
    }
    if "S" + sfx in states:
        cross = s.T @ delta
        out["S" + sfx] = states["S" + sfx] + cross + cross.T + (delta * n[:, None]).T @ delta
    return out


def feature_states(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    weight: Tensor | None = None,
    logits: Tensor | None = None,
    ref_means: Tensor | None = None,
    spherical: bool = True,
    track_cov: bool = True,
    pivot: str = "means",
) -> dict[str, Tensor]:
    """States of a whole feature matrix in one call, for offline use and tests.

    Args:
        pivot: ``"means"`` (default): accumulate around each class's own (weighted) mean,
            computed first from the same features (two passes, exact whatever the features'
            offset); the pivots are returned as ``pivot`` / ``pivot_sph``, which
            :func:`~hug_lightning.metrics.functional.compute_nc_metrics` reads. ``"zero"``:
            around 0, as a collector's first epoch does (relative error of the second moments
            about ``1e-16 (|mean| / spread)^2``).
        Others: as in :func:`update_states`.
    """
    if pivot not in ("means", "zero"):
        raise ValueError(f"feature_states: pivot must be 'means' or 'zero', got {pivot!r}.")
    states = init_states(
        num_classes,
        features.shape[-1],
        spherical=spherical,
        track_cov=track_cov,
        ncc=ref_means is not None,
        device=features.device,
    )
    pivots: dict[str, Tensor] = {}
    if pivot == "means":
        d = features.shape[-1]
        x = features.detach().reshape(-1, d).to(states["s"].dtype)
        y = labels.detach().reshape(-1).long()
        w = (torch.ones_like(x[:, 0]) if weight is None
             else weight.detach().reshape(-1).to(device=x.device, dtype=x.dtype))
        n = torch.zeros_like(states["n"]).index_add_(0, y, w).clamp_min(1e-300)[:, None]
        pivots["pivot"] = torch.zeros_like(states["s"]).index_add_(0, y, x * w[:, None]) / n
        if spherical:
            u = F.normalize(x, dim=1) * w[:, None]
            pivots["pivot_sph"] = torch.zeros_like(states["s"]).index_add_(0, y, u) / n
    update_states(states, features, labels, weight=weight, logits=logits, ref_means=ref_means,
                  pivot=pivots.get("pivot"), pivot_sph=pivots.get("pivot_sph"))
    states.update(pivots)
    return states
