"""Pure between-class geometry metrics (NC2/GNC2, NC3) on a set of class vectors.

Every function takes a ``(K, d)`` matrix whose rows are class vectors (centred class means
``m_c = mu_c - mu_G``, classifier rows ``w_c``, ...) and returns float64 tensors. Conventions:

* pairs are **unordered** (``c < c'``); pairwise statistics are taken over the
  ``P = K (K - 1) / 2`` pairs;
* standard deviations and variances use ``ddof = 1`` (Papyan notebook's ``torch.std``);
  with a single value they are ``nan``;
* unit-vector metrics normalise the rows first; a zero row stays zero (cosine 0);
* distances between unit vectors are exact differences (``torch.cdist`` without the
  ``|a|^2 + |b|^2 - 2<a, b>`` shortcut), clamped below by ``tiny`` before taking logs;
* energies are **means over unordered pairs**, Riesz energies evaluated in the log domain.

No Lightning import; usable on any tensors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "class_separation",
    "cosine_stats",
    "equinorm",
    "etf_distance",
    "log_energy",
    "nc3_cos",
    "nc3_self_duality",
    "pair_distances",
    "riesz_energy",
    "std1",
    "unit_rows",
    "var1",
]


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _nan(like: Tensor) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float64, device=like.device)


def std1(x: Tensor) -> Tensor:
    """Sample standard deviation (``ddof = 1``) of a flat tensor; ``nan`` for fewer than 2."""
    return x.std(correction=1) if x.numel() > 1 else _nan(x)


def var1(x: Tensor) -> Tensor:
    """Sample variance (``ddof = 1``) of a flat tensor; ``nan`` for fewer than 2 values."""
    return x.var(correction=1) if x.numel() > 1 else _nan(x)


def unit_rows(vectors: Tensor) -> Tensor:
    """Rows scaled to unit Euclidean norm in float64 (zero rows stay zero)."""
    v = _f64(vectors)
    norms = v.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, v / norms.clamp_min(torch.finfo(v.dtype).tiny), v)


def _upper(mat: Tensor) -> Tensor:
    """Strict upper triangle of a square matrix, flattened (the unordered pairs)."""
    i, j = torch.triu_indices(mat.shape[0], mat.shape[0], offset=1, device=mat.device)
    return mat[i, j]


def pair_distances(vectors: Tensor) -> Tensor:
    """Euclidean distances ``|v_c - v_c'|`` over unordered pairs, as exact differences."""
    v = _f64(vectors)
    return _upper(torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist"))


def equinorm(vectors: Tensor) -> Tensor:
    """Coefficient of variation of the row norms, ``std_c |v_c| / mean_c |v_c|`` (ddof 1).

    Papyan et al. (PNAS 2020) equinorm on centred means or classifier rows; scale-invariant.
    """
    norms = _f64(vectors).norm(dim=1)
    return std1(norms) / norms.mean()


def cosine_stats(vectors: Tensor) -> dict[str, Tensor]:
    """Statistics of the pairwise cosines ``cos_cc' = <v_c, v_c'> / (|v_c| |v_c'|)``.

    Returns:
        ``std``: ``std_{c<c'} cos`` (ddof 1, equiangularity); ``max_angle_dev``:
        ``mean_{c != c'} |cos + 1/(K-1)|`` (Papyan's max-angle deviation); ``max_cos``:
        ``max_{c != c'} cos``; ``min_angle``: ``arccos(max_cos)`` in **degrees** (clamped).
    """
    u = unit_rows(vectors)
    k = u.shape[0]
    if k < 2:
        nan = _nan(u)
        return {"std": nan, "max_angle_dev": nan, "max_cos": nan, "min_angle": nan}
    cos = _upper(u @ u.T).clamp(-1.0, 1.0)
    max_cos = cos.max()
    return {
        "std": std1(cos),
        "max_angle_dev": (cos + 1.0 / (k - 1)).abs().mean(),
        "max_cos": max_cos,
        "min_angle": torch.rad2deg(torch.arccos(max_cos)),
    }


def etf_distance(vectors: Tensor) -> Tensor:
    """Distance of the normalised Gram matrix to the simplex ETF: ``|G/|G|_F - T_K|_F``.

    ``G = V V^T`` (rows as given, *not* normalised) and ``T_K = (I - J/K) / sqrt(K - 1)``
    (Zhu et al. 2021; range ``[0, 2]``).
    """
    v = _f64(vectors)
    k = v.shape[0]
    if k < 2:
        return _nan(v)
    gram = v @ v.T
    target = torch.eye(k, dtype=v.dtype, device=v.device) - 1.0 / k
    target = target / math.sqrt(k - 1)
    return torch.linalg.matrix_norm(gram / torch.linalg.matrix_norm(gram) - target)


def _log_dist(vectors: Tensor) -> Tensor:
    dist = pair_distances(unit_rows(vectors))
    return torch.log(dist.clamp_min(torch.finfo(dist.dtype).tiny))


def riesz_energy(vectors: Tensor, s: float = 2.0) -> Tensor:
    """Mean Riesz ``s``-energy of the normalised rows, ``mean_{c<c'} |u_c - u_c'|^{-s}``.

    Evaluated as ``exp(logsumexp(-s log D) - log P)``. With ``s = 2`` this is the inter-class
    term of HUG written as a mean over unordered pairs.
    """
    if vectors.shape[0] < 2:
        return _nan(vectors)
    log_d = _log_dist(vectors)
    return torch.exp(torch.logsumexp(-s * log_d, dim=0) - math.log(log_d.numel()))


def class_separation(vectors: Tensor) -> dict[str, Tensor]:
    """Separation of the normalised class vectors (one ``K x K`` Gram).

    Returns:
        ``min_angle`` (degrees, between the closest two), ``max_cos`` and ``riesz2_energy``
        (mean over pairs of ``1 / |u_c - u_c'|^2``, HUG's inter term).
    """
    stats = cosine_stats(vectors)
    return {"min_angle": stats["min_angle"], "max_cos": stats["max_cos"],
            "riesz2_energy": riesz_energy(vectors, s=2.0)}


def log_energy(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance (ddof 1) over unordered pairs of ``log(1 / |u_c - u_c'|)``.

    The logarithmic hyperspherical energy of the normalised rows (Linguistic Collapse GNC2
    kernel; the LC pipeline reports the population variance, multiply by ``(P-1)/P``).
    """
    if vectors.shape[0] < 2:
        return _nan(vectors), _nan(vectors)
    kern = -_log_dist(vectors)
    return kern.mean(), var1(kern)


def nc3_self_duality(weights: Tensor, means: Tensor) -> Tensor:
    """Papyan's NC3: ``| W/|W|_F - M/|M|_F |_F^2`` in ``[0, 4]`` (rows paired by class)."""
    w, m = _f64(weights), _f64(means)
    if m.shape[0] < 2:  # one class: its centred mean is 0, nothing to compare
        return _nan(m)
    return (w / torch.linalg.matrix_norm(w) - m / torch.linalg.matrix_norm(m)).square().sum()


def nc3_cos(weights: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class cosine between ``w_c`` and ``m_c``.

    Returns:
        ``(mean_c (1 - cos_c), var_c cos_c)``: Jiang et al.'s GNC3 and the Linguistic Collapse
        "uniform duality" UNC3 (variance with ddof 1).
    """
    if means.shape[0] < 2:  # fewer than two present classes: undefined (nan)
        return _nan(_f64(means)), _nan(_f64(means))
    cos = (unit_rows(weights) * unit_rows(means)).sum(dim=1)
    return (1.0 - cos).mean(), var1(cos)
