"""Documented NC behaviours no test pinned (each test kills a mutant the suite let through).

Expected values come from closed forms or from references written here, never from the code
under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from hug_lightning.metrics import NCFeatureStats, compute_nc_metrics, feature_states, log_energy
from hug_lightning.metrics.functional_states import (init_states, ncc_predict, rebase_states,
                                                     update_states)

F64 = torch.float64


def test_compute_follows_a_changed_classifier():
    """compute_with_cache is off (collapse.py): a second compute with other classifier rows
    gives those rows' metrics, not the first call's cached dict."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=F64), torch.arange(40) % 4
    w1 = torch.randn(4, 5, generator=g, dtype=F64)
    w2 = torch.eye(4, 5, dtype=F64)  # orthonormal rows: max cosine 0
    m = NCFeatureStats(4, 5)
    m.update(x, y)
    m.compute(W=w1)
    second = m.compute(W=w2)
    assert second["gnc2_max_cos_weights"].item() == pytest.approx(0.0, abs=1e-15)
    expected = compute_nc_metrics(feature_states(x, y, 4, pivot="zero"), W=w2)
    for key in ("nc3_self_duality", "nc3_cos_mean", "nc2_etf_dist_weights"):
        assert second[key].item() == pytest.approx(expected[key].item(), rel=1e-12), key


def test_states_loaded_in_float32_accumulate_in_float64_again():
    """A state dict saved in float32 (torchmetrics assigns loaded states as they are) must not
    turn the accumulation into float32: the next update casts the states back."""
    m = NCFeatureStats(2, 3)
    m.update(torch.ones(2, 3, dtype=F64), torch.tensor([0, 1]))
    saved = {k: v.float() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    fresh = NCFeatureStats(2, 3)
    fresh.load_state_dict(saved)
    tiny = 2.0**-30  # lost next to 1.0 in float32, kept in float64
    fresh.update(torch.full((1, 3), tiny, dtype=F64), torch.tensor([0]))
    assert all(getattr(fresh, name).dtype == F64 for name in fresh._defaults)
    assert fresh.s[0, 0].item() == 1.0 + tiny
    assert fresh.q[0].item() == 3.0 + 3 * tiny**2


def test_zero_class_vector_counts_as_cosine_zero():
    """functional_geometry: a zero row stays zero (cosine 0 to every row), not nan. Three
    equally spaced collinear class means: the middle centred mean is exactly 0."""
    x = torch.tensor([[-1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=F64)
    names = ["gnc2_max_cos_means", "gnc2_min_angle_means", "nc2_maxangle_dev_means",
             "nc2_equiangle_std_means", "gnc2_log_energy_mean"]  # nc1_pinv: rank 1 < K - 1
    out = compute_nc_metrics(feature_states(x, torch.arange(3), 3), metrics=names)
    # unit centred means (-1, 0), (0, 0), (1, 0): cosines 0, -1, 0 over the pairs (01, 02, 12)
    assert out["gnc2_max_cos_means"].item() == 0.0
    assert out["gnc2_min_angle_means"].item() == pytest.approx(90.0, abs=1e-12)
    assert out["nc2_maxangle_dev_means"].item() == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert out["nc2_equiangle_std_means"].item() == pytest.approx(math.sqrt(1 / 3))
    # unit distances 1, 2, 1: log(1/D) = 0, -ln 2, 0
    assert out["gnc2_log_energy_mean"].item() == pytest.approx(-math.log(2) / 3)


def test_coincident_class_directions_have_cosine_one_and_angle_zero():
    """Cosines are clamped to [-1, 1] before the arccos: two equal rows (1, 1, 1) normalise to
    a cosine of 1 + 2e-16 in float64, which unclamped gives max_cos > 1 and a nan angle."""
    from hug_lightning.metrics.functional_geometry import cosine_stats

    v = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 0.0]], dtype=F64)
    stats = cosine_stats(v)
    assert stats["max_cos"].item() == 1.0
    assert stats["min_angle"].item() == 0.0


def test_coincident_class_directions_give_a_finite_log_energy():
    """Distances are clamped below by the smallest normal float before the log (nc-metrics.md
    3.4: "clamp |Delta| >= tiny"): two classes with the same direction give a large finite
    log energy, not inf (and a finite variance, not nan)."""
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=F64)
    mean, var = log_energy(v)
    big = -math.log(torch.finfo(F64).tiny)  # log(1/tiny) = 708.39...
    kern = torch.tensor([big, -0.5 * math.log(2), -0.5 * math.log(2)], dtype=F64)
    assert mean.item() == pytest.approx(kern.mean().item(), rel=1e-12)
    assert var.item() == pytest.approx(kern.var(correction=1).item(), rel=1e-12)


@pytest.mark.parametrize("sfx", ["", "_sph"])
def test_rebase_states_equals_accumulating_around_the_new_pivots(sfx):
    """rebase_states is exact algebra on every state of the family, S included (a persistent,
    checkpointed state): moving the sums to new pivots equals summing around them directly."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g, dtype=F64) + 3.0, torch.arange(30) % 3
    w = torch.rand(30, generator=g, dtype=F64)
    old, new = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(2))
    kw_old, kw_new = ({"pivot" + sfx: p} for p in (old, new))
    before, direct = init_states(3, 4, ncc=False), init_states(3, 4, ncc=False)
    update_states(before, x, y, weight=w, **kw_old)
    update_states(direct, x, y, weight=w, **kw_new)
    moved = rebase_states(before, old, new, sfx)
    assert set(moved) == {"s" + sfx, "q" + sfx, "S" + sfx}
    for key, value in moved.items():
        torch.testing.assert_close(value, direct[key], rtol=1e-12, atol=1e-10, msg=key)


def test_projector_sample_is_class_balanced_on_a_set_stored_class_by_class():
    """Image folders list the validation set class by class: the first 1000 features of
    CIFAR-10's test set are all of class 0. The sample keeps ceil(1000 / K) per class, the
    first met of each, whatever the batch boundaries."""
    from hug_lightning.metrics.figures import FeatureSample

    k, per_class = 10, 300
    labels = torch.arange(k).repeat_interleave(per_class)
    features = torch.randn(k * per_class, 6, generator=torch.Generator().manual_seed(0))
    sample = FeatureSample(1000, num_classes=k)
    for start in range(0, len(labels), 128):
        sample.add(features[start:start + 128], labels[start:start + 128])
    expected = torch.cat([torch.arange(c * per_class, c * per_class + 100) for c in range(k)])
    assert torch.equal(torch.cat(sample.labels), labels[expected])
    assert torch.equal(torch.cat(sample.features), features[expected])
    small = FeatureSample(50)  # no num_classes: the first 50
    for start in range(0, len(labels), 128):
        small.add(features[start:start + 128], labels[start:start + 128])
    assert torch.equal(torch.cat(small.features), features[:50])


def test_monitor_projector_sample_reaches_the_last_class_of_a_long_ordered_set():
    """Found in review: the monitor fed the sample only the first 64 validation batches (the
    feature-norm histogram's cap), so a set stored class by class and longer than 64 batches
    (CIFAR-10-LT's test set, val_split 0, in batches of 128) lost its last classes."""
    from types import SimpleNamespace

    from hug_lightning.metrics.callback import NeuralCollapseMonitor

    monitor = NeuralCollapseMonitor(figures_every=1)
    monitor._val_sample.num_classes = 10
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, is_global_zero=True)
    labels = torch.arange(10).repeat_interleave(1000)  # 10000 samples, class by class
    features = torch.randn(len(labels), 4, generator=torch.Generator().manual_seed(0))
    for i, start in enumerate(range(0, len(labels), 128)):
        out = {"features": features[start:start + 128], "labels": labels[start:start + 128]}
        monitor.on_validation_batch_end(trainer, None, out, None, i)
    assert len(monitor._val_norms) == 64  # the histogram keeps its cap
    kept = torch.cat(monitor._val_sample.labels)
    assert torch.equal(kept.bincount(minlength=10), torch.full((10,), 100))
    # nothing is copied to the host where no figure is logged: an epoch between figure
    # epochs, or a rank other than 0
    for epoch, rank0 in ((0, False), (1, True)):
        quiet = NeuralCollapseMonitor(figures_every=3 if rank0 else 1)
        quiet._val_sample.num_classes = 10
        other = SimpleNamespace(sanity_checking=False, current_epoch=epoch,
                                is_global_zero=rank0)
        quiet.on_validation_batch_end(other, None, out, None, 0)
        assert quiet._val_norms == [] and quiet._val_sample.labels == []


@pytest.mark.parametrize("resumed", [(59,), (39, 59)])
def test_a_resumed_run_keeps_the_earlier_projector_embeddings(tmp_path, resumed):
    """Found by the DDP audit: TensorBoard's writer rewrites ``projector_config.pbtxt`` with the
    embeddings of its own process only, so a fit resumed into its folder (``--ckpt_path last``,
    the grid runner's resume) dropped every earlier epoch's ``nc_fig/val_features`` from the
    Projector (their files stayed, unlisted). Two writers in turn, as a fit and its resume; a
    resume from an earlier checkpoint logs step 39 again: listed once, not twice."""
    from types import SimpleNamespace

    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from google.protobuf import text_format
    from torch.utils.tensorboard import SummaryWriter

    from hug_lightning.metrics.figures import FeatureSample

    sample = FeatureSample(20, num_classes=2)
    sample.add(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)),
               torch.arange(20) % 2)
    for steps in ((19, 39), resumed):  # the fit, then its resume (a new writer, same folder)
        writer = SummaryWriter(str(tmp_path))
        for step in steps:
            sample.log(SimpleNamespace(experiment=writer), step)
        writer.close()
    config = text_format.Parse((tmp_path / "projector_config.pbtxt").read_text(),
                               ProjectorConfig())
    names = [e.tensor_name for e in config.embeddings]
    assert names == [f"nc_fig/val_features:{s:05d}" for s in (19, 39, 59)]
    for embedding in config.embeddings:
        assert (tmp_path / embedding.tensor_path).is_file()


def test_class_variances_are_clamped_at_zero():
    """sigma_c^2 = q_c/n_c - |d_c|^2 cancels for a collapsed class; a rounding-level negative
    result is reported as 0 (documented clamp), so CDNV cannot go negative."""
    from hug_lightning.metrics import class_variances

    states = {"n": torch.tensor([2.0, 2.0], dtype=torch.float64),
              "s": torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
              "q": torch.tensor([2.0 - 1e-12, 8.5], dtype=torch.float64)}  # class 0: -5e-13
    var = class_variances(states)
    assert var.tolist() == [0.0, 0.25]
    assert compute_nc_metrics(states, metrics=["nc1_cdnv"])["nc1_cdnv"].item() >= 0.0


def test_weighted_feature_states_pivot_on_the_weighted_means():
    """feature_states' pivots are the weighted class means (and, for the spherical family, the
    means of x/|x|): zero-weight samples far from the data must not move them, or the one-pass
    sums lose all digits on features far from the origin. Reference: a two-pass CDNV of the
    kept samples, raw and spherical, written here."""
    g = torch.Generator().manual_seed(4)
    k, d = 4, 5
    centres = 1e4 + torch.randn(k, d, generator=g, dtype=torch.float64)
    y = torch.arange(120) % k
    x = centres[y] + 1e-2 * torch.randn(120, d, generator=g, dtype=torch.float64)
    weight = (torch.arange(120) % 3 != 0).to(torch.float64)
    x[weight == 0] = -3e4  # dropped samples (e.g. padded duplicates): far away, weight 0

    def cdnv(feats):
        keep = weight > 0
        f, lab = feats[keep], y[keep]
        mu = torch.stack([f[lab == c].mean(0) for c in range(k)])
        var = torch.stack([(f[lab == c] - mu[c]).square().sum(1).mean() for c in range(k)])
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        return sum(((var[i] + var[j]) / (2 * (mu[i] - mu[j]).square().sum())).item()
                   for i, j in pairs) / len(pairs)

    out = compute_nc_metrics(feature_states(x, y, k, weight=weight),
                             metrics=["nc1_cdnv", "nc1_cdnv_sph"])
    assert out["nc1_cdnv"].item() == pytest.approx(cdnv(x), rel=1e-8)
    unit = x / x.norm(dim=1, keepdim=True)
    assert out["nc1_cdnv_sph"].item() == pytest.approx(cdnv(unit), rel=1e-6)


def test_nc1_family_is_nan_with_one_present_class():
    """One present class has no between-class structure (its centred mean is 0): every NC1
    value is nan, as compute_nc_metrics documents, not ``tr Sigma_W / 0 = inf``."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=g, dtype=F64), torch.zeros(10, dtype=torch.long)
    names = ["k_eff", "nc1_pinv", "nc1_trace_ratio", "nc1_cdnv", "nc1_trace_ratio_sph",
             "nc1_cdnv_sph", "nc1_pinv_sph"]
    out = compute_nc_metrics(feature_states(x, y, 3), metrics=names)
    assert out.pop("k_eff").item() == 1.0
    assert set(out) == set(names) - {"k_eff"}
    assert all(math.isnan(v.item()) for v in out.values()), out


def test_ncc_predict_in_float32_far_from_the_origin():
    """ncc_predict centres the reference means before the scores (``|r'_c|^2 - 2 <x - rbar,
    r'_c>``): in float32 (the states' dtype on MPS) features 1000 away from the origin keep
    their nearest mean, where ``|r_c|^2 - 2 <x, r_c>`` (about 3e6, rounding steps of 0.25)
    swaps close classes. Reference: exact differences in float64 of the same float32 values."""
    g = torch.Generator().manual_seed(4)
    ref = (1e3 + torch.randn(6, 3, generator=g, dtype=F64)
           * torch.linspace(0.2, 2.0, 6)[:, None]).float()
    x = (1e3 + 1.5 * torch.randn(400, 3, generator=g, dtype=F64)).float()
    expected = torch.cdist(x.double(), ref.double(),
                           compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.equal(ncc_predict(x, ref), expected)


def test_collector_means_add_the_pivots_back():
    """``means()`` (next epoch's pivots and NCC reference) are ``p_c + s_c / n_c``, also when
    the sums were accumulated around non-zero pivots: against the plain per-class mean of the
    features (raw and of x / |x|), after a compute and from synced_means()."""
    g = torch.Generator().manual_seed(5)
    k, d = 3, 4
    y = torch.arange(60) % k
    x = 5.0 + torch.randn(60, d, generator=g, dtype=F64) + y[:, None].to(F64)
    pivots = torch.randn(k, d, generator=g, dtype=F64) + 4.0  # rough previous-epoch means
    m = NCFeatureStats(k, d)
    m.set_reference(pivots)
    m.update(x, y)
    m.compute()
    unit = x / x.norm(dim=1, keepdim=True)
    for got, feats in ((m.means(), x), (m.synced_means(), x), (m.means(spherical=True), unit)):
        want = torch.stack([feats[y == c].mean(0) for c in range(k)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, exact", [(torch.float32, True), (torch.float64, False),
                                          (torch.bfloat16, True)])
def test_eval_pass_memory_cap_counts_the_features_dtype(dtype, exact, monkeypatch):
    """The exact-NCC sweep keeps ``N x d`` features in the forward's dtype: 8 bytes each under
    64-true. The cap counted 4 whatever the dtype, so a float64 pass could keep twice the cap.
    Here the cap holds the features at 4 bytes each but not at 8."""
    from types import SimpleNamespace

    from hug_lightning.metrics import eval_pass

    n, dim = 30, 16
    monkeypatch.setattr(eval_pass, "EXACT_NCC_MAX_BYTES", n * dim * 4)
    module = torch.nn.Linear(dim, 3).to(dtype)
    trainer = SimpleNamespace(world_size=1, lightning_module=module)
    loader = SimpleNamespace(dataset=list(range(n)))
    collector = SimpleNamespace(ncc=True, dim=dim)
    if exact:
        assert eval_pass.keeps_features(trainer, collector, loader)
    else:
        with pytest.warns(UserWarning, match=r"0\.00 GiB of features per process"):
            assert not eval_pass.keeps_features(trainer, collector, loader)
