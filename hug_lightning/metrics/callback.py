"""NeuralCollapseMonitor: logs NC1-NC4 / GNC metrics every epoch from the training step outputs.

Three collectors (:class:`NCFeatureStats`, never merged in a ``MetricCollection``):

* ``train``: updated on every training batch from the step's ``features`` / ``logits`` (free:
  no extra forward). These are *train-mode* features: augmented images, BatchNorm batch
  statistics, weights changing during the epoch. NC4/NCC use the previous epoch's means.
* ``train_eval`` (``eval_pass=True``): the canonical protocol of Papyan et al.; an extra
  eval-mode, non-augmented forward pass over the training set at the end of the epoch (measured:
  epochs 1.4x longer on an H200, 1.3x on a CPU). NC4/NCC use the pass's own means (exact; see
  :mod:`~hug_lightning.metrics.eval_pass`). When on, its means are the validation reference.
* ``val``: validation features against the latest training means (NC4 / NCC accuracy): those
  of the epoch that just ended, or, for a validation in the middle of an epoch, of the last
  completed one (never the validation's own means).

Values are logged as ``nc/train/<name>``, ``nc/train_eval/<name>`` and ``nc/val/<name>``; they
are computed after one all-reduce per state, so every rank logs the same numbers, identical to
a single-process run (``train_eval`` and ``val`` read unpadded shards; the ``train`` collector
also counts the up to ``world_size - 1`` duplicates the training sampler pads an epoch with).
The first epoch accumulates around 0, later ones around the previous epoch's class means
(``pivot_cond`` reports how far the data sat from its pivots). Every ``figures_every`` epochs
rank 0 adds figures to TensorBoard.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.metrics.collapse import NCFeatureStats
from hug_lightning.metrics.direct_log import epoch_log_step
from hug_lightning.metrics.eval_pass import check_eval_pass_data
from hug_lightning.metrics.figures import FeatureSample, figure_epoch, log_figures
from hug_lightning.metrics.functional import COV_NAMES, SPH_NAMES, select_metrics
from hug_lightning.metrics.stage_collectors import StageCollectors

STAGES = ("train", "train_eval", "val")


class NeuralCollapseMonitor(StageCollectors):
    """Collect and log neural-collapse metrics every epoch.

    Args:
        enabled: Turn the monitor on or off.
        train: Collect on training batches (train-mode features; free).
        val: Collect on validation batches (against the epoch's training means).
        eval_pass: Also run an eval-mode forward over the training set every
            ``eval_pass_every`` epochs (the canonical NC protocol; epochs about 1.4x longer).
        eval_pass_every: Period of the eval pass in epochs.
        eval_pass_fp32: Run the eval pass with autocast off under ``bf16-mixed`` / ``16-mixed``
            (float32 features, as NC metrics need near collapse); false: the trainer's precision.
        metrics: Names to log (see ``hug_lightning.metrics.METRIC_NAMES``); ``None``: all but
            the one-vs-rest distances (``gnc2_ovr_dist_*``, cubic in K), for which the list
            ``[default, gnc2_ovr_dist_weights]`` adds them to that default set.
        spherical: Also compute the spherical (``*_sph``) variants.
        track_cov: Keep the ``d x d`` second moment needed by ``nc1_pinv``.
        figures_every: Every this many epochs log TensorBoard figures (cosine heat maps,
            histograms, a Projector embedding; from rank 0's features); 0: never.
        buffer_batches: Training batches concatenated before one collector update (fewer,
            larger kernels: the update costs about 20 small kernels whatever the batch size).
    """

    def __init__(
        self,
        enabled: bool = True,
        train: bool = True,
        val: bool = True,
        eval_pass: bool = False,
        eval_pass_every: int = 1,
        eval_pass_fp32: bool = True,
        metrics: Sequence[str] | None = None,
        spherical: bool = True,
        track_cov: bool = True,
        figures_every: int = 0,
        buffer_batches: int = 8,
    ) -> None:
        super().__init__()
        if eval_pass_every < 1 or figures_every < 0 or buffer_batches < 1:
            raise ValueError("eval_pass_every and buffer_batches must be >= 1, figures_every >= 0.")
        self.buffer_batches = buffer_batches
        self._buffer: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self.enabled = enabled
        self.stages = {"train": train, "train_eval": eval_pass, "val": val}
        self.eval_pass_every, self.eval_pass_fp32 = eval_pass_every, bool(eval_pass_fp32)
        self.metrics = list(metrics) if metrics is not None else None
        if self.metrics is not None:  # unknown or impossible names: an error now, not at setup
            want = select_metrics(self.metrics)
            for on, names, flag in ((spherical, SPH_NAMES, "spherical"),
                                    (track_cov, COV_NAMES, "track_cov")):
                if not on and want & set(names):
                    raise ValueError(f"--nc.metrics {sorted(want & set(names))} need "
                                     f"--nc.{flag} true (or leave them out).")
        self.spherical, self.track_cov = spherical, track_cov
        self.figures_every = figures_every
        self.collectors: dict[str, NCFeatureStats] = {}
        self._pending_state: dict[str, Any] | None = None
        self._rank = 0
        self._train_done_epoch = -1
        self._val_norms: list[Tensor] = []
        self._val_sample = FeatureSample()

    @property
    def runs_eval_pass(self) -> bool:
        """Whether this monitor runs the eval pass (asked by
        :func:`~hug_lightning.metrics.eval_pass_listeners.runs_eval_pass`)."""
        return bool(self.enabled and self.stages["train_eval"])

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.enabled or self.collectors:
            return
        if not all(hasattr(pl_module, a) for a in ("num_classes", "feature_dim", "head")):
            rank_zero_warn("NeuralCollapseMonitor needs a module with num_classes, feature_dim "
                           "and head (hug_lightning.module.ClassifierModule): disabled.")
            self.enabled = False
            return
        if stage == "fit" and self.stages["train_eval"]:
            check_eval_pass_data(trainer)
        k, d = int(pl_module.num_classes), int(pl_module.feature_dim)
        self._val_sample.num_classes = k
        shape = tuple(getattr(pl_module.head, "class_vectors", torch.empty(0)).shape)
        if shape != (k, d):
            rank_zero_warn(f"NeuralCollapseMonitor: the head's class_vectors have shape {shape}, "
                           f"not (num_classes, feature_dim) = {(k, d)}: the metrics of the "
                           "class vectors (NC3, *_weights) are skipped.")
        for name, on in self.stages.items():
            if on:
                self.collectors[name] = NCFeatureStats(
                    k, d, spherical=self.spherical, track_cov=self.track_cov,
                    metrics=self.metrics).to(pl_module.device)
        self._rank = trainer.global_rank
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch,  # noqa: ANN001
                           batch_idx) -> None:
        if self.enabled:
            self._update("train", outputs)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # validation at the end of a training epoch (inside fit, trainer.training is False
        # here): score it against this epoch's training means, not the previous epoch's.
        # Before every on_validation_epoch_start, where weight averaging (EMAWeightAveraging)
        # swaps its weights in: the training values are the trained weights' in every epoch
        if (self.enabled and not trainer.sanity_checking
                and trainer.state.fn == TrainerFn.FITTING
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            self._finish_train(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        if "val" in self.collectors:
            self.collectors["val"].reset()
        self._val_norms = []
        self._val_sample.clear()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx: int = 0) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        self._update("val", outputs)
        if figure_epoch(self.figures_every, trainer) and isinstance(outputs, dict):
            if len(self._val_norms) < 64:  # the sample: until full (past 64 batches)
                self._val_norms.append(outputs["features"].float().norm(dim=1).cpu())
            self._val_sample.add(outputs["features"], outputs["labels"])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled or trainer.sanity_checking or "val" not in self.collectors:
            return
        self._finish("val", pl_module)
        self._maybe_figures(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            self._finish_train(trainer, pl_module)

    def _maybe_figures(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not figure_epoch(self.figures_every, trainer):
            return
        # the latest computed training means (the eval pass may not have run yet this epoch)
        source = next((col for stage in ("train_eval", "train")
                       if (col := self.collectors.get(stage)) is not None and col.has_means()),
                      None)
        if source is None or not trainer.is_global_zero:
            return
        norms = torch.cat(self._val_norms) if self._val_norms else None
        step, means, class_vectors = epoch_log_step(trainer), source.means(), \
            self._classifier(pl_module)[0]
        for logger in trainer.loggers:  # every TensorBoard one (`trainer.logger` is the first)
            log_figures(logger, step, means, class_vectors, norms)
            self._val_sample.log(logger, step)
