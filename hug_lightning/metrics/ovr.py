"""One-vs-rest distance of class vectors (Jiang et al. 2023's GNC2), exact and batched.

For unit class vectors ``u_1..u_K`` (rows scaled to unit norm), class ``k``'s one-vs-rest
distance is the distance from ``u_k`` to the convex hull of the other classes' vectors,

    rho_k = dist(u_k, conv{u_j : j != k}) = max_{|h| <= 1} min_{j != k} <u_k - u_j, h>,

and GNC2 is ``min_k rho_k`` (a "Softmax Code" maximises it). ``rho_k = 0`` flags a class
enclosed by the others. The simplex ETF gives ``K / (K - 1)`` for every class.

Each ``rho_k^2`` is a quadratic programme over the simplex,
``min_{lambda in simplex, lambda_k = 0} 1 - 2 g_k^T lambda + lambda^T G lambda`` with
``G = U U^T``; all K of them are solved at once as one ``(K, K)`` matrix of weights by FISTA
(step ``1 / (2 lambda_max(G))``, gradient-based restart) with a sort-based projection of each
row onto the simplex. Every iterate comes with a certificate: with ``p_k`` the current hull
point and ``h_k = (u_k - p_k) / |u_k - p_k|``,

    min_{j != k} <u_k - u_j, h_k>  <=  rho_k  <=  |u_k - p_k|,

and the solver stops when every gap is below ``tol``. Jiang et al.'s own code runs a fixed
number of projected subgradient steps from a random start and reports a signed, inexact value;
this one is deterministic and says how exact it is. Cost per iteration: one ``(K, K) x (K, K)``
product (cubic in K). No Lightning import.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["OneVsRest", "one_vs_rest_distance", "project_rows_to_simplex"]


class OneVsRest(NamedTuple):
    """Per-class distances (``rho``: the upper bound, a point of the hull attains it), their
    certified lower bounds (``lower``; ``rho - lower`` is the largest possible error) and the
    number of iterations run."""

    rho: Tensor
    lower: Tensor
    iterations: int


def project_rows_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of every row of ``v`` onto the probability simplex (sort-based,
    Held-Wolfe-Crowder / Duchi et al.)."""
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    idx = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    support = (u - css / idx) > 0
    count = support.sum(-1, keepdim=True).clamp_min(1)  # the first entry always qualifies
    theta = css.gather(-1, count - 1) / count.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def _bounds(units: Tensor, lam: Tensor, off: Tensor) -> tuple[Tensor, Tensor]:
    """Upper (|u_k - p_k|) and lower (certificate) bounds of every rho_k for weights ``lam``."""
    gap_vec = units - lam @ units  # u_k - p_k
    upper = gap_vec.norm(dim=1)
    h = gap_vec / upper.clamp_min(torch.finfo(units.dtype).tiny).unsqueeze(1)
    proj = h @ units.T  # <h_k, u_j>
    diffs = (proj.diagonal().unsqueeze(1) - proj).masked_fill(~off, float("inf"))
    lower = torch.where(upper > 0, diffs.min(dim=1).values, torch.zeros_like(upper))
    return upper, lower.clamp_min(0.0)  # a distance: 0 certifies a row inside the hull


def one_vs_rest_distance(vectors: Tensor, tol: float = 1e-9,
                         max_iter: int = 100_000) -> OneVsRest:
    """Every class's one-vs-rest distance (see the module docstring) in float64.

    Args:
        vectors: ``(K, d)`` class vectors (classifier rows or centred class means); rows are
            scaled to unit norm; a zero row stays zero. Any nan or inf gives nan values.
        tol: Stop when ``rho_k - lower_k <= tol`` for every class.
        max_iter: Give up after this many iterations (``rho - lower`` then says how far from
            exact the values are).
    """
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise ValueError(f"one_vs_rest_distance: need (K >= 2, d) class vectors, got "
                         f"{tuple(vectors.shape)}")
    x = vectors.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):  # a diverged head: nan, as the other geometry metrics
        nan = torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)
        return OneVsRest(nan, nan.clone(), 0)
    norms = x.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, x / norms.clamp_min(torch.finfo(x.dtype).tiny), x)
    k = units.shape[0]
    gram = units @ units.T
    off = ~torch.eye(k, dtype=torch.bool, device=x.device)
    step = 1.0 / (2.0 * float(torch.linalg.eigvalsh(gram)[-1].clamp_min(1e-12)))

    def project(m: Tensor) -> Tensor:
        out = torch.zeros_like(m)
        out[off] = project_rows_to_simplex(m[off].view(k, k - 1)).reshape(-1)
        return out

    lam = project(torch.zeros(k, k, dtype=x.dtype, device=x.device))  # uniform over the rest
    y, t, it = lam, 1.0, 0
    upper, lower = _bounds(units, lam, off)
    while it < max_iter and float((upper - lower).max()) > tol:
        block = min(20, max_iter - it)  # iterations between certificate checks
        for _ in range(block):
            grad = 2.0 * (y @ gram - gram)
            new = project(y - step * grad)
            if float(((y - new) * (new - lam)).sum()) > 0:  # gradient restart (O'Donoghue-Candes)
                t, y = 1.0, lam
                continue
            t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
            y = new + ((t - 1.0) / t_next) * (new - lam)
            lam, t = new, t_next
        it += block
        upper, lower = _bounds(units, lam, off)
    return OneVsRest(upper, lower, it)
