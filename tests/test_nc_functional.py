"""Closed-form checks of the pure NC functions (collapsed configurations with known values).

Every expected value below is a hand-derived closed form from section 5 of the doc, never an
output of the code under test. Configurations are built here from their definitions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hug_lightning.metrics import (
    compute_nc_metrics,
    equinorm,
    feature_states,
    log_energy,
    nc1_pinv,
    riesz_energy,
)
from hug_lightning.metrics.functional import METRIC_NAMES, OVR_NAMES

F64 = torch.float64


def rand_orth(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def etf(k: int, d: int) -> torch.Tensor:
    """Unit simplex ETF rows u_c = sqrt(K/(K-1)) (e_c - 1/K), embedded in R^d (d >= K)."""
    u = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=F64) - 1.0 / k)
    return torch.cat([u, torch.zeros(k, d - k, dtype=F64)], dim=1)


def square() -> torch.Tensor:
    return torch.tensor([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=F64)


def octahedron() -> torch.Tensor:
    return torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])


def icosahedron() -> torch.Tensor:
    phi = (1 + math.sqrt(5)) / 2
    rows = []
    for a in (1, -1):
        for b in (phi, -phi):
            rows += [[0, a, b], [a, b, 0], [b, 0, a]]
    v = torch.tensor(rows, dtype=F64)
    return v / v.norm(dim=1, keepdim=True)


def pm_samples(means: torch.Tensor, sigma: float, dirs: torch.Tensor):
    """For each class c the samples mu_c +- sigma v_j: class mean exactly mu_c."""
    feats, labels = [], []
    for c, mu in enumerate(means):
        for v in dirs:
            feats += [mu + sigma * v, mu - sigma * v]
            labels += [c, c]
    return torch.stack(feats), torch.tensor(labels)


def metrics_of(x, y, k, **kw):
    return compute_nc_metrics(feature_states(x, y, k), **kw)


def test_nc1_etf_closed_form():
    k, d, r, sigma = 10, 32, 3.0, 0.5
    q, t = rand_orth(d, 0), torch.linspace(-2, 5, d, dtype=F64)
    x, y = pm_samples(r * etf(k, d), sigma, torch.eye(d, dtype=F64))
    out = metrics_of(x @ q.T + t, y, k)
    assert out["nc1_pinv"].item() == pytest.approx(0.00703125, rel=1e-10)
    assert out["nc1_pinv"].item() == pytest.approx(sigma**2 * (k - 1) ** 2 / (d * k * r**2))
    assert out["nc1_pinv_rank"].item() == k - 1
    assert out["nc1_pinv_cond"].item() == pytest.approx(1.0, rel=1e-9)
    assert out["nc1_trace_ratio"].item() == pytest.approx(sigma**2 / r**2, rel=1e-10)
    assert out["nc1_cdnv"].item() == pytest.approx(sigma**2 * (k - 1) / (2 * k * r**2), rel=1e-10)
    assert out["k_eff"].item() == k


def test_nc1_perturbation_orthogonal_to_means_is_invisible_to_pinv():
    k, d, r, sigma = 10, 32, 3.0, 0.5
    q = rand_orth(d, 1)
    dirs = torch.eye(d, dtype=F64)[k:]  # orthogonal to span(M) (first K coordinates)
    x, y = pm_samples(r * etf(k, d), sigma, dirs)
    out = metrics_of(x @ q.T, y, k)
    assert abs(out["nc1_pinv"].item()) < 1e-12
    assert out["nc1_trace_ratio"].item() == pytest.approx(sigma**2 / r**2, rel=1e-10)
    assert out["nc1_cdnv"].item() == pytest.approx(sigma**2 * (k - 1) / (2 * k * r**2), rel=1e-10)


@pytest.mark.parametrize(
    ("config", "pinv", "cdnv"),
    [(square, 0.5, 5 / 12), (octahedron, 0.5, 9 / 20), (icosahedron, 0.25, 13 / 22)],
)
def test_nc1_tight_frames(config, pinv, cdnv):
    u = config()
    k, d = u.shape
    x, y = pm_samples(u, 1.0, torch.eye(d, dtype=F64))
    out = metrics_of(x, y, k)
    assert out["nc1_pinv"].item() == pytest.approx(pinv, rel=1e-10)
    assert out["nc1_pinv_rank"].item() == min(k - 1, d)
    assert out["nc1_trace_ratio"].item() == pytest.approx(1.0, rel=1e-10)
    assert out["nc1_cdnv"].item() == pytest.approx(cdnv, rel=1e-10)


def test_nc1_features_at_means_are_zero():
    x, y = pm_samples(3.0 * etf(5, 7), 0.0, torch.eye(7, dtype=F64))
    out = metrics_of(x, y, 5)
    for name in ("nc1_pinv", "nc1_trace_ratio", "nc1_cdnv"):
        assert abs(out[name].item()) < 1e-14


def _pairs(k: int) -> int:
    return k * (k - 1) // 2


L2 = math.log(2)
NC2_TABLE = {  # max cos, std ddof1, max-angle dev, ETF dist, log mean, log var (population)
    "square": (square, 0.0, 0.516398, 4 / 9, math.sqrt(2 - 4 / math.sqrt(6)),
               -2 / 3 * L2, L2**2 / 18, 5 / 12),
    "octahedron": (octahedron, 0.0, 0.414039, 8 / 25, math.sqrt(2 - math.sqrt(12 / 5)),
                   -0.6 * L2, 0.04 * L2**2, 9 / 20),
    "icosahedron": (icosahedron, 1 / math.sqrt(5), 0.518200,
                    10 / 11 * (1 / math.sqrt(5) + 1 / 11), math.sqrt(2 - 6 / math.sqrt(33)),
                    -(30 * math.log(16 / 5) + 12 * L2) / 132, 0.066008, 13 / 22),
    "etf10": (lambda: etf(10, 12) @ rand_orth(12, 3).T, -1 / 9, 0.0, 0.0, 0.0,
              -0.5 * math.log(20 / 9), 0.0, 9 / 20),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NC2_TABLE))
def test_nc2_table(name):
    config, max_cos, std1, dev, etf_d, log_mean, log_var_pop, riesz2 = NC2_TABLE[name]
    u = config()
    k = u.shape[0]
    x, y = u.repeat(3, 1), torch.arange(k).repeat(3)
    out = metrics_of(x + 0.25, y, k, W=u)  # translation: means are centred before use
    log_var = log_var_pop * _pairs(k) / (_pairs(k) - 1)  # ddof 1 over the P pairs
    for tag, ltag in (("means", ""), ("weights", "_weights")):
        assert out[f"gnc2_max_cos_{tag}"].item() == pytest.approx(max_cos, abs=1e-12)
        angle = math.degrees(math.acos(max_cos))
        assert out[f"gnc2_min_angle_{tag}"].item() == pytest.approx(angle, rel=1e-9)
        assert out[f"nc2_equiangle_std_{tag}"].item() == pytest.approx(std1, abs=1e-6)
        assert out[f"nc2_maxangle_dev_{tag}"].item() == pytest.approx(dev, abs=1e-12)
        assert out[f"nc2_etf_dist_{tag}"].item() == pytest.approx(etf_d, abs=1e-7)
        assert out[f"gnc2_log_energy_mean{ltag}"].item() == pytest.approx(log_mean, abs=1e-12)
        assert out[f"gnc2_log_energy_var{ltag}"].item() == pytest.approx(log_var, abs=1e-6)
        assert out[f"gnc2_riesz2_energy_{tag}"].item() == pytest.approx(riesz2, rel=1e-12)
        assert abs(out[f"nc2_equinorm_{tag}"].item()) < 1e-12


def test_icosahedron_min_angle():
    u = icosahedron()
    out = compute_nc_metrics(feature_states(u, torch.arange(12), 12))
    assert out["gnc2_min_angle_means"].item() == pytest.approx(63.435, abs=5e-4)


def test_optimal_configurations_minimise_energies():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        v = torch.randn(6, 3, generator=g, dtype=F64)
        assert riesz_energy(v).item() >= 9 / 20 - 1e-12
        assert log_energy(v)[0].item() >= -0.6 * L2 - 1e-12


def test_equinorm_cv():
    norms = torch.tensor([1.0, 1.0, 1.0, 3.0], dtype=F64)
    dirs = torch.nn.functional.normalize(torch.randn(4, 2, dtype=F64), dim=1)
    assert equinorm(norms[:, None] * dirs).item() == pytest.approx(2 / 3, rel=1e-12)
    centred = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], dtype=F64)
    out = metrics_of(centred + torch.tensor([5.0, -2.0], dtype=F64), torch.arange(4), 4,
                     W=norms[:, None] * dirs, metrics=["nc2_equinorm_means",
                                                       "nc2_equinorm_weights"])  # fmt: skip
    assert out["nc2_equinorm_means"].item() == pytest.approx(2 / 3, rel=1e-12)
    assert out["nc2_equinorm_weights"].item() == pytest.approx(2 / 3, rel=1e-12)


def _etf_states(k=10, d=14, r=2.0):
    m = r * etf(k, d) @ rand_orth(d, 7).T
    return m, feature_states(m + 1.5, torch.arange(k), k)


def test_nc3_closed_forms():
    k = 10
    m, states = _etf_states(k)
    for w, duality, cos_mean in ((3.0 * m, 0.0, 0.0), (-m, 4.0, 2.0)):
        out = compute_nc_metrics(states, W=w)
        assert out["nc3_self_duality"].item() == pytest.approx(duality, abs=1e-12)
        assert out["nc3_cos_mean"].item() == pytest.approx(cos_mean, abs=1e-12)
        assert abs(out["nc3_cos_var"].item()) < 1e-12
    swapped = m[[1, 0] + list(range(2, k))]
    out = compute_nc_metrics(states, W=swapped)
    assert out["nc3_self_duality"].item() == pytest.approx(4 / (k - 1), rel=1e-12)
    assert out["nc3_cos_mean"].item() == pytest.approx(2 / (k - 1), rel=1e-12)
    assert out["nc3_cos_var"].item() == pytest.approx(160 / 729, rel=1e-12)  # 0.21948


def test_bias_relation():
    m, states = _etf_states()
    w, b = torch.randn(10, 14, dtype=F64), torch.randn(10, dtype=F64)
    out = compute_nc_metrics(states, W=w, b=b)
    expected = (w @ torch.full((14,), 1.5, dtype=F64) + b).norm()  # class-average mean = t
    assert out["bias_relation"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_nc1_pinv_function_rank_and_cond():
    m = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=F64))[:2]  # 2 rows -> rank 1
    val, rank, cond = nc1_pinv(torch.eye(3, dtype=F64), m - m.mean(0))
    # centred rows +-(1, -0.5, 0): s_1^2 = 2.5, v_1^T I v_1 = 1
    assert (val.item(), rank.item(), cond.item()) == pytest.approx((1 / 2.5, 1.0, 1.0))


def test_global_mean_sample_vs_class():
    a = torch.tensor([1.0, 0.0], dtype=F64)
    e2 = torch.tensor([0.0, 1.0], dtype=F64)
    x = torch.stack([a + e2, a - e2] + [-a + e2, -a - e2] * 3)  # n = (2, 6), sigma_c^2 = 1
    y = torch.tensor([0, 0] + [1] * 6)
    states = feature_states(x, y, 2)
    cls = compute_nc_metrics(states, metrics=["nc1_trace_ratio"])["nc1_trace_ratio"]
    smp = compute_nc_metrics(states, metrics=["nc1_trace_ratio"], global_mean="sample")
    assert cls.item() == pytest.approx(1.0)  # tr Sigma_B = (1 + 1) / 2
    assert smp["nc1_trace_ratio"].item() == pytest.approx(1 / 1.25)  # mu_G = -a/2


def test_metric_selection_and_unknown_names():
    m, states = _etf_states()
    out = compute_nc_metrics(states, W=m, metrics=["k_eff", "nc1_cdnv", "nc3_cos_var"])
    assert list(out) == ["k_eff", "nc1_cdnv", "nc3_cos_var"]
    with pytest.raises(ValueError, match="unknown"):
        compute_nc_metrics(states, metrics=["nc9"])
    full = compute_nc_metrics(states, W=m, b=torch.zeros(10))
    assert set(full) == set(METRIC_NAMES) - {"nc4_ncc_mismatch", "ncc_accuracy",
                                             "linear_accuracy"} - set(OVR_NAMES)
    assert all(v.dtype == F64 and v.ndim == 0 for v in full.values())
    more = compute_nc_metrics(states, W=m, b=torch.zeros(10), metrics=["default", *OVR_NAMES])
    assert set(more) == set(full) | set(OVR_NAMES)  # "default" stands for the default set
    for name in OVR_NAMES:  # ETF means and weights: K / (K - 1) for every class
        assert more[name].item() == pytest.approx(10 / 9, abs=1e-9), name


def test_equinorm_stays_centred_when_unit_metrics_are_not():
    """``centered=False`` moves the unit-vector metrics to the uncentred means; the norms of
    an offset ETF's centred means stay equal (equinorm 0)."""
    m, states = _etf_states()  # ETF means offset by 1.5
    centred = compute_nc_metrics(states)
    raw = compute_nc_metrics(states, centered=False)
    assert abs(raw["nc2_equinorm_means"].item()) < 1e-12
    assert abs(centred["nc2_etf_dist_means"].item()) < 1e-7
    assert raw["nc2_etf_dist_means"].item() > 0.1  # the offset ETF is not an ETF uncentred


def test_nc3_needs_two_present_classes():
    x = torch.randn(6, 4, dtype=F64)
    states = feature_states(x, torch.zeros(6, dtype=torch.long), 3)
    out = compute_nc_metrics(states, W=torch.randn(3, 4, dtype=F64))
    for name in ("nc3_self_duality", "nc3_cos_mean", "nc3_cos_var"):
        assert math.isnan(out[name].item()), name


def test_feature_states_pivots_on_the_class_means():
    """Offline states are exact for features far from the origin (offset 1e4, spread 1e-2):
    compared with a two-pass computation written here; pivot 0 loses digits on such data."""
    g = torch.Generator().manual_seed(3)
    k, d = 5, 6
    centres = 1e4 + torch.randn(k, d, generator=g, dtype=F64)
    y = torch.arange(200) % k
    x = centres[y] + 1e-2 * torch.randn(200, d, generator=g, dtype=F64)
    mu = torch.stack([x[y == c].mean(0) for c in range(k)])
    var = torch.stack([(x[y == c] - mu[c]).square().sum(1).mean() for c in range(k)])
    pairs = list(itertools.combinations(range(k), 2))
    cdnv = sum((var[i] + var[j]) / (2 * (mu[i] - mu[j]).square().sum()) for i, j in pairs)
    cdnv = (cdnv / len(pairs)).item()
    exact = compute_nc_metrics(feature_states(x, y, k), metrics=["nc1_cdnv"])["nc1_cdnv"]
    assert exact.item() == pytest.approx(cdnv, rel=1e-10)
    zero = compute_nc_metrics(feature_states(x, y, k, pivot="zero"), metrics=["nc1_cdnv"])
    assert abs(zero["nc1_cdnv"].item() / cdnv - 1) > 1e-8  # the data does stress cancellation
    with pytest.raises(ValueError, match="pivot"):
        feature_states(x, y, k, pivot="median")
