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
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.metrics.collapse import NCFeatureStats, all_reduce_sync
from hug_lightning.metrics.direct_log import epoch_log_step, log_direct
from hug_lightning.metrics.eval_pass import check_eval_pass_data, run_eval_pass
from hug_lightning.metrics.figures import FeatureSample, figure_epoch, log_figures
from hug_lightning.metrics.functional import COV_NAMES, SPH_NAMES, select_metrics

STAGES = ("train", "train_eval", "val")


class NeuralCollapseMonitor(Callback):
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
        figures_every: Every this many epochs rank 0 logs the figures of figures.py; 0: never.
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

    # ------------------------------------------------------------------ set-up and state
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
        return {"collectors": collectors, "train_done_epoch": self._train_done_epoch,
                "summed_over_ranks": summed}

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
        self._train_done_epoch = state_dict.get("train_done_epoch", -1)
        self._pending_state = None

    # ------------------------------------------------------------------ helpers
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
                          self.buffer_batches, self.eval_pass_fp32)
            reference = self._finish("train_eval", pl_module)
        if reference is not None and "val" in self.collectors:
            self.collectors["val"].set_reference(reference)

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
        log_figures(trainer.logger, step := epoch_log_step(trainer), source.means(),
                    self._classifier(pl_module)[0], norms)
        self._val_sample.log(trainer.logger, step)
