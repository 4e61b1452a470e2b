"""The head contract: what every classification head gives the :class:`ClassifierModule`.

A head turns features ``(B, d)`` into

* ``logits(features)``: scores ``(B, K)`` whose argmax is the prediction (for HUG: cosines to
  the proxies; for cross-entropy: ``W x + b``);
* ``loss(features, labels)``: the training objective as ``(total, terms)``, where ``terms`` maps
  a short name (``"ce"``, ``"inter"``, ``"intra"``) to a scalar tensor; the module logs each
  term as ``train/<name>``;
* ``class_vectors``: the ``(K, d)`` class vectors (cross-entropy weight rows or HUG proxies),
  used by the neural-collapse collectors (NC3, GNC2 on the classifier) and the figures;
* ``class_bias``: the ``(K,)`` bias when the head has one, else ``None``.

A new loss is a new subclass: implement ``class_vectors``, ``logits`` and ``loss``, keep
``(num_classes, in_features)`` as the first two constructor arguments (the module passes them;
LightningCLI fills the rest from the YAML ``init_args``), and select it with
``model.init_args.head.class_path``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn


class HeadOutput(NamedTuple):
    """What :meth:`Head.forward_train` returns for one batch."""

    loss: Tensor
    terms: dict[str, Tensor]
    logits: Tensor


class Head(nn.Module, ABC):
    """Base class of classification heads.

    Args:
        num_classes: Number of classes ``K`` (at least 2). Filled in by the module.
        in_features: Width ``d`` of the features the head receives. Filled in by the module.
    """

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        if int(num_classes) < 2:
            raise ValueError(
                f"{type(self).__name__}: num_classes must be at least 2, got {num_classes}; "
                "a classifier needs two classes or more."
            )
        if int(in_features) < 1:
            raise ValueError(
                f"{type(self).__name__}: in_features must be positive, got {in_features}."
            )
        self.num_classes = int(num_classes)
        self.in_features = int(in_features)

    @property
    @abstractmethod
    def class_vectors(self) -> Tensor:
        """The ``(K, d)`` class vectors (classifier rows or proxies)."""

    @property
    def class_bias(self) -> Tensor | None:
        """The ``(K,)`` bias of the linear decision, or ``None`` when there is none."""
        return None

    @abstractmethod
    def logits(self, features: Tensor) -> Tensor:
        """Scores ``(B, K)`` whose argmax is the predicted class."""

    @abstractmethod
    def loss(self, features: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss of a batch: ``(total, {term_name: value})``."""

    def forward_train(self, features: Tensor, labels: Tensor) -> HeadOutput:
        """Loss, its terms and the logits of one batch.

        Override when the loss and the logits share work (the cross-entropy head does).
        """
        result = self.loss(features, labels)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
            raise TypeError(
                f"{type(self).__name__}.loss must return (total, terms): the scalar loss and a "
                f"dict of named scalar terms to log ({{}} for none); it returned "
                f"{type(result).__name__}.")
        total, terms = result
        with torch.no_grad():
            logits = self.logits(features.detach())
        return HeadOutput(total, terms, logits)

    def predict(self, features: Tensor) -> Tensor:
        """Predicted class indices ``(B,)``: ``logits(features).argmax(-1)``, the rule the
        module, the callbacks and ``predict`` all use (override :meth:`logits`, not this, to
        change predictions)."""
        return self.logits(features).argmax(dim=-1)

    def forward(self, features: Tensor) -> Tensor:
        return self.logits(features)


#: What the module's ``head`` argument is: a factory taking ``(num_classes, in_features)``.
#: In YAML it is written as ``class_path`` + ``init_args`` without those two arguments.
HeadCallable = Callable[[int, int], Head]
