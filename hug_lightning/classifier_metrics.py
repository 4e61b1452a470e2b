"""The per-stage metrics of :class:`~hug_lightning.module.ClassifierModule` (its base class).

:meth:`ClassifierMetrics.configure_metrics` creates them (training accuracy counts, validation
and test accuracy and loss, top-5 accuracy from :attr:`~ClassifierMetrics.top5_min_classes`
classes on, the best validation accuracy so far), :meth:`ClassifierMetrics.update_metrics`
feeds and logs them at validation and test, and :meth:`ClassifierMetrics.class_vector_geometry`
measures the head's class vectors every epoch. Override the first two together to add a metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from hug_lightning.loop import ClassifierLoop
from hug_lightning.metrics.functional_geometry import class_separation
from hug_lightning.train_accuracy import TrainAccuracy


class KeepsDtype:
    """Mixin for a torchmetrics ``Metric``: float states keep their dtype under module casts.

    Lightning's ``bf16-true`` and ``16-true`` cast the whole module (``module.to(dtype)``) and
    torchmetrics casts float states with it: a bf16 running sum of the validation loss rounds
    every addition to 8 bits (measured: 2.156 logged for a mean of 2.169 over 40 batches; 0.60
    for 0.70 over 200), a bf16 best accuracy rounds 0.175 to 0.1748. Here ``_apply`` moves the
    states to the new device only, and keeps the dtype that ``update`` casts its inputs to
    (torchmetrics re-reads it from a tensor made with the default dtype, which those precisions
    set to half inside their forward context). ``set_dtype`` still changes it.
    """

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> torch.nn.Module:
        if self._dtype_convert:  # set_dtype: the sanctioned way to change it
            return super()._apply(fn, exclude_state)

        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            if t.is_floating_point() and moved.dtype != t.dtype:
                return t.to(device=moved.device)
            return moved

        dtype = self._dtype
        out = super()._apply(keep_dtype, exclude_state)
        self._dtype = dtype
        return out


class FloatMeanMetric(KeepsDtype, MeanMetric):
    """``MeanMetric`` with float32 sums under any module cast (:class:`KeepsDtype`)."""


class FloatMaxMetric(KeepsDtype, MaxMetric):
    """``MaxMetric`` with a float32 maximum under any module cast (:class:`KeepsDtype`)."""


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
        self.val_loss, self.test_loss = FloatMeanMetric(), FloatMeanMetric()  # float32 sums
        # the best validation accuracy so far: saved in checkpoints (a resumed run continues
        # it); the sanity check never updates it (on_validation_epoch_end)
        self.val_acc_best = FloatMaxMetric()
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


__all__ = ["ClassifierMetrics", "FloatMaxMetric", "FloatMeanMetric", "KeepsDtype"]
