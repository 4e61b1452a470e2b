"""The per-stage metrics of :class:`~hug_lightning.module.ClassifierModule` (its base class).

:meth:`ClassifierMetrics.configure_metrics` creates them (training accuracy counts, validation
and test accuracy and loss, top-5 accuracy from :attr:`~ClassifierMetrics.top5_min_classes`
classes on, the best validation accuracy so far), :meth:`ClassifierMetrics.update_metrics`
feeds and logs them at validation and test, and :meth:`ClassifierMetrics.class_vector_geometry`
measures the head's class vectors every epoch. Override the first two together to add a metric.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from hug_lightning.loop import ClassifierLoop
from hug_lightning.metrics.functional_geometry import class_separation
from hug_lightning.train_accuracy import TrainAccuracy


class ClassifierMetrics(ClassifierLoop):
    """Metrics of a classifier with ``num_classes`` and a ``head`` with ``class_vectors`` (both
    set by :class:`~hug_lightning.module.ClassifierModule` before :meth:`configure_metrics`)."""

    num_classes: int

    #: From this many classes on, validation and test also log top-5 accuracy (``*/acc_top5``).
    top5_min_classes: int = 100

    def configure_metrics(self) -> None:
        """Create the per-stage torchmetrics objects (one per stage, never shared)."""
        # validate_args=False: torchmetrics' input checks read values back to the host (a
        # device sync per step); labels are checked by the data modules and check_labels
        acc = {"num_classes": self.num_classes, "average": "micro", "validate_args": False}
        # training accuracy: two counters (correct, seen), summed over processes at the end of
        # the epoch, kept in checkpoints; not a registered buffer (see TrainAccuracy)
        self.train_accuracy = TrainAccuracy()
        self.val_acc = MulticlassAccuracy(**acc)
        self.test_acc = MulticlassAccuracy(**acc)
        if self.num_classes >= self.top5_min_classes:  # ImageNet-scale: top-5 as well
            self.val_acc_top5 = MulticlassAccuracy(top_k=5, **acc)
            self.test_acc_top5 = MulticlassAccuracy(top_k=5, **acc)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        # the best validation accuracy so far: saved in checkpoints (a resumed run continues
        # it); the sanity check never updates it (on_validation_epoch_end)
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)

    @torch.no_grad()
    def class_vector_geometry(self) -> dict[str, Tensor]:
        """Separation of the head's normalized class vectors (one K x K Gram, every epoch).

        ``geometry/min_angle`` (degrees, between the closest two), ``geometry/max_cos`` and
        ``geometry/riesz2_energy`` (mean over pairs of 1/||w_c - w_c'||^2, HUG's inter term).
        """
        separation = class_separation(self.head.class_vectors.detach())
        return {f"geometry/{name}": value.float() for name, value in separation.items()}

    def update_metrics(self, out: dict[str, Any], stage: str) -> None:
        """Feed one validation/test batch's :meth:`step` output to the stage's metrics and log
        them (epoch values). Override to add metrics created in :meth:`configure_metrics`
        (call ``super().update_metrics(out, stage)`` to keep loss and accuracy)."""
        n = out["labels"].shape[0]
        acc, loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        acc.update(out["logits"].argmax(-1), out["labels"])
        loss.update(out["loss"].detach(), weight=n)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=n)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        if (top5 := getattr(self, f"{stage}_acc_top5", None)) is not None:
            top5.update(out["logits"], out["labels"])
            self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True, batch_size=n)


__all__ = ["ClassifierMetrics"]
