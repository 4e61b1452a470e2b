"""Cross-entropy head: a linear classifier with bias, optional label smoothing."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hug_lightning.heads.base import Head, HeadOutput


class CrossEntropyHead(Head):
    """Linear layer ``W x + b`` trained with (label-smoothed) cross-entropy.

    Args:
        num_classes: Number of classes ``K``. Filled in by the module.
        in_features: Feature width ``d``. Filled in by the module.
        bias: Whether the linear layer has a bias (the usual classifier has one).
        label_smoothing: Label smoothing in ``[0, 1)``; 0 is plain cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        bias: bool = True,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_features)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(
                f"CrossEntropyHead: label_smoothing must be in [0, 1), got {label_smoothing}."
            )
        self.label_smoothing = float(label_smoothing)
        self.fc = nn.Linear(self.in_features, self.num_classes, bias=bias)

    @property
    def class_vectors(self) -> Tensor:
        return self.fc.weight

    @property
    def class_bias(self) -> Tensor | None:
        return self.fc.bias

    def logits(self, features: Tensor) -> Tensor:
        return self.fc(features)

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        # float32 loss math under bf16/fp16 autocast
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def loss(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce = self._ce(self.logits(features), labels)
        return ce, {"ce": ce.detach()}

    def forward_train(self, features: Tensor, labels: Tensor) -> HeadOutput:
        logits = self.logits(features)
        ce = self._ce(logits, labels)
        return HeadOutput(ce, {"ce": ce.detach()}, logits.detach())


__all__ = ["CrossEntropyHead"]
