"""The stage collectors of :class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor`.

Everything the monitor does with its :class:`~hug_lightning.metrics.collapse.NCFeatureStats`
collectors (one per stage: ``train``, ``train_eval``, ``val``) apart from Lightning's hooks:
batch updates (training batches buffered, ``buffer_batches`` per update), the epoch-end
compute, logging and hand-over of the class means, and the checkpoint state (sums added over
processes; the training collectors' latest class means).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from hug_lightning.metrics.collapse import NCFeatureStats, all_reduce_sync
from hug_lightning.metrics.direct_log import log_direct
from hug_lightning.metrics.eval_pass import run_eval_pass
from hug_lightning.metrics.eval_pass_listeners import eval_pass_listeners


class StageCollectors(Callback):
    """Base class of :class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor`: its
    collectors' updates, epoch-end results and checkpoint state. The subclass sets the
    attributes below in ``__init__`` and builds ``collectors`` in ``setup``."""

    collectors: dict[str, NCFeatureStats]
    buffer_batches: int
    eval_pass_every: int
    eval_pass_fp32: bool
    _buffer: list[tuple[Tensor, Tensor, Tensor | None]]
    _pending_state: dict[str, Any] | None
    _rank: int
    _train_done_epoch: int

    def state_dict(self) -> dict[str, Any]:
        """The collectors' states, their sums added over processes.

        Lightning calls this on every rank and writes rank 0's copy, which every rank loads: a
        rank's own partial sums would be saved (the others' lost) and then counted once per
        rank. So the sums are all-reduced here (a collective: every rank saves together) and
        :meth:`load_state_dict` gives them to rank 0 only, like the module's accuracy counts.
        """
        self._flush()  # buffered batches belong in the saved sums
        summed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        collectors = {}
        for name, col in self.collectors.items():
            state = col.state_dict()
            if summed:
                for key in col._reductions:  # the SUM states (pivots are the same on all ranks)
                    state[key] = all_reduce_sync(getattr(col, key))[0]
            collectors[name] = state
        # the training collectors' latest class means (not states; the same on every rank):
        # a validation inside the epoch a fit resumes in draws its figures from them
        means = {name: col.computed_means() for name, col in self.collectors.items()
                 if name != "val" and col.has_means()}
        return {"collectors": collectors, "train_done_epoch": self._train_done_epoch,
                "summed_over_ranks": summed, "means": means}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.collectors:  # restored before setup: apply once the collectors exist
            self._pending_state = state_dict
            return
        zero_sums = state_dict.get("summed_over_ranks", False) and self._rank != 0
        for name, sd in state_dict.get("collectors", {}).items():
            if name in self.collectors:
                col = self.collectors[name]
                if zero_sums:  # rank 0 holds the total; the others continue from zero
                    sd = {k: (torch.zeros_like(v) if k in col._reductions else v)
                          for k, v in sd.items()}
                col.load_state_dict(sd)
        # a checkpoint written before the means were saved has none: the figures of the
        # validations before this epoch's end are then left out, as they were
        for name, saved in state_dict.get("means", {}).items():
            if name in self.collectors:
                self.collectors[name].restore_means(saved)
        self._train_done_epoch = state_dict.get("train_done_epoch", -1)
        self._pending_state = None

    @staticmethod
    def _classifier(pl_module: LightningModule) -> tuple[Tensor | None, Tensor | None]:
        """The head's class vectors and bias, or ``(None, None)`` when they are not
        ``(K, feature_dim)`` (a head that projects the features: no NC3 / weight metrics)."""
        head = pl_module.head
        w = head.class_vectors.detach()
        if tuple(w.shape) != (int(pl_module.num_classes), int(pl_module.feature_dim)):
            return None, None
        return w, None if head.class_bias is None else head.class_bias.detach()

    @staticmethod
    def _log(trainer: Trainer, stage: str, values: dict[str, Tensor]) -> None:
        """Log ``nc/<stage>/<name>`` to every logger and to ``trainer.callback_metrics``
        directly (:func:`~hug_lightning.metrics.direct_log.log_direct`: not ``pl_module.log``)."""
        named = {f"nc/{stage}/{name}": value for name, value in values.items()}
        if stage != "val" and "nc1_pinv" in values:  # TensorBoard's HPARAMS tab: the last one
            named["hp/nc1_pinv"] = values["nc1_pinv"]  # (train_eval after train, if both run)
        log_direct(trainer, named)

    def _update(self, stage: str, outputs: Any) -> None:
        col = self.collectors.get(stage)
        if col is None or not isinstance(outputs, dict) or "features" not in outputs:
            return
        if outputs["features"].shape[-1] != col.dim:  # metadata only: no sync
            raise ValueError(
                f"NeuralCollapseMonitor: the {stage} step returned features of width "
                f"{outputs['features'].shape[-1]}, the module's feature_dim is {col.dim}. A step "
                "override must return the features fed to the head (or set --nc.enabled false).")
        if stage != "train":
            col.update(outputs["features"], outputs["labels"], logits=outputs.get("logits"))
            return
        self._buffer.append((outputs["features"], outputs["labels"], outputs.get("logits")))
        if len(self._buffer) >= self.buffer_batches:
            self._flush()

    def _flush(self) -> None:
        """Apply the buffered training batches to the ``train`` collector in one update."""
        if not self._buffer or "train" not in self.collectors:
            self._buffer = []
            return
        feats, labels, logits = zip(*self._buffer)
        self._buffer = []
        self.collectors["train"].update(
            torch.cat(feats), torch.cat(labels),
            logits=None if any(x is None for x in logits) else torch.cat(logits))

    def _finish(self, stage: str, pl_module: LightningModule) -> Tensor | None:
        col = self.collectors[stage]
        w, b = self._classifier(pl_module)
        self._log(pl_module.trainer, stage, col.compute(W=w, b=b))
        col.reset()
        means = col.means()
        # this epoch's means -> next epoch's pivots; and NCC reference, except for ``val``,
        # whose NCC reference stays the training means (set by ``_finish_train``)
        col.set_reference(means, col.means(spherical=True) if col.spherical else None,
                          ncc=stage != "val")
        return means

    def _finish_train(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute the training collectors once per epoch; hand their means to ``val``."""
        if self._train_done_epoch == trainer.current_epoch:
            return
        self._train_done_epoch = trainer.current_epoch
        reference = None
        if "train" in self.collectors:
            self._flush()
            reference = self._finish("train", pl_module)
        if ("train_eval" in self.collectors
                and (trainer.current_epoch + 1) % self.eval_pass_every == 0):
            run_eval_pass(trainer, pl_module, self.collectors["train_eval"],
                          self.buffer_batches, self.eval_pass_fp32,
                          listeners=eval_pass_listeners(trainer))
            reference = self._finish("train_eval", pl_module)
        if reference is not None and "val" in self.collectors:
            self.collectors["val"].set_reference(reference)


__all__ = ["StageCollectors"]
