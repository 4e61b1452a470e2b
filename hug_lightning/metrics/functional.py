"""Neural-collapse metrics from one-pass sum states (pure functions, float64, no Lightning).

``states`` is a mapping as built by :mod:`hug_lightning.metrics.functional_states` (keys ``n``,
``s``, ``q``, optional ``S``, spherical twins ``*_sph``, NCC counters) plus optional pivots
``pivot`` / ``pivot_sph`` (default 0). Conventions:

* only classes with ``n_c > 0`` count; ``K_eff`` is their number (reported as ``k_eff``);
* class means ``mu_c = p_c + s_c / n_c``; global mean ``mu_G`` = **class average** of the class
  means (``global_mean="sample"``: sample-weighted); centred means ``m_c = mu_c - mu_G``;
* ``Sigma_W = (S - sum_c n_c d_c d_c^T) / N`` (sample-weighted, 1/N) with ``d_c = s_c / n_c``;
  ``Sigma_B = M^T M / K_eff``;
* ``nc1_pinv = (1/K_eff) tr(Sigma_W Sigma_B^+)`` through a thin SVD of ``M`` with the
  structural rank ``r = min(K_eff - 1, d)``: ``sum_{i<=r} v_i^T Sigma_W v_i / s_i^2``;
* CDNV (Galanti et al.): ``mean_{c<c'} (sigma_c^2 + sigma_c'^2) / (2 |mu_c - mu_c'|^2)`` with
  ``sigma_c^2 = q_c / n_c - |d_c|^2``;
* std/var with ddof 1; unit-vector metrics (cosine std, max-angle deviation, ETF distance,
  max cosine, energies) on centred means (``centered=False``: uncentred; equinorm is always on
  the centred means) and on the **uncentred** classifier rows (all K rows); energies are means
  over unordered pairs (Riesz ``s = 2`` and log), see :mod:`.functional_geometry`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from hug_lightning.metrics import functional_geometry as geo
from hug_lightning.metrics.ovr import one_vs_rest_distance

__all__ = [
    "METRIC_NAMES",
    "class_means",
    "class_variances",
    "DEFAULT_NAMES",
    "OVR_NAMES",
    "compute_nc_metrics",
    "nc1_cdnv",
    "nc1_pinv",
    "nc1_trace_ratio",
    "select_metrics",
    "within_class_cov",
    "within_class_trace",
]

_NC1 = ("nc1_pinv", "nc1_pinv_rank", "nc1_pinv_cond", "nc1_trace_ratio", "nc1_cdnv")
NC1_NAMES = _NC1 + ("pivot_cond",)
SPH_NAMES = tuple(f"{m}_sph" for m in _NC1) + ("nc1_align_sph",)
_GEOM = ("nc2_equinorm", "nc2_equiangle_std", "nc2_maxangle_dev", "nc2_etf_dist",
         "gnc2_max_cos", "gnc2_min_angle", "gnc2_riesz2_energy")  # fmt: skip
MEANS_NAMES = tuple(f"{g}_means" for g in _GEOM) + ("gnc2_log_energy_mean", "gnc2_log_energy_var")
WEIGHT_NAMES = tuple(f"{g}_weights" for g in _GEOM) + (
    "gnc2_log_energy_mean_weights",
    "gnc2_log_energy_var_weights",
)
NC3_NAMES = ("nc3_self_duality", "nc3_cos_mean", "nc3_cos_var", "bias_relation")
NCC_NAMES = ("nc4_ncc_mismatch", "ncc_accuracy", "linear_accuracy")
COV_NAMES = ("nc1_pinv", "nc1_pinv_rank", "nc1_pinv_cond") + tuple(
    f"{m}_sph" for m in ("nc1_pinv", "nc1_pinv_rank", "nc1_pinv_cond")
)
#: one-vs-rest distances (Jiang GNC2; min and mean over classes): cubic in K per iteration of
#: their solver, so only on request (``metrics=["default", "gnc2_ovr_dist_weights"]``)
OVR_NAMES = tuple(f"gnc2_ovr_dist{s}_{tag}" for tag in ("means", "weights")
                  for s in ("", "_mean_k"))
METRIC_NAMES = ("k_eff",) + NC1_NAMES + SPH_NAMES + MEANS_NAMES + WEIGHT_NAMES + NC3_NAMES
METRIC_NAMES += NCC_NAMES + OVR_NAMES
DEFAULT_NAMES = tuple(name for name in METRIC_NAMES if name not in OVR_NAMES)


def select_metrics(metrics: Iterable[str] | None) -> frozenset[str]:
    """Validate a metric subset (``None``: :data:`DEFAULT_NAMES`, every metric but the
    one-vs-rest distances; the name ``"default"`` in a list stands for that set)."""
    if metrics is None:
        return frozenset(DEFAULT_NAMES)
    chosen = frozenset(metrics)
    if "default" in chosen:
        chosen = (chosen - {"default"}) | frozenset(DEFAULT_NAMES)
    unknown = sorted(chosen - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown NC metric name(s) {unknown}; choose from {METRIC_NAMES} "
                         "(or 'default': all but the one-vs-rest distances)")
    return chosen


def _f64(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64)


def _delta(states: Mapping[str, Tensor], sfx: str = "") -> tuple[Tensor, Tensor, Tensor]:
    """``(n, d_c = s_c/n_c (0 for absent classes), present mask)``."""
    n, s = _f64(states["n"]), _f64(states["s" + sfx])
    present = n > 0
    delta = torch.where(present[:, None], s / n.clamp_min(1e-300)[:, None], torch.zeros_like(s))
    return n, delta, present


def _pivot(states: Mapping[str, Tensor], sfx: str = "") -> Tensor:
    p = states.get("pivot" + sfx)
    return torch.zeros_like(_f64(states["s" + sfx])) if p is None else _f64(p)


def class_means(states: Mapping[str, Tensor], spherical: bool = False) -> Tensor:
    """Class means ``p_c + s_c / n_c`` (``(K, d)`` float64); rows of absent classes are nan."""
    sfx = "_sph" if spherical else ""
    _, delta, present = _delta(states, sfx)
    return torch.where(present[:, None], _pivot(states, sfx) + delta, float("nan"))


def within_class_trace(states: Mapping[str, Tensor], sfx: str = "") -> Tensor:
    """``tr Sigma_W = (sum_c q_c - sum_c n_c |d_c|^2) / N`` (pivot-independent)."""
    n, delta, _ = _delta(states, sfx)
    return (_f64(states["q" + sfx]).sum() - (n * delta.square().sum(1)).sum()) / n.sum()


def within_class_cov(states: Mapping[str, Tensor], sfx: str = "") -> Tensor:
    """``Sigma_W = (S - sum_c n_c d_c d_c^T) / N`` (d x d, symmetrised); needs ``S``."""
    n, delta, _ = _delta(states, sfx)
    sw = (_f64(states["S" + sfx]) - (delta * n[:, None]).T @ delta) / n.sum()
    return 0.5 * (sw + sw.T)


def class_variances(states: Mapping[str, Tensor], sfx: str = "") -> Tensor:
    """``sigma_c^2 = q_c / n_c - |d_c|^2`` (clamped at 0; nan for absent classes)."""
    n, delta, present = _delta(states, sfx)
    var = _f64(states["q" + sfx]) / n.clamp_min(1e-300) - delta.square().sum(1)
    return torch.where(present, var.clamp_min(0.0), float("nan"))


def nc1_pinv(sigma_w: Tensor, centred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(1/K) tr(Sigma_W Sigma_B^+)`` with ``Sigma_B = M^T M / K`` for the ``K`` rows of ``M``.

    Thin SVD ``M = U S V^T``, structural rank ``r = min(K - 1, d)``; the ``K`` factors cancel:
    ``sum_{i<=r} v_i^T Sigma_W v_i / s_i^2``. Never forms a d x d pseudo-inverse.

    Returns:
        ``(value, r, cond = s_1^2 / s_r^2)``; nan when ``r = 0``. Warns if ``s_r < 1e-12 s_1``.
    """
    m = _f64(centred)
    rank = min(m.shape[0] - 1, m.shape[1])
    if rank < 1:
        nan = torch.tensor(float("nan"), dtype=m.dtype, device=m.device)
        return nan, torch.zeros((), dtype=m.dtype, device=m.device), nan
    _, sv, vh = torch.linalg.svd(m, full_matrices=False)
    sv, v = sv[:rank], vh[:rank].T
    if bool(sv[-1] < 1e-12 * sv[0]):
        warnings.warn(f"nc1_pinv: Sigma_B is near-singular (s_r/s_1 = {sv[-1] / sv[0]:.3g})")
    quad = ((_f64(sigma_w) @ v) * v).sum(0)
    value = (quad / sv.square()).sum()
    return value, torch.tensor(float(rank), dtype=m.dtype, device=m.device), (sv[0] / sv[-1]) ** 2


def nc1_trace_ratio(tr_sigma_w: Tensor, centred: Tensor) -> Tensor:
    """``tr Sigma_W / tr Sigma_B`` with ``tr Sigma_B = |M|_F^2 / K``."""
    m = _f64(centred)
    return tr_sigma_w / (m.square().sum() / m.shape[0])


def nc1_cdnv(variances: Tensor, means: Tensor) -> Tensor:
    """Galanti's CDNV ``mean_{c<c'} (var_c + var_c') / (2 |mu_c - mu_c'|^2)`` (present rows)."""
    var = _f64(variances)
    if var.numel() < 2:
        return torch.tensor(float("nan"), dtype=var.dtype, device=var.device)
    i, j = torch.triu_indices(var.numel(), var.numel(), offset=1, device=var.device)
    return ((var[i] + var[j]) / (2.0 * geo.pair_distances(means).square())).mean()


def _centre(states, sfx, present, n, global_mean) -> tuple[Tensor, Tensor, Tensor]:
    """Present rows of ``mu_c`` and ``mu_c - mu_G``, and ``mu_G`` (pivot/offset parts apart)."""
    _, delta, _ = _delta(states, sfx)
    p, d, n_p = _pivot(states, sfx)[present], delta[present], n[present]
    if global_mean == "class":
        pg, dg = p.mean(0), d.mean(0)
    else:
        pg, dg = (p * n_p[:, None]).sum(0) / n_p.sum(), (d * n_p[:, None]).sum(0) / n_p.sum()
    return p + d, (p - pg) + (d - dg), pg + dg


def _nc1_family(out, want, states, sfx, present, n, global_mean) -> Tensor:
    names = [f"{m}{sfx}" for m in _NC1] + (["nc1_align_sph"] if sfx else ["pivot_cond"])
    means, centred, _ = _centre(states, sfx, present, n, global_mean)
    if not any(name in want for name in names):
        return centred
    if means.shape[0] < 2:  # no between-class structure: every NC1 value is undefined
        out.update({name: torch.full_like(n[0], float("nan")) for name in names if name in want})
        return centred
    var = class_variances(states, sfx)[present]
    if f"nc1_trace_ratio{sfx}" in want:
        out[f"nc1_trace_ratio{sfx}"] = nc1_trace_ratio(within_class_trace(states, sfx), centred)
    if f"nc1_cdnv{sfx}" in want:
        out[f"nc1_cdnv{sfx}"] = nc1_cdnv(var, means)
    if ("S" + sfx) in states and any(f"nc1_pinv{t}{sfx}" in want for t in ("", "_rank", "_cond")):
        val, rank, cond = nc1_pinv(within_class_cov(states, sfx), centred)
        for tag, v in (("", val), ("_rank", rank), ("_cond", cond)):
            if f"nc1_pinv{tag}{sfx}" in want:
                out[f"nc1_pinv{tag}{sfx}"] = v
    npr, many = n[present], n[present] > 1
    if sfx and "nc1_align_sph" in want:
        out["nc1_align_sph"] = (2.0 * npr / (npr - 1.0) * var)[many].mean()
    if not sfx and "pivot_cond" in want:
        _, delta, _ = _delta(states)
        ratio = (delta[present].square().sum(1) / var)[many & (var > 0)]
        out["pivot_cond"] = ratio.max() if ratio.numel() else torch.full_like(n[0], float("nan"))
    return centred


def _geometry(out: dict, want: frozenset[str], vectors: Tensor, tag: str, log_tag: str) -> None:
    if any(f"{g}_{tag}" in want for g in _GEOM[1:6]):
        cos = geo.cosine_stats(vectors)
        pairs = (("std", "nc2_equiangle_std"), ("max_angle_dev", "nc2_maxangle_dev"),
                 ("max_cos", "gnc2_max_cos"), ("min_angle", "gnc2_min_angle"))  # fmt: skip
        for key, name in pairs:
            if f"{name}_{tag}" in want:
                out[f"{name}_{tag}"] = cos[key]
    if f"nc2_etf_dist_{tag}" in want:
        out[f"nc2_etf_dist_{tag}"] = geo.etf_distance(vectors)
    if f"nc2_equinorm_{tag}" in want:
        out[f"nc2_equinorm_{tag}"] = geo.equinorm(vectors)
    if f"gnc2_riesz2_energy_{tag}" in want:
        out[f"gnc2_riesz2_energy_{tag}"] = geo.riesz_energy(vectors, s=2.0)
    if f"gnc2_log_energy_mean{log_tag}" in want or f"gnc2_log_energy_var{log_tag}" in want:
        mean, var = geo.log_energy(vectors)
        out[f"gnc2_log_energy_mean{log_tag}"], out[f"gnc2_log_energy_var{log_tag}"] = mean, var
    if f"gnc2_ovr_dist_{tag}" in want or f"gnc2_ovr_dist_mean_k_{tag}" in want:
        if vectors.shape[0] < 2:
            rho = torch.full((1,), float("nan"), dtype=torch.float64, device=vectors.device)
        else:
            rho = one_vs_rest_distance(vectors).rho
        out[f"gnc2_ovr_dist_{tag}"], out[f"gnc2_ovr_dist_mean_k_{tag}"] = rho.min(), rho.mean()


def compute_nc_metrics(
    states: Mapping[str, Tensor],
    W: Tensor | None = None,  # noqa: N803
    b: Tensor | None = None,
    metrics: Iterable[str] | None = None,
    *,
    global_mean: Literal["class", "sample"] = "class",
    centered: bool = True,
) -> dict[str, Tensor]:
    """All (or the selected) NC metrics as float64 scalar tensors.

    Keys depend only on the (synced) states and on the arguments, so they agree across ranks:
    ``*_sph`` need spherical states, ``nc1_pinv*`` need ``S``; ``*_weights`` and NC3 need
    ``W`` (``(K, d)``; ``bias_relation = |W mu_G + b|`` also ``b``); NCC metrics need NCC
    counters with a positive count (reference means were set and logits given). Metrics that
    need two present classes are nan otherwise.
    """
    if global_mean not in ("class", "sample"):
        raise ValueError(f"global_mean must be 'class' or 'sample', got {global_mean!r}")
    want = select_metrics(metrics)
    n, _, present = _delta(states)
    out: dict[str, Tensor] = {}
    if "k_eff" in want:
        out["k_eff"] = present.sum().to(torch.float64)
    centred = _nc1_family(out, want, states, "", present, n, global_mean)
    if "s_sph" in states:
        _nc1_family(out, want, states, "_sph", present, n, global_mean)
    mu, _, mu_g = _centre(states, "", present, n, global_mean)
    _geometry(out, want, centred if centered else mu, "means", "")
    if not centered and "nc2_equinorm_means" in want:  # norms: always of the centred means
        out["nc2_equinorm_means"] = geo.equinorm(centred)
    if W is not None:
        w = _f64(W).to(centred.device)
        _geometry(out, want, w, "weights", "_weights")
        if "nc3_self_duality" in want:
            out["nc3_self_duality"] = geo.nc3_self_duality(w[present], centred)
        if "nc3_cos_mean" in want or "nc3_cos_var" in want:
            out["nc3_cos_mean"], out["nc3_cos_var"] = geo.nc3_cos(w[present], centred)
        if b is not None and "bias_relation" in want:
            out["bias_relation"] = (w @ mu_g + _f64(b).to(w.device)).norm()
    if "ncc_n" in states and float(states["ncc_n"].sum()) > 0:
        total = _f64(states["ncc_n"]).sum()
        for name, key, flip in (("nc4_ncc_mismatch", "ncc_agree", True),
                                ("ncc_accuracy", "ncc_correct", False),
                                ("linear_accuracy", "lin_correct", False)):  # fmt: skip
            if name in want:
                frac = _f64(states[key]).sum() / total
                out[name] = 1.0 - frac if flip else frac
    return {key: out[key] for key in METRIC_NAMES if key in out and key in want}
