"""NCFeatureStats: one-pass/pivoted sums vs a two-pass reference, numerics, dtype, DDP."""

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics import MetricCollection

from hug_lightning.metrics import NCFeatureStats, within_class_trace

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_helpers  # noqa: E402

F64 = torch.float64
K, D = 8, 12


def make_data(seed=0, n=160, k=K, d=D):
    """Features with a large common offset; class 6 is empty, class 7 has a single sample."""
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, d, generator=g, dtype=F64) + 20.0
    y = torch.randint(0, 6, (n,), generator=g)
    y[0] = 7
    x = centres[y] + torch.randn(n, d, generator=g, dtype=F64) * torch.rand(n, 1, generator=g)
    w = torch.randn(k, d, generator=g, dtype=F64) / math.sqrt(d)
    b = torch.randn(k, generator=g, dtype=F64)
    ref = centres + 0.3 * torch.randn(k, d, generator=g, dtype=F64)
    ref[6] = float("nan")  # absent class in the reference epoch: never NCC-predicted
    return x, y, w, b, ref


def _geo_ref(v, tag, log_tag):
    k = len(v)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    pairs = list(itertools.combinations(range(k), 2))
    cos = np.array([u[i] @ u[j] for i, j in pairs])
    dist = np.array([np.linalg.norm(u[i] - u[j]) for i, j in pairs])
    gram = v @ v.T
    t = (np.eye(k) - 1.0 / k) / np.sqrt(k - 1)
    norms = np.linalg.norm(v, axis=1)
    return {
        f"nc2_equinorm_{tag}": norms.std(ddof=1) / norms.mean(),
        f"nc2_equiangle_std_{tag}": cos.std(ddof=1),
        f"nc2_maxangle_dev_{tag}": np.abs(cos + 1 / (k - 1)).mean(),
        f"nc2_etf_dist_{tag}": np.linalg.norm(gram / np.linalg.norm(gram) - t),
        f"gnc2_max_cos_{tag}": cos.max(),
        f"gnc2_min_angle_{tag}": np.degrees(np.arccos(cos.max())),
        f"gnc2_riesz2_energy_{tag}": (dist**-2.0).mean(),
        f"gnc2_log_energy_mean{log_tag}": (-np.log(dist)).mean(),
        f"gnc2_log_energy_var{log_tag}": (-np.log(dist)).var(ddof=1),
    }


def two_pass_reference(x, y, k, w, b, ref, logits):
    """Straightforward two-pass float64 numpy implementation of the metric definitions."""
    x, y, w, ref, logits = (t.double().numpy() for t in (x, y, w, ref, logits))
    cls = [c for c in range(k) if (y == c).any()]
    ke, out = len(cls), {"k_eff": len(cls)}
    for feats, sfx in ((x, ""), (x / np.linalg.norm(x, axis=1, keepdims=True), "_sph")):
        mu = np.stack([feats[y == c].mean(0) for c in cls])
        m = mu - mu.mean(0)
        sw = sum((feats[y == c] - mu[i]).T @ (feats[y == c] - mu[i]) for i, c in enumerate(cls))
        sw, sb = sw / len(y), m.T @ m / ke
        out[f"nc1_pinv{sfx}"] = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10)) / ke
        out[f"nc1_trace_ratio{sfx}"] = np.trace(sw) / np.trace(sb)
        var = [((feats[y == c] - mu[i]) ** 2).sum(1).mean() for i, c in enumerate(cls)]
        out[f"nc1_cdnv{sfx}"] = np.mean([(var[i] + var[j]) / (2 * ((mu[i] - mu[j]) ** 2).sum())
                                         for i, j in itertools.combinations(range(ke), 2)])
        if not sfx:
            centred, mu_g = m, mu.mean(0)
    # within-class alignment of x/|x|: mean over ordered pairs i != j of |x_i - x_j|^2
    perms = (itertools.permutations(feats[y == c], 2) for c in cls if (y == c).sum() > 1)
    out["nc1_align_sph"] = np.mean([np.mean([((a - bb) ** 2).sum() for a, bb in pairs])
                                    for pairs in perms])  # fmt: skip
    out.update(_geo_ref(centred, "means", ""))
    out.update(_geo_ref(w, "weights", "_weights"))
    wp = w[cls]
    diff = wp / np.linalg.norm(wp) - centred / np.linalg.norm(centred)
    out["nc3_self_duality"] = (diff**2).sum()
    cos = (wp * centred).sum(1) / np.linalg.norm(wp, axis=1) / np.linalg.norm(centred, axis=1)
    out["nc3_cos_mean"], out["nc3_cos_var"] = (1 - cos).mean(), cos.var(ddof=1)
    out["bias_relation"] = np.linalg.norm(w @ mu_g + b.numpy())
    valid = np.isfinite(ref).all(1)
    dists = np.where(valid, ((x[:, None, :] - np.nan_to_num(ref)[None]) ** 2).sum(-1), np.inf)
    ncc, lin = dists.argmin(1), logits.argmax(1)
    out["nc4_ncc_mismatch"] = (ncc != lin).mean()
    out["ncc_accuracy"], out["linear_accuracy"] = (ncc == y).mean(), (lin == y).mean()
    return out


def assert_close(got: dict, exp: dict, rel=1e-9, abs_=1e-12, skip=()):
    assert set(exp) <= set(got), sorted(set(exp) - set(got))
    for key in set(exp) - set(skip):
        value = exp[key]
        assert float(got[key]) == pytest.approx(float(value), rel=rel, abs=abs_), key


def run(x, y, w, b, ref, batch=37, pivot=None, dtype=torch.float32, **kw):
    m = NCFeatureStats(K, D, **kw)
    if pivot is not None:
        m.set_reference(pivot, ncc=False)
    m.set_reference(ref, pivot=False)
    logits = x @ w.T + b
    for i in range(0, len(y), batch):
        m.update(x[i : i + batch].to(dtype), y[i : i + batch], logits=logits[i : i + batch])
    return m, m.compute(W=w, b=b)


@pytest.mark.parametrize("pivoted", [False, True])
def test_matches_two_pass_reference(pivoted):
    x, y, w, b, ref = make_data()
    x = x.float().double()  # the collector receives float32 features
    pivot = ref + 0.1 if pivoted else None
    _, got = run(x, y, w, b, ref, pivot=pivot)
    assert_close(got, two_pass_reference(x, y, K, w, b, ref, x @ w.T + b))
    assert got["nc1_pinv_rank"] == 6 and got["k_eff"] == 7
    # pivot_cond = max over classes (n > 1) of |mu_c - p_c|^2 / sigma_c^2, from the data here
    p = torch.zeros(K, D, dtype=F64) if pivot is None else pivot
    ratios = [((x[y == c].mean(0) - p[c]).square().sum()
               / (x[y == c] - x[y == c].mean(0)).square().sum(1).mean()).item()
              for c in range(K) if (y == c).sum() > 1]
    assert float(got["pivot_cond"]) == pytest.approx(max(ratios), rel=1e-9)


def test_cancellation_stress_offset_1024():
    k, d, sigma = 4, 8, 2.0**-10
    mu = 1024 + 2.0**-3 * torch.eye(k, d, dtype=F64)
    x = torch.stack([mu[c] + s * sigma * e for c in range(k) for e in torch.eye(d, dtype=F64)
                     for s in (1, -1)]).float()  # fmt: skip
    y = torch.arange(k).repeat_interleave(2 * d)
    mus = torch.stack([x[y == c].mean(0) for c in range(k)])
    naive32 = ((x**2).sum() - (torch.bincount(y)[:, None] * mus**2).sum()) / len(y)
    assert abs(naive32.item() / sigma**2 - 1) > 0.5  # the case really is a stress case
    for pivot in (None, mu + 1e-3):
        m = NCFeatureStats(k, d)
        if pivot is not None:
            m.set_reference(pivot)
        m.update(x, y)
        assert within_class_trace(m.nc_states()).item() == pytest.approx(sigma**2, rel=1e-12)
        out = m.compute()
        ratio = 2.0**-20 / (2.0**-6 * 3 / 4)  # tr Sigma_B = 2^-6 (K-1)/K
        assert out["nc1_trace_ratio"].item() == pytest.approx(ratio, rel=1e-12)
    g = torch.Generator().manual_seed(1)  # generic float32 data: pivots are what makes it exact
    noise = sigma * torch.randn(k * 200, d, generator=g, dtype=F64)
    x2 = (mu.repeat_interleave(200, 0) + noise).float()
    y2 = torch.arange(k).repeat_interleave(200)
    mus = torch.stack([x2[y2 == c].double().mean(0) for c in range(k)])
    true = ((x2.double() - mus[y2]) ** 2).sum() / len(y2)  # two-pass float64
    m = NCFeatureStats(k, d)
    m.update(x2, y2)
    assert within_class_trace(m.nc_states()).item() == pytest.approx(true.item(), rel=1e-3)
    m.reset()
    m.set_reference(mus + 1e-4)
    m.update(x2, y2)
    assert within_class_trace(m.nc_states()).item() == pytest.approx(true.item(), rel=1e-12)


def test_batch_size_independence_and_zero_weight_duplicates():
    x, y, w, b, ref = make_data(1)
    _, base = run(x, y, w, b, ref, batch=len(y))
    for batch in (1, 7, 64):
        assert_close(run(x, y, w, b, ref, batch=batch)[1], base, rel=1e-12)
    m = NCFeatureStats(K, D)
    m.set_reference(ref, pivot=False)
    dup = torch.cat([torch.arange(len(y)), torch.arange(5)])
    weight = torch.cat([torch.ones(len(y)), torch.zeros(5)])
    m.update(x[dup].float(), y[dup], logits=(x @ w.T + b)[dup], weight=weight)
    assert_close(m.compute(W=w, b=b), base, rel=1e-12)


def test_set_reference_rebases_accumulated_sums_exactly():
    x, y, w, b, ref = make_data(2)
    _, base = run(x, y, w, b, ref)
    m = NCFeatureStats(K, D)
    m.set_reference(ref, pivot=False)
    m.update(x.float(), y, logits=x @ w.T + b)
    m.set_reference(ref + 0.5, ncc=False)  # pivot change mid-accumulation
    assert_close(m.compute(W=w, b=b), base, rel=1e-10, skip=["pivot_cond"])  # pivot diagnostic


@pytest.mark.parametrize("cast", ["to_bf16", "half", "parent_to_bf16", "parent_half"])
def test_accumulation_stays_float64_after_precision_casts(cast):
    m = NCFeatureStats(3, 4)
    parent = torch.nn.ModuleDict({"nc": m})
    casts = {"to_bf16": lambda: m.to(torch.bfloat16), "half": m.half,
             "parent_to_bf16": lambda: parent.to(torch.bfloat16), "parent_half": parent.half}
    casts[cast]()
    assert all(getattr(m, s).dtype == F64 for s in m._defaults)
    assert m.pivot.dtype == F64 and m._defaults["S"].dtype == F64
    x = (1 + torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]) / 128).to(torch.bfloat16)
    m.update(x, torch.tensor([0, 1, 1]))
    m.update(x[:1] + 2**-6, torch.tensor([0]))  # exactly representable in bf16
    assert m.s.dtype == F64 and m.q.dtype == F64
    expected = (1 + 2**-7) ** 2 + 3 + (1 + 2**-7 + 2**-6) ** 2 + 3 * (1 + 2**-6) ** 2
    assert m.q[0].item() == pytest.approx(expected, rel=1e-15)
    m.reset()
    assert m.S.dtype == F64


def test_invariances():
    x, y, w, b, ref = make_data(3)
    _, base = run(x, y, w, b, ref, dtype=F64)
    q, _ = torch.linalg.qr(torch.randn(D, D, dtype=F64, generator=torch.Generator().manual_seed(4)))
    t = torch.linspace(-5.0, 7.0, D, dtype=F64)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(5))
    inv = torch.argsort(perm)
    cases = {
        "translation": (x + t, y, w, b - w @ t, ref + t),
        "scale": (2.5 * x, y, w, 2.5 * b, 2.5 * ref),
        "rotation": (x @ q.T, y, w @ q.T, b, ref @ q.T),
        "relabel": (x, perm[y], w[inv], b[inv], ref[inv]),
    }
    for name, (xx, yy, ww, bb, rr) in cases.items():
        got = run(xx, yy, ww, bb, rr, dtype=F64)[1]
        skip = ["pivot_cond"] + (["bias_relation"] if name == "scale" else [])  # not invariant
        if name == "translation":  # x / |x| depends on the origin
            skip += [key for key in base if "_sph" in key]
        assert_close(got, base, rel=1e-9, abs_=1e-12, skip=skip)


def test_nc4_bias_case():
    k, d, r = 6, 8, 2.0
    eye = torch.eye(k, d, dtype=F64)
    m_tilde = r * math.sqrt(k / (k - 1)) * (eye - eye.sum(0) / k)  # ETF, radius r
    counts = torch.tensor([3, 1, 2, 5, 4, 2])
    y = torch.arange(k).repeat_interleave(counts)
    x = m_tilde[y]
    beta_big = 1.01 * r**2 * k / (k - 1)  # > r^2 K/(K-1): everything predicted as class 0
    for beta, mismatch, lin_acc in ((0.0, 0.0, 1.0), (beta_big, 1 - 3 / 17, 3 / 17)):
        b = torch.zeros(k, dtype=F64)
        b[0] = beta
        m = NCFeatureStats(k, d)
        m.set_reference(m_tilde)
        m.update(x, y, logits=x @ m_tilde.T + b)
        out = m.compute(W=m_tilde)
        assert out["nc4_ncc_mismatch"].item() == pytest.approx(mismatch, abs=1e-15)
        assert out["ncc_accuracy"].item() == 1.0
        assert out["linear_accuracy"].item() == pytest.approx(lin_acc, abs=1e-15)


def test_key_presence_and_config():
    x, y, w, b, ref = make_data(6)
    m = NCFeatureStats(K, D, metrics=["nc1_cdnv", "nc3_cos_mean", "ncc_accuracy"])
    assert "S" not in m._defaults and "s_sph" not in m._defaults  # unneeded states skipped
    m.update(x, y, logits=x @ w.T)
    assert list(m.compute()) == ["nc1_cdnv"]  # no W, no reference -> no NC3 / NCC keys
    m.set_classifier(w)
    assert list(m.compute()) == ["nc1_cdnv", "nc3_cos_mean"]
    with pytest.raises(ValueError, match="track_cov"):
        NCFeatureStats(K, D, track_cov=False, metrics=["nc1_pinv"])
    assert m(x, y) is None  # forward only accumulates
    before = m.compute()
    m.reset()
    m.roll_reference()  # last compute's means become pivots (and NCC reference)
    assert torch.allclose(m.pivot[:6], m.means()[:6], rtol=0, atol=0) and m._has_reference
    m.update(x, y, logits=x @ w.T)  # same data around the new pivots: same metrics
    assert float(m.compute()["nc1_cdnv"]) == pytest.approx(float(before["nc1_cdnv"]), rel=1e-12)
    sd = NCFeatureStats(K, D)
    sd.set_reference(ref)
    fresh = NCFeatureStats(K, D)
    fresh.load_state_dict(sd.state_dict())
    assert fresh._has_reference and torch.equal(fresh.pivot, sd.pivot)


def test_collector_switches_labels_reference_and_bias():
    """Found by mutation testing: spherical=False with the default metrics must drop every
    *_sph key (not accumulate them anyway); a label equal to K is refused with the message
    (not an IndexError from index_add_); a reference with no finite row turns NCC off (every
    class invalid: the argmin would count class 0 for every sample); ``compute(b=...)``
    overrides the bias of ``set_classifier`` (bias_relation = |W mu_G + b|, mu_G written
    here as the average of the class means)."""
    x, y, w, b, ref = make_data(8)
    flat = NCFeatureStats(K, D, spherical=False)
    assert "s_sph" not in flat._defaults
    flat.update(x, y)
    assert not [key for key in flat.compute(W=w) if key.endswith("_sph")]
    with pytest.raises(ValueError, match=rf"label {K} is outside"):
        flat.update(x[:2], torch.tensor([0, K]))
    m = NCFeatureStats(K, D)
    m.set_reference(torch.full((K, D), float("nan"), dtype=F64))
    m.update(x, y, logits=x @ w.T + b)
    assert "ncc_accuracy" not in m.compute(W=w) and float(m.ncc_n.sum()) == 0
    m.set_classifier(w, b)
    b2 = torch.arange(K, dtype=F64)
    mu_g = torch.stack([x[y == c].mean(0) for c in torch.unique(y)]).mean(0)
    got = m.compute(b=b2)["bias_relation"].item()
    assert got == pytest.approx((w @ mu_g + b2).norm().item(), rel=1e-9)


def test_metric_collection_requires_compute_groups_false():
    x, y, w, b, ref = make_data(7)
    logits = x @ w.T + b
    a, c, a_alone, c_alone = (NCFeatureStats(K, D) for _ in range(4))
    coll = MetricCollection({"a": a, "c": c}, compute_groups=False)
    for step in range(2):
        if step:  # c changes pivot and gets an NCC reference mid-epoch; a does not
            c.set_reference(ref)
            c_alone.set_reference(ref)
        coll.update(x, y, logits=logits)
        a_alone.update(x, y, logits=logits)
        c_alone.update(x, y, logits=logits)
    assert_close(a.compute(), a_alone.compute(), rel=1e-12)
    assert_close(c.compute(), c_alone.compute(), rel=1e-12)
    merged = MetricCollection({"a": NCFeatureStats(K, D), "c": NCFeatureStats(K, D)})
    merged.update(x, y)
    assert len(merged.compute_groups) == 1  # the hazard the default would introduce


@pytest.mark.slow
def test_ddp_two_ranks_match_single_process(tmp_path):
    x, y, w, b, ref = make_data(8, n=151)
    x = x.float()
    logits = x.double() @ w.T + b
    data = {"x": x, "y": y, "logits": logits, "W": w, "b": b, "ref": ref, "k": K,
            "scenarios": _ddp_helpers.make_scenarios(len(y), 2)}  # fmt: skip
    torch.save(data, tmp_path / "data.pt")
    _ddp_helpers.run_workers(2, tmp_path)
    single = NCFeatureStats(K, D)
    single.set_reference(ref)
    single.update(x, y, logits=logits)
    expected = single.compute(W=w, b=b)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in data["scenarios"]:
        for res in (ranks[0][name], ranks[1][name]):
            assert set(res["values"]) == set(expected)
            assert_close(res["values"], expected, rel=1e-10, abs_=1e-13)
            assert torch.allclose(res["means"], single.means(), rtol=1e-12, equal_nan=True)
            assert torch.allclose(res["synced_means"], single.means(), rtol=1e-12,
                                  equal_nan=True)
            assert res["counts"] == {"all_reduce": res["num_states"], "all_gather": 0}
        local = ranks[0][name]["local_n"].sum() + ranks[1][name]["local_n"].sum()
        assert local.item() == len(y)  # states were un-synced (local) after compute
