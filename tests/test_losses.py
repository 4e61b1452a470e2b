"""Pure HUG losses vs a per-class Python-loop reference and the closed forms of the
hyperspherical optima."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from hug_lightning.losses import HUGConfig, hug_loss, mgd_loss, mhs_loss, riesz_energy

F64 = torch.float64
INTER_OPTS = [dict(variant="mhe", energy_s=s) for s in (2, 1, 0)] + [
    dict(variant="mhs", mhs_mode="hard"), dict(variant="mhs", mhs_mode="soft", mhs_tau=0.3),
    dict(variant="mgd", mgd_normalize=True),
    dict(variant="mgd", mgd_normalize=False, mgd_jitter=1e-3),
]
INTRA_OPTS = [dict(intra_power=p, intra_reduction=r, detach_proxy=dp)
              for p in (1, 2) for r in ("class_balanced", "per_sample") for dp in (True, False)]


def ref_inter(W: torch.Tensor, opts: dict) -> torch.Tensor:
    """Inter term with one Python iteration per pair of proxies (direct differences, no Gram)."""
    cfg = HUGConfig(**opts)
    K = W.shape[0]
    w = [W[c] / W[c].norm() for c in range(K)]
    pairs = list(itertools.combinations(range(K), 2))
    d2 = torch.stack([(w[a] - w[b]).pow(2).sum() for a, b in pairs])
    if cfg.variant == "mhe":
        dist = d2.sqrt()
        per_pair = {2: 1 / dist**2, 1: 1 / dist, 0: torch.log(1 / dist)}[cfg.energy_s]
        return per_pair.mean()
    if cfg.variant == "mhs":
        if cfg.mhs_mode == "hard":
            return -d2.min()
        return -(-cfg.mhs_tau * torch.logsumexp(-d2 / cfg.mhs_tau, dim=0))
    G = torch.stack([torch.stack([torch.exp(-(a - b).pow(2).sum()) for b in w]) for a in w])
    G = G + cfg.mgd_jitter * torch.eye(K, dtype=W.dtype)
    loss = -torch.logdet(G)
    return loss / K if cfg.mgd_normalize else loss


def ref_intra(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, opts: dict) -> torch.Tensor:
    """Intra term with a loop over torch.unique(labels), as the released code does."""
    cfg = HUGConfig(**opts)
    x = h / h.norm(dim=1, keepdim=True)
    w = W / W.norm(dim=1, keepdim=True)
    w = w.detach() if cfg.detach_proxy else w

    def dist(i: int) -> torch.Tensor:
        return (x[i] - w[y[i]]).norm() ** cfg.intra_power

    if cfg.intra_reduction == "per_sample":
        return torch.stack([dist(i) for i in range(len(y))]).mean()
    per_class = []
    for c in torch.unique(y):
        idx = [i for i in range(len(y)) if y[i] == c]
        per_class.append(torch.stack([dist(i) for i in idx]).mean())
    return torch.stack(per_class).mean()


def make_batch(B: int, K: int, d: int, seed: int, labels: str = "random"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, d, generator=g, dtype=F64) * 3.0
    W = torch.randn(K, d, generator=g, dtype=F64) * 0.5
    if labels == "absent":  # only the first half of the classes occur
        y = torch.randint(0, max(1, K // 2), (B,), generator=g)
    elif labels == "single":  # one sample per class
        y = torch.randperm(K, generator=g)[:B]
    else:
        y = torch.randint(0, K, (B,), generator=g)
    return h.requires_grad_(), W.requires_grad_(), y


def grads(loss: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, xs)]


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


CASES = [(9, 5, 4, 0, "random"), (12, 7, 3, 1, "absent"), (6, 6, 8, 2, "single"),
         (5, 2, 3, 3, "random"), (17, 4, 5, 4, "absent")]
IDS = lambda o: "-".join(map(str, o.values()))  # noqa: E731


# ----------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("opts", INTER_OPTS + INTRA_OPTS, ids=IDS)
def test_each_term_matches_loop_reference(case, opts) -> None:
    """Value and gradients (features and proxies) of the inter or the intra term."""
    h, W, y = make_batch(*case)
    out = hug_loss(h, W, y, **opts)
    if "variant" in opts:
        value, ref = out.inter, ref_inter(W, opts)
    else:
        value, ref = out.intra, ref_intra(h, W, y, opts)
    assert_close(value, ref)
    for a, b in zip(grads(value, h, W), grads(ref, h, W)):
        assert_close(a, b)


def test_gradient_through_total_and_a_term_together() -> None:
    """All three outputs are differentiable: a loss that uses ``total`` and a term at once
    (e.g. an extra weight on ``inter``) must get the sum of both gradients (found by mutation
    testing: dropping the term's own gradient when ``total`` also had one went unnoticed)."""
    opts = {"alpha": 0.15, "beta": 0.7, "detach_proxy": False}
    h, W, y = make_batch(*CASES[0])
    out = hug_loss(h, W, y, **opts)
    inter, intra = ref_inter(W, opts), ref_intra(h, W, y, opts)
    ref_total = 0.15 * inter + 0.7 * intra
    got = out.total + 0.5 * out.inter - 2.0 * out.intra
    ref = ref_total + 0.5 * inter - 2.0 * intra
    for a, b in zip(grads(got, h, W), grads(ref, h, W)):
        assert_close(a, b)


@pytest.mark.parametrize("inter", INTER_OPTS, ids=IDS)
def test_total_and_gradients_match_reference(inter) -> None:
    for case, intra in zip(CASES, INTRA_OPTS[::2]):
        opts = {**inter, **intra, "alpha": 0.15, "beta": 0.7}
        h, W, y = make_batch(*case)
        out = hug_loss(h, W, y, **opts)
        ref = 0.15 * ref_inter(W, opts) + 0.7 * ref_intra(h, W, y, opts)
        assert_close(out.total, ref)
        for a, b in zip(grads(out.total, h, W), grads(ref, h, W)):
            assert_close(a, b)


def test_default_is_released_form() -> None:
    h, W, y = make_batch(10, 5, 6, 7, "absent")
    released = dict(variant="mhe", energy_s=2, intra_power=1, intra_reduction="class_balanced")
    assert_close(hug_loss(h, W, y).total, ref_inter(W, released) + ref_intra(h, W, y, released))


def test_public_inter_functions() -> None:
    _, W, _ = make_batch(4, 6, 5, 11)
    for s in (0, 1, 2):
        ref = ref_inter(W, dict(variant="mhe", energy_s=s))
        assert_close(riesz_energy(W, s=s), ref)
        assert_close(riesz_energy(W, s=s, reduction="sum"), ref * 15)
    for value, opts in [
        (mhs_loss(W), dict(variant="mhs")),
        (mhs_loss(W, "soft", 0.05), dict(variant="mhs", mhs_mode="soft", mhs_tau=0.05)),
        (mgd_loss(W, 0.0, False), dict(variant="mgd", mgd_jitter=0.0, mgd_normalize=False)),
    ]:
        ref = ref_inter(W, opts)
        assert_close(value, ref)
        assert_close(torch.autograd.grad(value, W)[0], torch.autograd.grad(ref, W)[0])


# ----------------------------------------------------------------------------- closed forms
def simplex(K: int) -> torch.Tensor:
    return torch.eye(K, dtype=F64) - 1.0 / K


def orthoplex(d: int) -> torch.Tensor:
    return torch.cat([torch.eye(d, dtype=F64), -torch.eye(d, dtype=F64)])


def polyhedron(K: int) -> torch.Tensor:
    """Thomson optima in d=3: tetrahedron, triangular bipyramid, octahedron, icosahedron."""
    if K == 4:
        return torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64)
    if K == 5:
        eq = [[math.cos(2 * math.pi * k / 3), math.sin(2 * math.pi * k / 3), 0.0] for k in range(3)]
        return torch.tensor([[0, 0, 1.0], [0, 0, -1.0], *eq], dtype=F64)
    if K == 6:
        return orthoplex(3)
    phi = (1 + math.sqrt(5)) / 2  # icosahedron: cyclic permutations of (0, +-1, +-phi)
    base = [(0, a, b * phi) for a in (1, -1) for b in (1, -1)]
    return torch.tensor([p[i:] + p[:i] for p in base for i in range(3)], dtype=F64)


@pytest.mark.parametrize("K, expected", [(4, 0.375), (10, 0.45), (100, 0.495)])
def test_simplex_energy(K: int, expected: float) -> None:
    W = simplex(K)
    assert expected == pytest.approx((K - 1) / (2 * K))
    assert riesz_energy(W).item() == pytest.approx(expected, rel=1e-9)
    assert riesz_energy(W, reduction="sum").item() == pytest.approx((K - 1) ** 2 / 4, rel=1e-9)
    assert -mhs_loss(W).item() == pytest.approx(2 * K / (K - 1), rel=1e-9)


@pytest.mark.parametrize("K, expected", [(4, 0.026707), (10, 0.351590), (100, 11.438205)])
def test_simplex_mgd(K: int, expected: float) -> None:
    a = math.exp(-2 * K / (K - 1))
    closed = (K - 1) * -math.log(1 - a) - math.log(1 + (K - 1) * a)
    value = mgd_loss(simplex(K), jitter=0.0, normalize=False).item()
    assert value == pytest.approx(closed, rel=1e-8)
    assert value == pytest.approx(expected, abs=1e-6)
    assert mgd_loss(simplex(K), jitter=0.0).item() == pytest.approx(closed / K, rel=1e-8)


@pytest.mark.parametrize("d, expected", [(3, 6.75), (10, 92.5)])
def test_orthoplex_energy(d: int, expected: float) -> None:
    assert riesz_energy(orthoplex(d), reduction="sum").item() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(d / 4 + d * d - d)


@pytest.mark.parametrize(
    "K, expected", [(4, 3.674234614), (5, 6.474691495), (6, 9.985281374), (12, 49.165253058)]
)
def test_thomson_energy(K: int, expected: float) -> None:
    value = riesz_energy(polyhedron(K) * 2.5, s=1, reduction="sum").item()
    assert value == pytest.approx(expected, abs=1e-8)


def square_antiprism() -> torch.Tensor:
    """Tammes optimum for K=8 in d=3: two unit-sphere squares at heights +-h, turned by 45
    degrees, all 16 edges equal (2 r^2 = r^2 (2 - sqrt 2) + 4 h^2 with r^2 + h^2 = 1)."""
    r = math.sqrt(1 / (1 + math.sqrt(2) / 4))
    h = math.sqrt(1 - r * r)
    rows = [[r * math.cos(a), r * math.sin(a), z] for k in range(4)
            for a, z in ((k * math.pi / 2, h), (k * math.pi / 2 + math.pi / 4, -h))]
    return torch.tensor(rows, dtype=F64)


@pytest.mark.parametrize("K, angle", [(4, 109.4712), (5, 90.0), (6, 90.0), (8, 74.8585),
                                      (12, 63.4349)])
def test_tammes_min_angle(K: int, angle: float) -> None:
    """hug-method.md section 4's Tammes angles (K=7, 77.8695, has no closed-form optimum)."""
    value = -mhs_loss(square_antiprism() if K == 8 else polyhedron(K)).item()
    assert value == pytest.approx(2 - 2 * math.cos(math.radians(angle)), abs=1e-5)


def test_decagon_energy() -> None:
    t = torch.arange(10, dtype=F64) * (2 * math.pi / 10)
    W = torch.stack([t.cos(), t.sin()], dim=1)
    assert riesz_energy(W, reduction="sum").item() == pytest.approx(41.25, rel=1e-9)
    assert riesz_energy(W).item() == pytest.approx(0.916667, abs=1e-6)


# ----------------------------------------------------------------------------- properties
ALL_OPTS = [{**i, **j} for i, j in zip(INTER_OPTS, itertools.cycle(INTRA_OPTS[::3]))]


@pytest.mark.parametrize("opts", ALL_OPTS, ids=IDS)
def test_scale_invariance(opts) -> None:
    h, W, y = make_batch(10, 6, 5, 21)
    base = hug_loss(h, W, y, **opts)
    assert_close(hug_loss(h * 37.0, W * 1e-2, y, **opts).total, base.total)
    assert_close(hug_loss(h * 1e-3, W * 50.0, y, **opts).total, base.total)


@pytest.mark.parametrize("variant", ["mhe", "mhs", "mgd"])
def test_detached_proxy_gradient_ignores_features(variant: str) -> None:
    h1, W, y = make_batch(10, 5, 4, 31)
    h2 = torch.randn(10, 4, dtype=F64)
    (g1,) = grads(hug_loss(h1, W, y, variant=variant).total, W)
    (g2,) = grads(hug_loss(h2, W, y, variant=variant).total, W)
    (g_inter,) = grads(hug_loss(h1, W, y, variant=variant, beta=0.0).total, W)
    assert_close(g1, g2)
    assert_close(g1, g_inter)
    (g3,) = grads(hug_loss(h1, W, y, variant=variant, detach_proxy=False).total, W)
    (g4,) = grads(hug_loss(h2, W, y, variant=variant, detach_proxy=False).total, W)
    assert not torch.allclose(g3, g4)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("opts", ALL_OPTS, ids=IDS)
def test_finite_at_zero_features_and_coincident_proxies(opts, dtype) -> None:
    h, W, y = make_batch(8, 5, 4, 41)
    h, W = h.detach().to(dtype), W.detach().to(dtype)
    h[0] = 0.0  # a zero feature
    W[1] = W[0] * 3.0  # two coincident proxies (same direction)
    h[1] = W[y[1]]  # a feature exactly on its proxy (distance 0, power 1)
    h, W = h.requires_grad_(), W.requires_grad_()
    out = hug_loss(h, W, y, **opts)
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(g).all() for g in grads(out.total, h, W))
    if opts["variant"] == "mhe":  # penalized at the documented floor, not dropped, no noise
        floor = max(1e-8, 64 * torch.finfo(dtype).eps)  # the docstring's distance floor
        u = (W / W.norm(dim=1, keepdim=True)).detach().double()
        d2 = (u[:, None] - u[None]).pow(2).sum(-1)[torch.triu_indices(5, 5, 1).unbind()]
        d2 = d2.clamp_min(floor)  # the coincident pair (0, 1) sits at the floor
        s = opts["energy_s"]
        energy = d2.pow(-s / 2) if s else -0.5 * d2.log()
        torch.testing.assert_close(out.inter.double(), energy.mean(), rtol=1e-4, atol=1e-6)
        # the clamped pair adds no gradient: in float32 the rounding noise of 2 - 2<u, u'>
        # (~1e-7) below a 1e-8 floor gave the proxies gradients of ~1e5 in random directions
        (g_w,) = grads(hug_loss(h, W, y, **opts).inter, W)
        assert g_w.abs().max() < 50.0


def test_loss_is_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(5)
    h, W = torch.randn(16, 8, generator=g), torch.randn(6, 8, generator=g)
    y = torch.randint(0, 6, (16,), generator=g)
    for opts, w_half in itertools.product(ALL_OPTS, (False, True)):  # bf16 proxies as well
        W_in = W.bfloat16() if w_half else W
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = hug_loss(h.bfloat16(), W_in, y, **opts)
        ref = hug_loss(h.bfloat16().float(), W_in.float(), y, **opts)
        assert out.total.dtype == out.inter.dtype == out.intra.dtype == torch.float32
        torch.testing.assert_close(out.total, ref.total, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.total, hug_loss(h, W, y, **opts).total, rtol=2e-2, atol=1e-3)


def test_bad_inputs() -> None:
    h, W, y = make_batch(4, 3, 2, 0)
    for args, match in [((h, W[:, :1], y), "width"), ((h[0], W, y), r"\(B, d\)"),
                        ((h, W[:1], y), "K >= 2"), ((h[:0], W, y[:0]), "empty"),
                        ((h, W, y[:3]), "labels must have shape"), ((h, W, y.double()), "integer")]:
        with pytest.raises(ValueError, match=match):
            hug_loss(*args)
    for label in (3, -1):  # CPU labels are range-checked (free there)
        with pytest.raises(ValueError, match=rf"label {label} is outside \[0, 3\)"):
            hug_loss(h, W, torch.tensor([0, 1, label, 2]))
    bad = [(riesz_energy, (W[:1],), "K >= 2"), (mhs_loss, (W, "x"), "mode"),
           (riesz_energy, (W, 3), "s must"), (mgd_loss, (W, -1.0), "jitter"),
           (mgd_loss, (W, -1e-9), "jitter"), (mhs_loss, (W, "soft", 0.0), "tau"),
           (mhs_loss, (W, "soft", -0.1), "tau"),
           (riesz_energy, (W, 2, "mean", -1.0), "eps must be a positive"),
           (riesz_energy, (W, 2, "mean", 0.0), "eps must be a positive"),
           (mhs_loss, (W, "hard", 0.1, float("nan")), "eps must be a positive")]
    for fn, args, match in bad:
        with pytest.raises(ValueError, match=match):
            fn(*args)


def test_traces_without_graph_breaks() -> None:
    """No .item(), no data-dependent shapes: dynamo captures forward and backward in one graph."""
    torch._dynamo.reset()
    h, W, y = make_batch(8, 5, 4, 3)
    loss = lambda h, W, y: hug_loss(h, W, y, detach_proxy=False).total  # noqa: E731
    fn = torch.compile(loss, backend="aot_eager", fullgraph=True)
    out, ref = fn(h, W, y), loss(h, W, y)
    assert_close(out, ref)
    for a, b in zip(grads(out, h, W), grads(ref, h, W)):
        assert_close(a, b)


def test_bench_quick_smoke(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "bench" / "loss_bench.py"
    spec = importlib.util.spec_from_file_location("loss_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| K |" in out and "loop/MHE" in out
    assert rows and all(r["mhe_ms"] > 0 and r["ce_ms"] > 0 for r in rows)
