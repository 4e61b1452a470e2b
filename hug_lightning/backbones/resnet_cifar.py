"""ResNets with the CIFAR stem: a 3x3 stride-1 stem convolution and no max-pool.

The blocks and stages are torchvision's (``BasicBlock`` for depth 18/34, ``Bottleneck`` for 50,
stride on the 3x3 convolution), so the network is the usual "CIFAR ResNet" of the literature
(He et al. 2016 stages on 32x32 inputs, as in kuangliu/pytorch-cifar).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_LAYERS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3])}


class CifarResNet(nn.Module):
    """ResNet-18/34/50 for 32x32 images that returns its penultimate (pooled) features.

    ``forward(x)`` gives ``(B, num_features)``: the global-average-pooled output of the last
    stage, after its ReLU, so every coordinate is non-negative (see the module's
    ``embedding_dim`` option for features that can take negative values).
    ``forward_features(x)`` gives the unpooled ``(B, C, H, W)`` feature map.

    Args:
        depth: 18, 34 or 50.
        in_channels: Number of input channels.
        zero_init_residual: Zero-initialise the last BN of each residual branch (Goyal et al.).
    """

    def __init__(
        self,
        depth: Literal[18, 34, 50] = 18,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _LAYERS:
            raise ValueError(f"CifarResNet: depth must be one of 18, 34, 50, got {depth!r}.")
        block, layers = _LAYERS[depth]
        net = ResNet(block, layers, zero_init_residual=zero_init_residual)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.depth = depth
        self.num_features: int = net.fc.in_features
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map ``(B, num_features, H/8, W/8)``."""
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_features(x)).flatten(1)
