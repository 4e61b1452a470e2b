"""Tests added after a mutation audit of hug_lightning/losses and heads: behaviour the other tests
left unchecked (exact ties of the hard MHS, the documented eps floors on norms and on the intra
distance). Every reference here is plain autograd on the documented formulas, not the package's."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hug_lightning.losses import hug_loss, mhs_loss, riesz_energy

F64 = torch.float64
EPS = 1e-8  # the package default; floor on squared norms: rows with norm < 1e-4 are floored


# ----------------------------------------------------------------------------- MHS exact ties
def test_mhs_hard_splits_gradient_evenly_over_exact_ties() -> None:
    """Docstring: "only the arg-min pair gets gradient (split evenly over exact ties)". Four
    proxies e1, e2, e3, -e1 (exact in binary): five unordered pairs tie at ||w_c - w_c'||^2 = 2,
    (e1, -e1) is at 4. The gradient must be the mean over the tied pairs of each pair's gradient."""
    W = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]], dtype=F64) * 2.5
    W.requires_grad_()
    value = mhs_loss(W)
    (g,) = torch.autograd.grad(value, W)

    Wr = W.detach().clone().requires_grad_()
    w = Wr / Wr.norm(dim=1, keepdim=True)
    d2 = {(a, b): (w[a] - w[b]).pow(2).sum() for a, b in itertools.combinations(range(4), 2)}
    tied = [p for p, v in d2.items() if v.item() == 2.0]
    assert len(tied) == 5
    ref = -torch.stack([d2[p] for p in tied]).mean()  # value -2, gradient split evenly
    (g_ref,) = torch.autograd.grad(ref, Wr)
    assert value.item() == pytest.approx(-2.0, abs=1e-12)
    assert g_ref.abs().max() > 0.1  # a non-trivial gradient to compare against
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- intra distance
@pytest.mark.parametrize("reduction", ["class_balanced", "per_sample"])
def test_intra_power1_gradient_is_zero_below_sqrt_eps(reduction: str) -> None:
    """Docstring: with intra_power=1 "the gradient of a distance below sqrt(eps) is set to 0".
    A feature 1e-6 from its proxy (sqrt(eps) = 1e-4) gets exactly no gradient; one 1e-2 away
    gets the ordinary gradient of the Euclidean distance."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 5, generator=g, dtype=F64)
    w = W / W.norm(dim=1, keepdim=True)
    y = torch.tensor([0, 1, 2, 0])
    perp = torch.randn(4, 5, generator=g, dtype=F64)
    perp = perp - (perp * w[y]).sum(1, keepdim=True) * w[y]  # orthogonal to the own proxy
    perp = perp / perp.norm(dim=1, keepdim=True)
    h = (w[y] + torch.tensor([1e-6, 1e-2, 0.5, 0.3], dtype=F64)[:, None] * perp) * 2.0
    h.requires_grad_()
    out = hug_loss(h, W, y, alpha=0.0, intra_reduction=reduction)
    (gh,) = torch.autograd.grad(out.intra, h)
    assert torch.all(gh[0] == 0), gh[0]

    hr = h.detach().clone().requires_grad_()
    x = hr / hr.norm(dim=1, keepdim=True)
    dist = (x - w[y]).norm(dim=1)
    if reduction == "class_balanced":  # classes {0: 2 samples, 1: 1, 2: 1}: 1/(n_c * 3)
        weight = torch.tensor([1 / 6, 1 / 3, 1 / 3, 1 / 6], dtype=F64)
    else:
        weight = torch.full((4,), 0.25, dtype=F64)
    ref = (dist * weight).sum()
    (gr,) = torch.autograd.grad(ref, hr)
    torch.testing.assert_close(out.intra, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gh[1:], gr[1:], rtol=1e-6, atol=1e-10)
    assert gr[1].norm() > 0.05  # the row at distance 1e-2 does get a full-size gradient


# ----------------------------------------------------------------------------- tiny rows
def floored_unit(v: torch.Tensor) -> torch.Tensor:
    """The documented normalization: rows divided by max(||v||, sqrt(eps))."""
    return v / v.norm(dim=1, keepdim=True).clamp_min(math.sqrt(EPS))


def reference_total(h, W, y, opts):
    x, w = floored_unit(h), floored_unit(W)
    K = W.shape[0]
    # the inter term's stated definition: squared distances as 2 - 2 <w_c, w_c'> (equal to
    # ||w_c - w_c'||^2 for unit rows; for a floored row, of norm < 1, the package keeps this form)
    gram = 2 - 2 * w @ w.T
    d2 = torch.stack([gram[a, b] for a, b in itertools.combinations(range(K), 2)])
    variant = opts.get("variant", "mhe")
    if variant == "mhe":
        s = opts.get("energy_s", 2)
        inter = (d2.pow(-s / 2) if s else -0.5 * d2.log()).mean()
    elif variant == "mhs":
        inter = -d2.min()
    else:
        eye = torch.eye(K, dtype=F64)
        G = torch.exp(-gram * (1 - eye)) + 1e-6 * eye  # G_cc = exp(0) = 1
        inter = -torch.logdet(G) / K
    p = opts.get("intra_power", 1)
    dist = (x - w.detach()[y]).norm(dim=1) ** p
    intra = torch.stack([dist[y == c].mean() for c in torch.unique(y)]).mean()
    return inter + intra


@pytest.mark.parametrize("opts", [dict(variant="mhe", energy_s=s) for s in (2, 1, 0)]
                         + [dict(variant="mhs"), dict(variant="mgd"), dict(intra_power=2)],
                         ids=lambda o: "-".join(map(str, o.values())))
def test_rows_below_the_norm_floor(opts) -> None:
    """Docstring: "a row with ||w||^2 < eps is divided by sqrt(eps) instead of its norm". A proxy
    and a feature of norm ~1e-6 (< sqrt(eps) = 1e-4): value and both gradients equal plain
    autograd through max(||v||, sqrt(eps)), and finite differences (gradcheck) agree."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(7, 4, generator=g, dtype=F64)
    W = torch.randn(5, 4, generator=g, dtype=F64)
    W[2] *= 1e-6 / W[2].norm()  # proxy 2 is inside the floor: its unit row has norm 0.01
    h[3] *= 1e-6 / h[3].norm()  # so is feature 3
    y = torch.tensor([0, 1, 2, 3, 4, 2, 0])
    h.requires_grad_(), W.requires_grad_()
    total = hug_loss(h, W, y, **opts).total
    ref = reference_total(h, W, y, opts)
    torch.testing.assert_close(total, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(total, (h, W)), torch.autograd.grad(ref, (h, W))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    # finite differences on the tiny rows only (step well inside the floor region); the proxy
    # is not detached here, otherwise the intra term's value depends on W but its gradient not
    def f(h3, w2):
        hh, ww = h.detach().clone(), W.detach().clone()
        hh[3], ww[2] = h3, w2
        return hug_loss(hh, ww, y, **opts, detach_proxy=False).total
    assert torch.autograd.gradcheck(f, (h.detach()[3].clone().requires_grad_(),
                                        W.detach()[2].clone().requires_grad_()),
                                    eps=1e-9, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- sum reduction
@pytest.mark.parametrize("s", [2, 1, 0])
def test_riesz_sum_gradient_matches_a_pair_loop(s: int) -> None:
    """``riesz_energy(reduction="sum")``: value AND gradient of the sum over the K(K-1)/2
    unordered pairs (the backward has its own scale factor; only the value was checked)."""
    g = torch.Generator().manual_seed(9)
    W = (2.0 * torch.randn(6, 4, generator=g, dtype=F64)).requires_grad_()
    value = riesz_energy(W, s=s, reduction="sum")
    w = W / W.norm(dim=1, keepdim=True)
    dist = torch.stack([(w[a] - w[b]).norm() for a, b in itertools.combinations(range(6), 2)])
    ref = dist.pow(-s).sum() if s else torch.log(1 / dist).sum()
    torch.testing.assert_close(value, ref, rtol=1e-9, atol=1e-12)
    (g_value,), (g_ref,) = torch.autograd.grad(value, W), torch.autograd.grad(ref, W)
    torch.testing.assert_close(g_value, g_ref, rtol=1e-7, atol=1e-10)


def test_cosine_logits_below_the_norm_floor() -> None:
    """The head's cosines use the loss's floor: a feature of norm 1e-6 is divided by
    sqrt(eps) = 1e-4 (logits of size 0.01), not by a floor of eps (which would make it a unit
    vector, found by mutation testing)."""
    from hug_lightning.heads import HUGHead
    from hug_lightning.losses import l2_normalize

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=F64)
    x[1] *= 1e-6 / x[1].norm()
    floor = x.norm(dim=1, keepdim=True).clamp_min(math.sqrt(EPS))
    torch.testing.assert_close(l2_normalize(x, EPS), x / floor, rtol=1e-12, atol=0)
    head = HUGHead(5, 4).double()
    w = head.proxies.detach() / head.proxies.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(head.logits(x), (x / floor) @ w.T, rtol=1e-9, atol=1e-12)
    assert float(head.logits(x)[1].abs().max()) < 0.011
