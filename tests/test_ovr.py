"""One-vs-rest distance (Jiang GNC2): closed forms of nc-metrics.md 5.2 and a brute-force
enumeration of the hull's faces, written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hug_lightning.metrics.ovr import one_vs_rest_distance, project_rows_to_simplex


def simplex_etf(k: int, d: int, seed: int = 0) -> torch.Tensor:
    u = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return torch.cat([u, torch.zeros(k, d - k, dtype=torch.float64)], 1) @ q


def polygon(k: int) -> torch.Tensor:
    a = 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    return torch.stack([a.cos(), a.sin()], 1)


def icosahedron() -> torch.Tensor:
    p = (1 + math.sqrt(5)) / 2
    v = []
    for s1, s2 in itertools.product((1, -1), repeat=2):
        v += [(0, s1, s2 * p), (s1, s2 * p, 0), (s2 * p, 0, s1)]
    return torch.tensor(v, dtype=torch.float64)


def brute_force(vectors: torch.Tensor) -> torch.Tensor:
    """Distance of each unit row to the hull of the others: the least distance to the affine
    hull of a subset of them whose projection has non-negative barycentric weights."""
    u = vectors / vectors.norm(dim=1, keepdim=True)
    k = u.shape[0]
    out = []
    for c in range(k):
        rest = [j for j in range(k) if j != c]
        best = math.inf
        for r in range(1, k):
            for subset in itertools.combinations(rest, r):
                p = u[list(subset)]
                kkt = torch.zeros(r + 1, r + 1, dtype=torch.float64)
                kkt[:r, :r] = 2 * p @ p.T
                kkt[:r, r] = kkt[r, :r] = 1.0
                rhs = torch.cat([2 * p @ u[c], torch.ones(1, dtype=torch.float64)])
                lam = (torch.linalg.pinv(kkt) @ rhs)[:r]
                if lam.min() >= -1e-10 and abs(float(lam.sum()) - 1) < 1e-8:
                    best = min(best, float((u[c] - lam @ p).norm()))
        out.append(best)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k, d", [(3, 3), (10, 10), (10, 32), (100, 128)])
def test_simplex_etf_gives_k_over_k_minus_1(k, d):
    res = one_vs_rest_distance(simplex_etf(k, d))
    assert torch.allclose(res.rho, torch.full((k,), k / (k - 1), dtype=torch.float64),
                          atol=1e-8)
    assert float((res.rho - res.lower).max()) <= 1e-9


@pytest.mark.parametrize("name, vectors, expected", [
    ("square", polygon(4), 1.0),
    ("octahedron", torch.cat([torch.eye(3), -torch.eye(3)]).double(), 1.0),
    ("icosahedron", icosahedron(), 1 - 1 / math.sqrt(5)),
    ("heptagon", polygon(7), 1 - math.cos(2 * math.pi / 7)),
])
def test_universally_optimal_configurations(name, vectors, expected):
    res = one_vs_rest_distance(3.0 * vectors)  # any scale: rows are normalised
    assert torch.allclose(res.rho, torch.full_like(res.rho, expected), atol=1e-8), name
    assert torch.all(res.lower <= res.rho + 1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k, d", [(5, 3), (6, 2), (6, 8)])
def test_random_configurations_equal_the_face_enumeration(seed, k, d):
    x = torch.randn(k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    res = one_vs_rest_distance(x)
    assert torch.allclose(res.rho, brute_force(x), atol=1e-7)
    assert torch.all(res.lower <= res.rho + 1e-12)


def test_a_class_inside_the_others_hull_has_distance_zero():
    """On the circle no unit vector is inside another's hull; with two coincident classes
    each is a vertex of the other's hull: distance 0."""
    x = torch.cat([polygon(5), polygon(5)[:1]])
    res = one_vs_rest_distance(x)
    assert float(res.rho[0]) == pytest.approx(0.0, abs=1e-8)
    assert float(res.rho[5]) == pytest.approx(0.0, abs=1e-8)
    assert float(res.rho[1]) > 0.1


def test_simplex_projection_against_a_sorted_reference():
    v = torch.randn(50, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = project_rows_to_simplex(v)
    assert torch.all(p >= 0) and torch.allclose(p.sum(1), torch.ones(50, dtype=torch.float64))
    # optimality (KKT): v - p = theta on the support, v - p <= theta off it
    theta = (v - p)[p > 0].view(-1)
    for row in range(50):
        sup = p[row] > 0
        t = (v[row] - p[row])[sup]
        assert torch.allclose(t, t[0].expand_as(t))
        assert torch.all((v[row] - p[row])[~sup] <= t[0] + 1e-12)
    assert theta.numel() >= 50


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="K >= 2"):
        one_vs_rest_distance(torch.ones(1, 3))


def test_the_command_logs_them_on_request(cifar10_folder_root, tmp_path):
    """``--nc.metrics [default, ...]``: the default set plus the one-vs-rest distances, for
    the head's rows and the class means of each stage."""
    from conftest import tiny_args
    from hug_lightning.cli import main

    cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--nc.metrics",
                                  "[default, gnc2_ovr_dist_weights, gnc2_ovr_dist_means]")])
    logged = cli.trainer.callback_metrics
    w = cli.model.head.class_vectors
    assert float(logged["nc/val/gnc2_ovr_dist_weights"]) == pytest.approx(
        float(brute_force(w.detach().double()).min()), abs=1e-7)
    assert 0 <= float(logged["nc/train/gnc2_ovr_dist_means"]) <= 2
    assert "nc/val/nc1_cdnv" in logged and "nc/val/gnc2_ovr_dist_mean_k_weights" not in logged


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_vectors_give_nan_not_a_linear_algebra_error(value):
    """A nan or inf class vector (a diverged head) made eigvalsh raise a LinAlgError from
    inside the NC monitor; the other geometry metrics give nan for such input."""
    x = polygon(5)
    x[2, 0] = value
    res = one_vs_rest_distance(x)
    assert res.rho.shape == (5,) and torch.isnan(res.rho).all() and torch.isnan(res.lower).all()
    assert res.iterations == 0


def test_max_iter_is_a_cap_on_the_iterations():
    """The solver ran in blocks of 20 between certificate checks: max_iter 5 ran 20."""
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    full = one_vs_rest_distance(x)
    assert full.iterations > 25  # this one needs more than a block
    for cap in (5, 25):
        res = one_vs_rest_distance(x, max_iter=cap)
        assert res.iterations == cap
        assert float((res.rho - res.lower).max()) > 1e-9  # stopped before converging


def test_a_zero_row_inside_the_hull_is_certified_quickly():
    """A zero row (documented: it stays zero) inside the others' hull has distance 0, reached
    in a few iterations; its certificate stayed negative (about -1: the direction of a
    vanishing residual means nothing), so the solver ran to max_iter (100000, 10 s for K = 6).
    A distance is never negative: the lower bound is at least 0."""
    x = torch.cat([polygon(5), torch.zeros(1, 2, dtype=torch.float64)])
    res = one_vs_rest_distance(x, max_iter=2000)
    assert float(res.rho[5]) == pytest.approx(0.0, abs=1e-9)
    assert float((res.rho - res.lower).max()) <= 1e-9
    assert res.iterations < 2000
    assert torch.all(res.lower >= 0) and torch.all(res.lower <= res.rho + 1e-12)
    assert torch.allclose(res.rho[:5], brute_force(polygon(5)), atol=1e-8)
