"""The NC eval pass: an eval-mode, non-augmented forward over the training set into a collector.

The canonical neural-collapse protocol of Papyan et al., run by
:class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor` (``eval_pass=True``) at the end of
a training epoch: the training images with the evaluation transform (the data module's
``train_eval_dataloader()``), the model in eval mode, features and logits fed to the
``train_eval`` collector in a few large updates. The trainer's callbacks that implement
:class:`~hug_lightning.metrics.eval_pass_listeners.EvalPassListener` record during the same
forwards (e.g. the layer-NC monitor's ``train_eval`` stage): no second pass. The pass reads as
many batches as ``--trainer.limit_train_batches`` lets the training loop read (:func:`batch_limit`).

Features are float32 (``fp32``, the default): under an autocast precision (``bf16-mixed``,
``16-mixed``) the pass runs with autocast off, as nc-metrics.md section 3.4 asks: bf16 features
round each coordinate to about 2^-8 relative, which puts a floor near 1e-5 on the apparent
``tr Sigma_W / E||x||^2`` and can round nearly collapsed features to equal values. The forward
then costs float32 time (TF32 where the trainer allows it), and a compiled backbone compiles a
second graph for it once. Other precisions (``32-true``, ``bf16-true``...) keep their own context.

NC4 and the NCC accuracies of this pass are exact: scored against the pass's own class means
(Papyan's value, nc-metrics.md section 3.3), by a second sweep over the features kept on the
device during the pass (``N x d`` numbers per process: 100 MB for CIFAR-10 at d = 512 in
float32, twice that under ``64-true``). Above :data:`EXACT_NCC_MAX_BYTES` per process the pass
scores them against the previous pass's means instead (lagged, as the ``train`` collector does)
and says so once.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.cli_errors import ConfigError
from hug_lightning.loop import unpack_batch_of
from hug_lightning.metrics.collapse import NCFeatureStats
from hug_lightning.metrics.eval_pass_listeners import EvalPassListener


def check_eval_pass_data(trainer: Trainer) -> None:
    """Before the first epoch (the data module is set up first): the eval pass needs the
    training images with the evaluation transform; failing at the end of epoch 0 lost it."""
    data = trainer.datamodule
    loader_fn = getattr(data, "train_eval_dataloader", None)
    missing = loader_fn is None or getattr(data, "train_eval_set", True) is None
    if missing:  # a ConfigError: the command's one-line message (exit status 2)
        raise ConfigError(
            f"--nc.eval_pass true needs the training images with the evaluation transform: "
            f"{type(data).__name__} must provide train_eval_dataloader() (a "
            "hug_lightning ClassificationDataModule: set self.train_eval_set in "
            "build_datasets). Or set --nc.eval_pass false.")


#: Most bytes of features one process keeps for the exact NCC sweep (see the module docstring).
EXACT_NCC_MAX_BYTES = 4 * 2**30


def feature_bytes(pl_module: LightningModule) -> int:
    """Bytes per kept feature value: the module's floating parameters' (8 under ``64-true``),
    at least 4 (float32: the pass's features under autocast precisions; half-precision
    parameters count as 4, an upper bound)."""
    first = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
    return max(4, 0 if first is None else first.element_size())


def keeps_features(trainer: Trainer, collector: NCFeatureStats, loader: Any) -> bool:
    """Whether the pass scores NCC exactly: the collector keeps NCC counters and this process's
    share of the loader's data set, at :func:`feature_bytes` per value, fits
    :data:`EXACT_NCC_MAX_BYTES`. The same answer on every rank (it depends on the set's length
    and the parameters' dtype only): the sweep's all-reduce runs on all of them or on none."""
    if not collector.ncc:
        return False
    try:  # a DataLoader's data set, or a loader that states its set's size (device-resident)
        n = len(loader.dataset) if hasattr(loader, "dataset") else int(loader.dataset_len)
    except (AttributeError, TypeError):  # no length (an iterable data set): size unknown
        n = None
    size = None if n is None else math.ceil(n / max(trainer.world_size, 1)) * collector.dim * \
        feature_bytes(trainer.lightning_module)
    if size is not None and size <= EXACT_NCC_MAX_BYTES:
        return True
    rank_zero_warn(
        f"NC eval pass: {'an unknown size' if size is None else f'{size / 2**30:.2f} GiB'} of "
        f"features per process (limit EXACT_NCC_MAX_BYTES, {EXACT_NCC_MAX_BYTES / 2**30:g} GiB): "
        "its NC4 / NCC values use the previous pass's class means (lagged).")
    return False


def batch_limit(trainer: Trainer, loader: Any) -> int | None:
    """How many of ``loader``'s batches the pass reads: ``--trainer.limit_train_batches`` applied
    to it as Lightning applies it to the training loop (an integer caps the batches, a fraction
    takes that share of them, at least one), so that a quick check (``debug.yaml``: 5 batches)
    does not run the pass over the whole training set. ``None``: all of them."""
    limit = getattr(trainer, "limit_train_batches", 1.0)
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return None
    if isinstance(limit, int):
        return limit
    try:
        return max(1, int(len(loader) * limit))
    except TypeError:  # no length (an iterable data set): the whole pass
        return None


def forward_context(trainer: Trainer, fp32: bool) -> Any:
    """The pass's precision context: autocast off under an autocast precision when ``fp32``,
    else the trainer's own (see the module docstring)."""
    plugin = trainer.precision_plugin
    if fp32 and isinstance(plugin, MixedPrecision):
        return torch.autocast(plugin.device, enabled=False)
    return plugin.forward_context()


@torch.no_grad()
def run_eval_pass(trainer: Trainer, pl_module: LightningModule, collector: NCFeatureStats,
                  buffer_batches: int, fp32: bool = True,
                  listeners: Sequence[EvalPassListener] = ()) -> None:
    """Feed ``collector`` the eval-mode features and logits of every training-eval batch; then,
    when :func:`keeps_features`, count NCC against this pass's own means.

    Args:
        trainer: The running trainer (its data module and precision context).
        pl_module: The module: ``unpack_batch``, ``forward_features`` and ``head.logits``; put
            back in the training mode it had.
        collector: The ``train_eval`` collector.
        buffer_batches: Batches concatenated before one collector update.
        fp32: Float32 features under an autocast precision (see the module docstring).
        listeners: Told the pass's start, each batch's labels before its forward, and its end
            (:mod:`~hug_lightning.metrics.eval_pass_listeners`).
    """
    loader_fn = getattr(trainer.datamodule, "train_eval_dataloader", None)
    if loader_fn is None:
        raise TypeError("--nc.eval_pass true needs a data module with "
                        "train_eval_dataloader(); or set --nc.eval_pass false.")
    loader = loader_fn()
    exact = keeps_features(trainer, collector, loader)
    was_training = pl_module.training
    pl_module.eval()
    for listener in listeners:
        listener.eval_pass_start(trainer, pl_module)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    kept: list[tuple[Tensor, Tensor, Tensor]] = []  # features, labels, predictions

    def flush() -> None:  # fewer, larger collector updates
        features, labels, logits = (torch.cat(t) for t in zip(*pending))
        collector.update(features, labels, logits=None if exact else logits)
        if exact:
            kept.append((features, labels, logits.argmax(dim=-1)))
        pending.clear()

    try:
        for batch in itertools.islice(loader, batch_limit(trainer, loader)):
            # as Lightning's loops do: the precision's input dtype (bf16-true, 64-true)
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            images, labels = unpack_batch_of(pl_module, batch, "The NC eval pass")
            for listener in listeners:
                listener.eval_pass_batch(labels)
            with forward_context(trainer, fp32):
                features = pl_module.forward_features(images)
                logits = pl_module.head.logits(features)
            pending.append((features, labels, logits))
            if len(pending) >= buffer_batches:
                flush()
        if pending:
            flush()
    finally:
        pl_module.train(was_training)
    for listener in listeners:
        listener.eval_pass_end(trainer, pl_module)
    if exact:  # the second sweep: NCC against the means of the features just seen
        collector.set_reference(collector.synced_means(), pivot=False, ncc=True)
        for features, labels, predictions in kept:
            collector.update_ncc(features, labels, predictions)


__all__ = ["EXACT_NCC_MAX_BYTES", "batch_limit", "check_eval_pass_data", "feature_bytes",
           "forward_context", "keeps_features", "run_eval_pass"]
