"""HUGHead: the Head contract, errors, bf16 autocast and the documented DDP semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hug_lightning.heads import Head, HUGHead
from hug_lightning.losses import HUGConfig, hug_loss
from hug_lightning.losses.hug import CountSync

F64 = torch.float64


def released_hug_reference(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The released HUG_MHE written out with loops (pairs, then classes of the batch)."""
    w = W / W.norm(dim=1, keepdim=True)
    x = h / h.norm(dim=1, keepdim=True)
    K = W.shape[0]
    inter = torch.stack(
        [1 / (w[a] - w[b]).norm() ** 2 for a in range(K) for b in range(a + 1, K)]
    ).mean()
    per_class = [(x[y == c] - w[c].detach()).norm(dim=1).mean() for c in torch.unique(y)]
    return inter + torch.stack(per_class).mean()


def make_head(K: int = 5, d: int = 4, **kw) -> HUGHead:
    torch.manual_seed(0)
    return HUGHead(K, d, **kw).double()


def test_contract_and_init() -> None:
    head = HUGHead(7, 16)
    assert isinstance(head, Head)
    assert head.class_vectors is head.proxies and head.class_vectors.shape == (7, 16)
    assert head.class_bias is None
    torch.testing.assert_close(head.proxies.norm(dim=1), torch.ones(7))
    ortho = HUGHead(4, 16, proxy_init="orthogonal")
    torch.testing.assert_close(ortho.proxies @ ortho.proxies.T, torch.eye(4), atol=1e-5, rtol=0)


def test_logits_are_cosines_and_predict_nearest_proxy() -> None:
    head = make_head()
    with torch.no_grad():  # proxies of unequal norms: a raw dot product would rank differently
        head.proxies.mul_(torch.tensor([[0.1], [3.0], [1.0], [7.0], [0.5]], dtype=F64))
    h = torch.randn(9, 4, dtype=F64) * 4
    cos = F.cosine_similarity(h[:, None, :], head.proxies[None, :, :], dim=-1)
    torch.testing.assert_close(head.logits(h), cos)
    unit_w = head.proxies / head.proxies.norm(dim=1, keepdim=True)
    dist = torch.cdist(h / h.norm(dim=1, keepdim=True), unit_w)
    assert torch.equal(head.predict(h), dist.argmin(dim=1))


def test_loss_matches_released_reference_and_terms_are_detached() -> None:
    head = make_head(6, 5)
    h = torch.randn(11, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 3, 3, 3, 4, 0, 1, 1, 4])  # class 2 and 5 absent
    total, terms = head.loss(h, y)
    ref = released_hug_reference(h, head.proxies, y)
    torch.testing.assert_close(total, ref, rtol=1e-6, atol=0)
    g = torch.autograd.grad(total, (h, head.proxies))
    g_ref = torch.autograd.grad(ref, (h, head.proxies))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert set(terms) == {"inter", "intra"}
    assert all(not t.requires_grad for t in terms.values())
    w = head.proxies / head.proxies.norm(dim=1, keepdim=True)
    ref_inter = torch.stack([1 / (w[a] - w[b]).norm() ** 2
                             for a in range(6) for b in range(a + 1, 6)]).mean()
    torch.testing.assert_close(terms["inter"], ref_inter, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, terms["inter"] + terms["intra"])
    out = head.forward_train(h, y)
    torch.testing.assert_close(out.loss, total)
    for name in ("inter", "intra"):  # the terms forward_train logs, under their own names
        torch.testing.assert_close(out.terms[name], terms[name])
    torch.testing.assert_close(out.logits, head.logits(h))
    assert not out.logits.requires_grad and out.loss.requires_grad


def test_weights_and_options_reach_the_loss() -> None:
    h = torch.randn(8, 4, dtype=F64)
    y = torch.randint(0, 5, (8,))
    base = make_head()
    _, t = base.loss(h, y)
    scaled = make_head(alpha=0.15, beta=0.03)
    total, _ = scaled.loss(h, y)
    torch.testing.assert_close(total, 0.15 * t["inter"] + 0.03 * t["intra"])
    for kw in [dict(variant="mhs"), dict(variant="mgd"), dict(intra_power=2)]:
        assert not torch.allclose(make_head(**kw).loss(h, y)[0], base.loss(h, y)[0])


def test_bf16_autocast_gives_float32_cosines() -> None:
    """Logits are float32 cosines under bf16 autocast (bf16 resolves ~4e-3 near 1: close
    proxies would tie in the argmax), in training and in prediction."""
    head = HUGHead(6, 8)
    with torch.no_grad():
        head.proxies[1] = head.proxies[0] + 1e-3 * torch.randn(8)  # two proxies 0.06 deg apart
    h = head.proxies.detach()[:2].repeat(8, 1) + 1e-4 * torch.randn(16, 8)
    y = torch.arange(16) % 2
    ref = torch.nn.functional.normalize(h, dim=1) @ torch.nn.functional.normalize(
        head.proxies.detach(), dim=1).T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_logits = head.forward_train(h, y).logits
        logits = head.logits(h)
    for out in (train_logits, logits):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_gives_float32_loss() -> None:
    head = HUGHead(6, 8)
    h = torch.randn(16, 8)
    y = torch.randint(0, 6, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head.forward_train(h.bfloat16(), y)
    ref, _ = head.loss(h.bfloat16().float(), y)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, head.loss(h, y)[0], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="arcface"), "variant"),
        (dict(alpha=-0.1), "alpha"),
        (dict(beta=float("nan")), "beta"),
        (dict(alpha=0.0, beta=0.0), "both 0"),
        (dict(energy_s=4), "energy_s"),
        (dict(mhs_mode="x"), "mhs_mode"),
        (dict(mhs_tau=0.0), "mhs_tau"),
        (dict(mgd_jitter=-1e-6), "mgd_jitter"),
        (dict(intra_power=3), "intra_power"),
        (dict(intra_reduction="mean"), "intra_reduction"),
        (dict(eps=0.0), "eps"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(mhs_tau=float("inf")), "mhs_tau"),
        (dict(energy_s=2.0), "energy_s"),  # stored as given otherwise: a float exponent
        (dict(detach_proxy="false"), "detach_proxy"),  # bool("false") would be True
        (dict(mgd_normalize=0), "mgd_normalize"),
    ],
)
def test_bad_hyperparameters(kwargs, match) -> None:
    """The head, the config and the pure function reject the same values, before any math."""
    with pytest.raises(ValueError, match=match):
        HUGHead(5, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        HUGConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        hug_loss(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), **kwargs)
    with pytest.raises(ValueError, match="proxy_init"):
        HUGHead(5, 4, proxy_init="zeros")


def test_zero_weights_allowed_and_k_checked() -> None:
    HUGHead(3, 2, alpha=0.0)
    HUGHead(3, 2, beta=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        HUGHead(1, 4)


@pytest.mark.parametrize("bad", [5, -1, 17])
def test_labels_out_of_range(bad: int) -> None:
    head = HUGHead(5, 4)
    y = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match=rf"label {bad} out of range.*num_classes=5"):
        head.loss(torch.randn(4, 4), y)
    with pytest.raises(ValueError, match="integer"):
        head.loss(torch.randn(4, 4), y.float())
    with pytest.raises(ValueError, match="width"):
        head.loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- DDP semantics
def ddp_grads(head: HUGHead, h: torch.Tensor, y: torch.Tensor, ranks: int):
    """Gradients DDP would apply: the average over ranks of each local loss's gradient."""
    hs, ys = h.chunk(ranks), y.chunk(ranks)
    avg = sum(head.loss(a, b)[0] for a, b in zip(hs, ys)) / ranks
    return avg, torch.autograd.grad(avg, (h, head.proxies))


def one_process(head: HUGHead, h: torch.Tensor, y: torch.Tensor):
    total = head.loss(h, y)[0]
    return total, torch.autograd.grad(total, (h, head.proxies))


def close(a, b) -> None:
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("detach", [True, False])
def test_ddp_per_sample_equals_one_process(detach: bool) -> None:
    head = make_head(6, 5, intra_reduction="per_sample", detach_proxy=detach)
    h = torch.randn(12, 5, dtype=F64, requires_grad=True)
    y = torch.randint(0, 6, (12,))
    loss1, g1 = one_process(head, h, y)
    loss2, g2 = ddp_grads(head, h, y, 2)
    torch.testing.assert_close(loss1, loss2)
    close(g1, g2)


@pytest.mark.parametrize("variant", ["mhe", "mhs", "mgd"])
def test_ddp_inter_term_equals_one_process(variant: str) -> None:
    """Each rank's inter term uses all K proxies, whatever classes its shard holds (here rank 1
    lacks classes 0-2): an inter term over the classes present in the local batch would fail."""
    h = torch.randn(12, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 4])  # unbalanced halves
    inter_only = make_head(6, 5, variant=variant, beta=0.0)
    close(one_process(inter_only, h, y)[1], ddp_grads(inter_only, h, y, 2)[1])
    # with the proxy detached the proxies' gradient comes from inter only: DDP-exact as well
    head = make_head(6, 5, variant=variant)
    assert torch.allclose(one_process(head, h, y)[1][1], ddp_grads(head, h, y, 2)[1][1])


def simulated_sync(y: torch.Tensor, num_classes: int, ranks: int) -> CountSync:
    """What the all-reduce returns: the global batch's class counts (a K-vector) or size."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == num_classes:
            return torch.bincount(y, minlength=num_classes).to(t.dtype)
        return torch.full_like(t, float(len(y)))
    return CountSync(reduce, ranks)


@pytest.mark.parametrize("reduction", ["class_balanced", "per_sample"])
@pytest.mark.parametrize("detach", [True, False])
def test_ddp_with_synced_counts_equals_one_process(reduction: str, detach: bool) -> None:
    """Shards with different classes and sizes (rank 0: 7 samples of {0,1,2}, rank 1: 5 of
    {3,4}): the ranks' averaged gradient is the single-process one, and the mean of the
    ranks' logged intra is the single-process intra."""
    head = make_head(6, 5, intra_reduction=reduction, detach_proxy=detach)
    h = torch.randn(12, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3, 4])
    loss1, g1 = one_process(head, h, y)
    intra1 = head.loss(h, y)[1]["intra"]
    head.count_sync = simulated_sync(y, 6, 2)
    shards = [(h[:7], y[:7]), (h[7:], y[7:])]
    losses = [head.loss(a, b) for a, b in shards]
    avg = sum(total for total, _ in losses) / 2
    g2 = torch.autograd.grad(avg, (h, head.proxies))
    torch.testing.assert_close(avg, loss1)
    close(g1, g2)
    torch.testing.assert_close(sum(t["intra"] for _, t in losses) / 2, intra1)
    head.sync_class_counts = False  # the local statistics: not one process on these shards
    assert not torch.allclose(sum(head.loss(a, b)[0] for a, b in shards) / 2, loss1)
    head.sync_class_counts, _ = True, head.eval()  # evaluation never calls the collective
    head.count_sync = CountSync(lambda t: pytest.fail("collective in eval mode"), 2)
    head.loss(h[:7], y[:7])


def documented_ddp_intra(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, R: int):
    """sum_i dist_i / (R |C_r| n_{r, y_i}): the docstring's formula, written with loops."""
    x = h / h.norm(dim=1, keepdim=True)
    w = (W / W.norm(dim=1, keepdim=True)).detach()
    total = h.new_zeros(())
    for hr, yr in zip(x.chunk(R), y.chunk(R)):
        classes = yr.unique().tolist()
        for i in range(len(yr)):
            n = int((yr == yr[i]).sum())
            total = total + (hr[i] - w[yr[i]]).norm() / (R * len(classes) * n)
    return total


def test_ddp_class_balanced_follows_documented_formula() -> None:
    head = make_head(6, 5, alpha=0.0)  # intra term only
    h = torch.randn(12, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 4])  # rank 0: {0,1,2}, rank 1: {3,4}
    loss2, g2 = ddp_grads(head, h, y, 2)
    ref = documented_ddp_intra(h, head.proxies, y, 2)
    torch.testing.assert_close(loss2, ref, rtol=1e-6, atol=0)
    close(g2[:1], torch.autograd.grad(ref, (h,)))
    loss1, _ = one_process(head, h, y)
    assert not torch.allclose(loss1, loss2)  # unstratified halves: DDP != one process
    # stratified halves (same classes, n_{r,c} = n_c / R): DDP == one process
    y_strat = torch.tensor([0, 0, 1, 2, 2, 2, 0, 0, 1, 2, 2, 2])
    loss1, g1 = one_process(head, h, y_strat)
    loss2, g2 = ddp_grads(head, h, y_strat, 2)
    torch.testing.assert_close(loss1, loss2)
    close(g1, g2)
