"""The stages of :class:`~hug_lightning.module.ClassifierModule`, written once around its hooks.

:class:`ClassifierLoop` is the module's base class: the Lightning hooks of training,
validation, test and predict, checkpoint extras, and logging. What a study changes is not here
but in the hooks it calls, defined by ``ClassifierModule``:

* :meth:`~ClassifierLoop.unpack_batch` (a batch's images and labels: read by ``step``,
  ``predict_step``, the NC eval pass and ``RobustnessEvaluation``; tuples by default);
* :meth:`~ClassifierLoop.step` (the shared step: ``loss``, ``features``, ``logits``,
  ``labels``, optionally ``terms``); every ``*_step`` detaches the features and returns the
  dict, so callbacks read it from ``outputs``;
* :meth:`~ClassifierLoop.update_metrics` (validation and test metrics);
* :meth:`~ClassifierLoop.class_vector_geometry` (logged at the end of each training epoch).

It reads the attributes ``ClassifierModule.__init__`` sets: ``loss_guard``
(:class:`~hug_lightning.guards.FiniteLossGuard`), ``_norm_snapshot``
(:class:`~hug_lightning.guards.RunningStatsSnapshot`), ``step_log``
(:class:`~hug_lightning.step_log.StepLog`), ``plateau_steps``
(:class:`~hug_lightning.plateau_steps.PlateauSteps`), and those of ``configure_metrics``:
``train_accuracy`` (:class:`~hug_lightning.train_accuracy.TrainAccuracy`), ``val_acc``,
``val_acc_best``, ``test_acc``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.epoch_end_restart import epoch_end_skipped_message, restart_skips_epoch_end
from hug_lightning.hp_tab import HP_METRICS, data_hparams, resumed_in_place
from hug_lightning.max_steps_resume import resume_as_epoch_training
from hug_lightning.predictions import predict_outputs

# Epoch values that are global already (summed over processes, synced torchmetrics values, or
# the same on every rank): Lightning's advice to log them with `sync_dist=True` does not apply.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(train/acc|"
                        r"val/acc_best|hp/(val_acc_best|test_acc)|geometry/[a-z0-9_]+)'")


def unpack_batch_of(module: Any, batch: Any, needs: str | None = None) -> tuple[Any, Any]:
    """``module.unpack_batch(batch)``, or ``(batch[0], batch[1])`` for a module without that
    hook (a plain ``LightningModule``): how the callbacks, given any module, read a batch.

    Args:
        module: The module the batch is for.
        batch: One batch, as its loader yields it (on the module's device).
        needs: What needs the labels, named in the error when there are none; ``None``: none
            is fine (``predict``).

    Returns:
        ``(images, labels)``; ``labels`` may be ``None`` only when ``needs`` is ``None``.
    """
    hook = getattr(module, "unpack_batch", None)
    images, labels = hook(batch) if callable(hook) else (batch[0], batch[1])
    if labels is None and needs is not None:
        raise ValueError(f"{needs} needs labels, and {type(module).__name__}.unpack_batch gave "
                         "none for this batch (override unpack_batch to read them).")
    return images, labels


class ClassifierLoop(LightningModule):
    """Training, validation, test and predict steps around the hooks :meth:`unpack_batch`,
    :meth:`step`, :meth:`update_metrics` and :meth:`class_vector_geometry` (see the module
    docstring)."""

    predict_features: bool = False  #: predict_step adds features (PredictionWriter sets it)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` twice around every hook call (about 50 times a
        # step); nn.Module.__setattr__ spends ~5 us on each checking parameters, buffers and
        # submodules. That name is only ever a string or None: store it directly.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def train_counts(self) -> Tensor:
        """The epoch's ``(correct, seen)`` training counts on this process (``train_accuracy``'s
        tensor, read and set)."""
        return self.train_accuracy.counts

    @train_counts.setter
    def train_counts(self, counts: Tensor) -> None:
        self.train_accuracy.counts = counts

    # ----------------------------------------------------------------- hooks (ClassifierModule)
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """Split one batch into images and labels: the batch contract, in one place.

        ``step`` (training, validation, test), ``predict_step``, the NC eval pass and
        ``RobustnessEvaluation`` read batches only through this hook. Override it for a data
        module whose batches are not ``(images, labels)`` tuples, e.g. dicts::

            def unpack_batch(self, batch):
                return batch["image"], batch.get("label")

        Args:
            batch: One batch as the loader yields it, already on the module's device.

        Returns:
            ``(images, labels)``: the default reads a tuple or list ``(images, labels, ...)``,
            a one-element one or a bare tensor as images without labels (``None``: predict
            only; the other stages need labels).

        Raises:
            TypeError: The batch is a mapping (a dict): which keys hold what is the data's
                convention, so a subclass says it by overriding this hook.
        """
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(batch, Mapping):
            raise TypeError(
                f"{type(self).__name__} reads (images, labels) batches; this data module gives "
                f"dicts (keys {sorted(map(str, batch))}): override unpack_batch in a subclass, "
                "e.g. `return batch['image'], batch.get('label')`.")
        return batch, None

    def step(self, batch: Any, stage: str) -> dict[str, Any]:
        """The shared train/val/test step (see the module docstring)."""
        raise NotImplementedError

    def update_metrics(self, out: dict[str, Any], stage: str) -> None:
        """Feed one validation/test batch's :meth:`step` output to the metrics and log them."""
        raise NotImplementedError

    def class_vector_geometry(self) -> dict[str, Tensor]:
        """Values to log at the end of each training epoch."""
        raise NotImplementedError

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the epoch's training-accuracy counts, summed over processes (Lightning calls
        this hook on every rank, so the reduction is collective), the count of skipped batches
        and the state of the plateau steps (:mod:`hug_lightning.plateau_steps`)."""
        self.train_accuracy.save(checkpoint, self._trainer)
        checkpoint["skipped_batches"] = self.loss_guard.skipped  # the same on every rank
        self.plateau_steps.save(checkpoint, self._trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the training-accuracy counts on rank 0 (they are already the sum over
        processes; older checkpoints stored them as a module buffer), the count of skipped
        non-finite batches and the plateau steps' state, and accept checkpoints written before
        ``val_acc_best`` was saved. A fit with ``max_steps`` resumes from an epoch's end as
        one without it (:mod:`hug_lightning.max_steps_resume`)."""
        if self._trainer is not None:
            resume_as_epoch_training(self._trainer)  # before Lightning restores its loops
        state = checkpoint.get("state_dict", {})
        for key, value in self.val_acc_best.state_dict(prefix="val_acc_best.").items():
            state.setdefault(key, value)  # checkpoints from before it was saved
        self.loss_guard.skipped = int(checkpoint.pop("skipped_batches", 0))
        rank = self.trainer.global_rank if self._trainer is not None else 0
        self.train_accuracy.load(checkpoint, rank)
        self.plateau_steps.load(checkpoint)

    def on_train_epoch_end(self) -> None:
        self.loss_guard.flush()
        self.step_log.flush(self.trainer)
        self.log("train/acc", self.train_accuracy.compute_and_reset(self.trainer))
        self.log_dict(self.class_vector_geometry())
        self.plateau_steps.epoch_end(self)  # last: after the epoch's values, before checkpoints

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        if not self.plateau_steps.taken(scheduler, metric, self.trainer):  # see there
            super().lr_scheduler_step(scheduler, metric)

    def on_train_start(self) -> None:
        # resumed from a file written after an epoch's last batch: Lightning skips that epoch's
        # end, where the counts restart (see hug_lightning.epoch_end_restart)
        if restart_skips_epoch_end(self.trainer):
            rank_zero_warn(epoch_end_skipped_message(self.trainer))
            self.train_accuracy.counts.zero_()

    def on_train_end(self) -> None:
        self.step_log.flush(self.trainer)

    # ----------------------------------------------------------------- steps
    def _log_this_step(self) -> bool:
        """Log step values when Lightning writes step values: every
        ``trainer.log_every_n_steps`` optimizer steps, on the last batch of an accumulation
        window (Lightning's loop internals; every batch where they are missing)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        accumulating = getattr(getattr(self.trainer, "fit_loop", None), "_should_accumulate",
                               lambda: False)
        return bool(getattr(connector, "should_update_logs", True)) and not accumulating()

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any] | None:
        self.step_log.poll(self.trainer)
        skipping = self.loss_guard.policy == "skip"
        if skipping:  # a skipped batch must leave the BatchNorm running statistics untouched
            self._norm_snapshot.save()
        out = self.step(batch, "train")
        out["features"] = out["features"].detach()  # callbacks keep them: no graph
        terms = out.get("terms") or {}
        if not self.loss_guard.check(out["loss"], terms, self.current_epoch, self.global_step):
            if skipping:
                self._norm_snapshot.restore()
            self.step_log.record(self.trainer, {"train/skipped_batches": self.loss_guard.skipped})
            return None
        self.train_accuracy.update(out["logits"], out["labels"])
        if self._log_this_step():
            self.log_step_values(out)
        return out

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # the epoch's last batch: write the values still on their way, for the callbacks'
        # epoch-end hooks (the progress bar's final line), which run before this module's
        trainer = self.trainer
        if batch_idx + 1 >= trainer.num_training_batches or \
                0 < trainer.max_steps <= trainer.global_step:
            self.step_log.flush(trainer)

    def log_step_values(self, out: dict[str, Any]) -> None:
        """Log the training loss (also in the progress bar), its terms and the learning rate
        of the first parameter group, on the steps Lightning logs.

        Through :class:`~hug_lightning.step_log.StepLog`, not ``self.log``: no host
        synchronisation (``self.log(..., prog_bar=True)`` costs one on every later step of the
        epoch), unless a callback monitors one of these keys (``ModelCheckpoint(monitor=
        "train/loss")``): it reads them in the same batch, so they are waited for. Under DDP
        the tensors are averaged over processes (the global batch's value). Override to log
        more; keep every rank calling it at the same steps.
        """
        values: dict[str, Any] = {"train/loss": out["loss"]}
        values.update({f"train/{name}": value for name, value in (out.get("terms") or {}).items()})
        if self.trainer.optimizers:
            values["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
        monitored = {m for m in (getattr(c, "monitor", None) for c in self.trainer.callbacks)
                     if isinstance(m, str)}
        self.step_log.record(self.trainer, values, prog_bar=("train/loss",), sync_dist=True,
                             wait=not monitored.isdisjoint(values))

    def _eval_step(self, batch: Any, stage: str) -> dict[str, Any]:
        out = self.step(batch, stage)
        out["features"] = out["features"].detach()
        self.update_metrics(out, stage)
        return out

    def on_validation_start(self) -> None:
        # a validation inside fit: the training values still on their way are written first,
        # so that its callbacks (the progress bar, checkpoint names, epoch-end hooks) read the
        # last logged ones, as with self.log (one wait for the device per validation)
        self.step_log.flush(self.trainer)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.val_acc.compute())
        best = self.val_acc_best.compute()
        self.log("val/acc_best", best)
        self.log("hp/val_acc_best", best)

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        return self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log("hp/test_acc", self.test_acc.compute())

    def predict_step(self, batch: Any, batch_idx: int,
                     dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``pred``, ``logits``, ``label`` (if any), and ``features`` when ``predict_features``
        is true (``--predictions.features``; :func:`hug_lightning.predictions.predict_outputs`)."""
        x, y = self.unpack_batch(batch)
        result = predict_outputs(self, x, self.predict_features)
        if y is not None:
            result["label"] = y
        return result

    # ----------------------------------------------------------------- TensorBoard's HPARAMS
    def _declare_hp_metrics(self) -> None:
        """Declare the tab's metrics (NaN at step 0) once per log folder, in every TensorBoard
        logger (not only the first of ``trainer.logger: [CSVLogger, TensorBoardLogger]``):
        again, after the run's later values (a resume in place, a test after a fit in one
        trainer), the NaN would be the last value, which the tab shows."""
        self._hp_declared_in = declared = getattr(self, "_hp_declared_in", set())
        for logger in self.trainer.loggers:
            if not isinstance(logger, TensorBoardLogger) or logger.log_dir in declared:
                continue
            declared.add(logger.log_dir)
            if not resumed_in_place(self.trainer, logger):  # there, the first fit declared them
                datamodule = getattr(self.trainer, "datamodule", None)
                logger.log_hyperparams({**self.hparams, **data_hparams(datamodule)},
                                       HP_METRICS)

    def on_fit_start(self) -> None:
        self.step_log.clear()  # anything left by a fit that died
        self._declare_hp_metrics()

    def on_test_start(self) -> None:
        self._declare_hp_metrics()
