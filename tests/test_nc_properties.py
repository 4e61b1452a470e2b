"""Tests added after a mutation-testing audit of ``hug_lightning/metrics`` (each one kills a
mutant that the existing NC tests let through). Expected values come from closed forms or from
straightforward references written here (brute force, duplication, two-pass), never from the
code under test.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from hug_lightning.metrics import (
    NCFeatureStats,
    compute_nc_metrics,
    feature_states,
    nc1_pinv,
    ncc_predict,
    riesz_energy,
)
from hug_lightning.metrics.callback import NeuralCollapseMonitor
from test_nc_functional import etf, icosahedron, octahedron, pm_samples, square

F64 = torch.float64


def test_nc1_pinv_keeps_small_but_genuine_singular_values():
    """Structural rank min(K-1, d), no tolerance (docs 3.4, 7): centred means (1, e), (-1, e),
    (0, -2e) give M^T M = diag(2, 6 e^2); with Sigma_W = sigma^2/2 I the closed form is
    nc1_pinv = (sigma^2/2) (1/2 + 1/(6 e^2)). s_2/s_1 = sqrt(3) e ~ 1.7e-4 is well above the
    1e-12 near-singular warning, so the small direction must be inverted, not dropped."""
    eps, sigma = 1e-4, 0.1
    m = torch.tensor([[1.0, eps], [-1.0, eps], [0.0, -2 * eps]], dtype=F64)
    x, y = pm_samples(m + torch.tensor([0.5, -0.25], dtype=F64), sigma, torch.eye(2, dtype=F64))
    out = compute_nc_metrics(feature_states(x, y, 3), metrics=["nc1_pinv", "nc1_pinv_rank"])
    expected = sigma**2 / 2 * (0.5 + 1 / (6 * eps**2))
    assert out["nc1_pinv_rank"].item() == 2
    assert out["nc1_pinv"].item() == pytest.approx(expected, rel=1e-6)
    # the same from the definition (1/K) tr(Sigma_W Sigma_B^+) with a full-precision pinv
    sw, sb = sigma**2 / 2 * np.eye(2), m.numpy().T @ m.numpy() / 3
    ref = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-15)) / 3
    assert out["nc1_pinv"].item() == pytest.approx(ref, rel=1e-6)


def test_nc1_pinv_cond_and_near_singular_warning():
    """nc-metrics.md 3.4: report ``cond = s_1^2 / s_r^2`` and warn when ``s_r < 1e-12 s_1``.
    The same centred means as above, (1, e), (-1, e), (0, -2e): ``M^T M = diag(2, 6 e^2)``,
    so cond = 1 / (3 e^2); only the ETF's cond = 1 was checked, where squaring is invisible."""
    def centred(e):
        return torch.tensor([[1.0, e], [-1.0, e], [0.0, -2 * e]], dtype=F64)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # s_2/s_1 = sqrt(3) 1e-4: no warning
        _, rank, cond = nc1_pinv(torch.eye(2, dtype=F64), centred(1e-4))
    assert rank.item() == 2
    assert cond.item() == pytest.approx(1 / (3 * 1e-4**2), rel=1e-9)
    with pytest.warns(UserWarning, match="near-singular"):  # s_2/s_1 = sqrt(3) 1e-13
        _, _, cond = nc1_pinv(torch.eye(2, dtype=F64), centred(1e-13))
    assert math.isclose(cond.item(), 1 / (3 * 1e-13**2), rel_tol=1e-2)  # SVD: ~eps s_1 abs.


def test_ncc_never_predicts_a_class_without_reference_mean():
    """A class whose reference row is not finite is never NCC-predicted, even for a sample that
    sits at the average of the valid reference means (brute-force reference over valid rows)."""
    ref = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [float("nan"), float("nan")]], dtype=F64)
    x = torch.tensor([[0.0, 0.0], [0.1, 0.05], [-0.2, 0.0], [3.0, 1.0]], dtype=F64)
    valid = torch.isfinite(ref).all(1)
    dist = ((x[:, None, :] - torch.nan_to_num(ref)[None]) ** 2).sum(-1)
    expected = dist.masked_fill(~valid[None, :], float("inf")).argmin(1)  # ties: lowest index
    assert ncc_predict(x, ref).tolist() == expected.tolist() == [0, 1, 0, 1]
    m = NCFeatureStats(3, 2, metrics=["ncc_accuracy"])
    m.set_reference(ref, pivot=False)
    y = torch.tensor([0, 1, 0, 1])
    m.update(x, y, logits=torch.zeros(4, 3))
    assert m.compute()["ncc_accuracy"].item() == 1.0


def _data(seed=0, n=60, k=4, d=5):
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(k, d, generator=g, dtype=F64) + 3.0
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(k, d, generator=g, dtype=F64)
    return x, y, w, centres + 0.3


def _assert_same(got, exp, rel=1e-10):
    assert set(got) == set(exp)
    for key in exp:
        assert float(got[key]) == pytest.approx(float(exp[key]), rel=rel, abs=1e-12), key


def test_integer_weights_equal_duplicated_samples():
    """Weights are real per-sample multiplicities (states are sum_i w_i f(x_i)): weight 2 or 3
    must give exactly the metrics of the sample repeated 2 or 3 times."""
    x, y, w, ref = _data()
    weight = (torch.arange(len(y)) % 3 + 1).to(F64)  # 1, 2, 3, ...
    logits = x @ w.T
    weighted, repeated = NCFeatureStats(4, 5), NCFeatureStats(4, 5)
    for m in (weighted, repeated):
        m.set_reference(ref, pivot=False)
    weighted.update(x, y, logits=logits, weight=weight)
    idx = torch.arange(len(y)).repeat_interleave(weight.long())
    repeated.update(x[idx], y[idx], logits=logits[idx])
    _assert_same(weighted.compute(W=w), repeated.compute(W=w))


def test_merge_state_of_shards_equals_one_pass():
    """torchmetrics ``merge_state`` reduces with each state's ``dist_reduce_fx``: the states are
    sums, so merging three shards one after the other must give the one-pass states and metrics
    (``nc1_align_sph`` depends on the absolute counts, the NCC fractions on their ratios)."""
    x, y, w, ref = _data(1)
    logits = x @ w.T
    whole = NCFeatureStats(4, 5)
    whole.set_reference(ref, pivot=False)
    whole.update(x, y, logits=logits)
    shards = [NCFeatureStats(4, 5) for _ in range(3)]
    for m, sl in zip(shards, (slice(0, 10), slice(10, 25), slice(25, None))):
        m.set_reference(ref, pivot=False)
        m.update(x[sl], y[sl], logits=logits[sl])
    shards[0].merge_state(shards[1])
    shards[0].merge_state(shards[2])
    assert shards[0].n.sum().item() == len(y)
    _assert_same(shards[0].compute(W=w), whole.compute(W=w))


def test_absent_class_keeps_its_previous_pivot():
    """``set_reference`` with a non-finite row (class absent from the epoch that produced the
    means) keeps that class's previous pivot; resetting it to 0 would lose digits on features
    far from the origin. Checked on the pivot and against a two-pass CDNV written here."""
    g = torch.Generator().manual_seed(2)
    k, d = 3, 4
    centres = 1e4 + torch.randn(k, d, generator=g, dtype=F64)
    y = torch.arange(120) % k
    x = centres[y] + 1e-2 * torch.randn(120, d, generator=g, dtype=F64)
    m = NCFeatureStats(k, d, metrics=["nc1_cdnv"])
    m.set_reference(centres + 1e-3)
    later = centres.clone()
    later[2] = float("nan")
    m.set_reference(later)
    assert torch.equal(m.pivot[2], centres[2] + 1e-3)
    m.update(x, y)
    mu = torch.stack([x[y == c].mean(0) for c in range(k)])
    var = torch.stack([(x[y == c] - mu[c]).square().sum(1).mean() for c in range(k)])
    pairs = list(itertools.combinations(range(k), 2))
    cdnv = sum((var[i] + var[j]) / (2 * (mu[i] - mu[j]).square().sum()) for i, j in pairs)
    assert m.compute()["nc1_cdnv"].item() == pytest.approx((cdnv / len(pairs)).item(), rel=1e-9)


def test_monitor_state_dict_includes_buffered_training_batches():
    """A checkpoint taken mid-epoch (fewer batches than ``buffer_batches`` seen) must contain
    every training sample seen so far."""
    monitor = NeuralCollapseMonitor(metrics=["nc1_cdnv"], buffer_batches=8)
    monitor.collectors = {"train": NCFeatureStats(3, 2, metrics=["nc1_cdnv"])}
    for i in range(3):
        feats = torch.randn(5, 2, generator=torch.Generator().manual_seed(i))
        monitor._update("train", {"features": feats, "labels": torch.arange(5) % 3})
    saved = monitor.state_dict()["collectors"]["train"]
    assert saved["n"].sum().item() == 15
    assert saved["n"].tolist() == [6.0, 6.0, 3.0]


def test_collector_rejects_a_label_out_of_range_and_a_wrong_width():
    """They raised IndexError / a reshape error from deep inside the update."""
    col = NCFeatureStats(4, 3)
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 4\)"):
        col.update(torch.randn(2, 3), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"label -1 is outside"):
        col.update(torch.randn(2, 3), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"features of shape \(2, 4\) .* expected \(\.\.\., 3\)"):
        col.update(torch.randn(2, 4), torch.tensor([0, 1]))
    col.update(torch.randn(2, 3), torch.tensor([0, 3]))  # in range: accepted
    assert col.n.sum() == 2


def test_metrics_that_need_a_disabled_statistic_are_a_config_error(tmp_path):
    """--nc.spherical false with a *_sph metric failed in setup, after the run folder existed."""
    from hug_lightning.cli import ConfigError, main
    with pytest.raises(ValueError, match=r"\['nc1_pinv_sph'\] need --nc.spherical true"):
        NeuralCollapseMonitor(metrics=["nc1_pinv_sph"], spherical=False)
    with pytest.raises(ValueError, match=r"\['nc1_pinv'\] need --nc.track_cov true"):
        NeuralCollapseMonitor(metrics=["nc1_pinv", "nc1_cdnv"], track_cov=False)
    with pytest.raises(ConfigError, match="need --nc.spherical true"):
        main(["fit", "--config", "ufm_hug", "--nc.spherical", "false", "--nc.metrics",
              "[nc1_pinv_sph]", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert not list(tmp_path.rglob("version_*"))


def test_collector_options_global_mean_and_centered_reach_the_metrics():
    """``NCFeatureStats(global_mean=..., centered=...)`` (the collector, not only the pure
    function). Means 2 e_c (orthonormal, uncentred): uncentred max cos 0; centred they form a
    simplex ETF, max cos -1/(K-1). Classes of 2 and 6 samples at +-a with unit spread:
    tr Sigma_W = 1; class-average mu_G = 0 gives tr Sigma_B = 1, the sample mean -a/2 gives
    (1.5^2 + 0.5^2) / 2 = 1.25."""
    k, d = 4, 5
    x, y = pm_samples(2.0 * torch.eye(k, d, dtype=F64), 0.1, torch.eye(d, dtype=F64))
    for centered, max_cos in ((True, -1 / (k - 1)), (False, 0.0)):
        m = NCFeatureStats(k, d, centered=centered, metrics=["gnc2_max_cos_means"])
        m.update(x, y)
        assert m.compute()["gnc2_max_cos_means"].item() == pytest.approx(max_cos, abs=1e-12)
    a, e2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    x = torch.stack([a + e2, a - e2] + [-a + e2, -a - e2] * 3)
    y = torch.tensor([0, 0] + [1] * 6)
    for global_mean, ratio in (("class", 1.0), ("sample", 1 / 1.25)):
        m = NCFeatureStats(2, 2, global_mean=global_mean, metrics=["nc1_trace_ratio"])
        m.update(x, y)
        assert m.compute()["nc1_trace_ratio"].item() == pytest.approx(ratio, rel=1e-12)


def test_ncc_predict_is_the_euclidean_nearest_reference_mean():
    """``argmin_c |x - r_c|^2`` by brute force, with reference means of unequal norms close to
    the features (the unit tests' other NCC data let a wrong factor on <x - rbar, r'_c> pass:
    means at equal norms or features exactly at a mean); through the collector as well."""
    g = torch.Generator().manual_seed(4)
    ref = 3.0 + torch.randn(6, 3, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, 6)[:, None]
    x = 3.0 + 1.5 * torch.randn(400, 3, generator=g, dtype=F64)
    expected = torch.cdist(x, ref, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.equal(ncc_predict(x, ref), expected)
    assert len(expected.unique()) == 6  # every class is predicted somewhere
    y = torch.arange(400) % 6
    m = NCFeatureStats(6, 3, metrics=["ncc_accuracy"])
    m.set_reference(ref, pivot=False)
    m.update(x, y, logits=torch.zeros(400, 6))
    want = (expected == y).double().mean().item()
    assert m.compute()["ncc_accuracy"].item() == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize(("config", "total"), [
    (lambda: etf(4, 4), 3.674235), (square, 2 * math.sqrt(2) + 1),
    (octahedron, 6 * math.sqrt(2) + 1.5), (icosahedron, 49.165253)])
def test_riesz1_sums_of_the_doc_table(config, total):
    """nc-metrics.md 5.2: the Riesz-1 (Thomson) column, summed over pairs, from the metrics'
    ``riesz_energy(s=1)`` (the collector reports s = 2 only, so ``s`` went unchecked)."""
    u = 1.7 * config()
    pairs = u.shape[0] * (u.shape[0] - 1) // 2
    assert (riesz_energy(u, s=1.0) * pairs).item() == pytest.approx(total, abs=1e-6)


def test_regular_polygon_row_of_the_doc_table():
    """nc-metrics.md 5.2, regular K-gon: max cos = cos(2 pi / K), min angle 360/K degrees."""
    k = 7
    t = 2 * math.pi * torch.arange(k, dtype=F64) / k
    gon = torch.stack([t.cos(), t.sin()], dim=1)
    out = compute_nc_metrics(feature_states(gon + 0.3, torch.arange(k), k),
                             metrics=["gnc2_max_cos_means", "gnc2_min_angle_means"])
    assert out["gnc2_max_cos_means"].item() == pytest.approx(math.cos(2 * math.pi / k), abs=1e-12)
    assert out["gnc2_min_angle_means"].item() == pytest.approx(360 / k, rel=1e-10)
