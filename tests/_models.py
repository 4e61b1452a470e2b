"""Tiny models shared by the tests."""

from __future__ import annotations

from torch import Tensor, nn


class LinearBackbone(nn.Module):
    """A backbone with parameters (so the optimizer has a body group): one ``width x width``
    Linear layer, features of width ``width``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = width
        self.fc = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)
