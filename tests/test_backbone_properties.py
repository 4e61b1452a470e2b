"""Tests written from a mutation audit of the backbones, the Head contract, the cross-entropy
head and the module's extension hooks (configure_backbone / configure_embedding /
configure_head, forward_features).

Expected values come from outside the code under test: the literature's parameter counts,
closed-form sizes, or a few lines of plain torch written here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hug_lightning.backbones import CifarResNet, SmallConvNet
from hug_lightning.backbones.torchvision_models import TorchvisionBackbone
from hug_lightning.heads import CrossEntropyHead, Head
from hug_lightning.module import ClassifierModule


def _count(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---------------------------------------------------------------- CIFAR ResNet
@pytest.mark.parametrize("depth, params", [(34, 21_282_122), (50, 23_520_842)])
def test_cifar_resnet_34_and_50_have_the_usual_sizes(depth, params):
    """kuangliu/pytorch-cifar ResNet34 / ResNet50 with a 10-class linear head: the block
    counts (3, 4, 6, 3) and block types of the literature."""
    net = CifarResNet(depth=depth)
    assert _count(net, nn.Linear(net.num_features, 10)) == params


@pytest.mark.parametrize("net", [CifarResNet(depth=18), SmallConvNet(width=4)],
                         ids=["resnet18", "small"])
def test_features_are_the_global_average_of_the_last_feature_map(net):
    """forward = mean over H, W of the last stage's map (not a max, not rescaled)."""
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = net.forward_features(x) if hasattr(net, "forward_features") else net.features(x)
        torch.testing.assert_close(net(x), fmap.mean(dim=(2, 3)))


def test_zero_init_residual_zeroes_the_last_bn_of_every_branch_and_keeps_the_shortcuts():
    """Goyal et al.: every residual branch starts at zero, so each block passes its shortcut
    on; the signal (through the strided 1x1 shortcuts of stages 2-4) still reaches the
    pooled features."""
    torch.manual_seed(0)
    net = CifarResNet(depth=18, zero_init_residual=True).eval()
    last_bns = [blk.bn2 for layer in (net.layer1, net.layer2, net.layer3, net.layer4)
                for blk in layer]
    assert len(last_bns) == 8 and all(torch.all(bn.weight == 0) for bn in last_bns)
    with torch.no_grad():
        feats = net(torch.randn(4, 3, 32, 32))
    assert feats.abs().sum() > 0
    # and the default keeps the usual init (BN weight 1)
    assert torch.all(CifarResNet(depth=18).layer1[0].bn2.weight == 1)


def test_in_channels_sets_the_stem_input_width():
    """Grey-scale inputs (MNIST-like) go through the 3x3 stem."""
    net = CifarResNet(depth=18, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 512)
    assert SmallConvNet(width=4, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 16)


# ---------------------------------------------------------------- SmallConvNet
@pytest.mark.parametrize("width", [32, 64])
def test_small_convnet_size_and_stages(width):
    """Three conv3x3(no bias)-BN stages of widths w, 2w, 4w, each halving the image: the
    docstring's 0.09 M (w=32) and 0.37 M (w=64) parameters, exactly."""
    w = [3, width, 2 * width, 4 * width]
    expected = sum(9 * a * b + 2 * b for a, b in zip(w[:-1], w[1:]))
    net = SmallConvNet(width=width)
    assert _count(net) == expected and net.num_features == 4 * width
    assert round(expected / 1e6, 2) == {32: 0.09, 64: 0.37}[width]
    with torch.no_grad():
        assert net.features(torch.zeros(1, 3, 32, 32)).shape == (1, 4 * width, 4, 4)


# ---------------------------------------------------------------- torchvision wrapper
def test_torchvision_weights_names_reach_torchvision(monkeypatch):
    """``DEFAULT`` and an enum name are accepted and passed on (no download here: the
    loader is replaced by one that records what it was asked)."""
    asked = []

    def fake_get_model(name, weights=None, **kwargs):
        asked.append(weights)
        return torchvision.models.resnet18()

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    for weights in ("DEFAULT", "IMAGENET1K_V1", None):
        assert TorchvisionBackbone("resnet18", weights=weights).num_features == 512
    assert asked == ["DEFAULT", "IMAGENET1K_V1", None]


# ---------------------------------------------------------------- heads
def _ce_head(**kwargs) -> CrossEntropyHead:
    torch.manual_seed(0)
    head = CrossEntropyHead(5, 3, **kwargs)
    if head.fc.bias is not None:
        with torch.no_grad():
            head.fc.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5]))
    return head


def test_ce_head_logits_class_vectors_bias_and_predict():
    head = _ce_head()
    h = torch.randn(7, 3)
    W, b = head.class_vectors, head.class_bias
    assert W.shape == (5, 3) and b.shape == (5,)
    ref = h @ W.T + b
    torch.testing.assert_close(head.logits(h), ref)
    assert torch.equal(head.predict(h), ref.argmax(dim=1))
    # a bias-free head: logits are W h, no bias anywhere
    nob = _ce_head(bias=False)
    assert nob.class_bias is None and _count(nob) == 15
    torch.testing.assert_close(nob.logits(h), h @ nob.class_vectors.T)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_ce_head_loss_is_label_smoothed_cross_entropy(eps):
    """(1 - eps) * NLL + eps * mean over classes of -log p, written out by hand."""
    head = _ce_head(label_smoothing=eps)
    h, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 4, 0])
    logp = (h @ head.fc.weight.T + head.fc.bias).log_softmax(dim=1)
    ref = ((1 - eps) * -logp[torch.arange(6), y] - eps * logp.mean(dim=1)).mean()
    total, terms = head.loss(h, y)
    out = head.forward_train(h, y)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(terms["ce"], ref.detach())
    assert not out.logits.requires_grad and out.loss.requires_grad  # documented detaching
    params = (head.fc.weight, head.fc.bias)  # the training loss reaches the classifier
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            CrossEntropyHead(5, 3, label_smoothing=bad)


class _Cosine(Head):
    """A minimal head written to the contract (like the README's NormFace)."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__(num_classes, in_features)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features))

    @property
    def class_vectors(self):
        return self.weight

    def logits(self, features):
        return F.normalize(features, dim=1) @ F.normalize(self.weight, dim=1).T

    def loss(self, features, labels):
        ce = F.cross_entropy(8 * self.logits(features), labels)
        return ce, {"ce": ce.detach()}


def test_default_forward_train_backpropagates_into_the_features():
    """The base forward_train's loss reaches the features (the backbone learns) and the head;
    its logits are detached; the head's num_classes must be at least 2."""
    torch.manual_seed(0)
    head = _Cosine(4, 3)
    h = torch.randn(5, 3, requires_grad=True)
    out = head.forward_train(h, torch.tensor([0, 1, 2, 3, 0]))
    out.loss.backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert head.weight.grad.abs().sum() > 0 and not out.logits.requires_grad
    assert torch.equal(head.predict(h.detach()), head.logits(h.detach()).argmax(1))
    with pytest.raises(ValueError, match="at least 2"):
        _Cosine(1, 3)


# ---------------------------------------------------------------- module hooks
def test_embedding_is_a_linear_map_of_the_chosen_width_and_feeds_the_head():
    """embedding_dim=8: head built with in_features 8, features (B, 8) that take negative
    values (no ReLU), logits (B, K)."""
    torch.manual_seed(0)
    model = ClassifierModule(backbone=SmallConvNet(width=4), embedding_dim=8).eval()
    assert model.feature_dim == 8 and model.head.in_features == 8
    assert model.head.class_vectors.shape == (10, 8)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (6, 8) and (feats < 0).any()
        # a plain affine map of the backbone's features
        lin = [m for m in model.embedding.modules() if isinstance(m, nn.Linear)]
        assert len(lin) == 1
        torch.testing.assert_close(feats, lin[0](model.backbone(x)))
        assert model(x).shape == (6, 10)


def test_embedding_norm_batch_normalizes_the_features():
    """BN-linear: in training mode every feature coordinate has batch mean 0 and (biased)
    variance 1 (up to BatchNorm's eps); one BatchNorm1d."""
    torch.manual_seed(0)
    model = ClassifierModule(backbone=SmallConvNet(width=4), embedding_dim=8,
                             embedding_norm=True).train()
    feats = model.forward_features(torch.randn(16, 3, 32, 32)).detach()
    assert feats.shape == (16, 8)
    torch.testing.assert_close(feats.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.var(0, unbiased=False), torch.ones(8), atol=0.05, rtol=0)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.embedding.modules()) == 1
    # the Linear has no bias: BatchNorm's shift replaces it (a bias would be a dead parameter
    # and an extra checkpoint key, so BN-linear checkpoints would no longer load strictly)
    assert [n for n in model.state_dict() if n.startswith("embedding.")] == [
        "embedding.0.weight", "embedding.1.weight", "embedding.1.bias",
        "embedding.1.running_mean", "embedding.1.running_var", "embedding.1.num_batches_tracked"]


class _Halved(nn.Module):
    """A wrapper a subclass might build in configure_backbone: half the features."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.num_features = inner.num_features // 2

    def forward(self, x):
        return self.inner(x)[:, : self.num_features]


class HalvedBackbone(ClassifierModule):
    def configure_backbone(self, backbone):
        return _Halved(backbone)


def test_configure_backbone_result_is_the_backbone():
    model = HalvedBackbone(backbone=SmallConvNet(width=4)).eval()
    assert isinstance(model.backbone, _Halved) and model.feature_dim == 8
    assert model.head.in_features == 8
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    out = model.step((torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), "train")
    assert out["features"].shape == (2, 8) and math.isfinite(out["loss"].item())


def test_embedding_norm_without_an_embedding_is_an_error():
    """It used to be ignored silently (no Linear for the BatchNorm to follow)."""
    with pytest.raises(ValueError, match="embedding_norm=true needs an embedding"):
        ClassifierModule(backbone=SmallConvNet(width=4), embedding_norm=True)
