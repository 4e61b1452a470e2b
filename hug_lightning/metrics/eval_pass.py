"""The NC eval pass: an eval-mode, non-augmented forward over the training set into a collector.

The canonical neural-collapse protocol of Papyan et al., run by
:class:`~hug_lightning.metrics.callback.NeuralCollapseMonitor` (``eval_pass=True``) at the end of
a training epoch: the training images with the evaluation transform (the data module's
``train_eval_dataloader()``), the model in eval mode, features and logits fed to the
``train_eval`` collector in a few large updates.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from hug_lightning.metrics.collapse import NCFeatureStats


def check_eval_pass_data(trainer: Trainer) -> None:
    """Before the first epoch (the data module is set up first): the eval pass needs the
    training images with the evaluation transform; failing at the end of epoch 0 lost it."""
    data = trainer.datamodule
    loader_fn = getattr(data, "train_eval_dataloader", None)
    missing = loader_fn is None or getattr(data, "train_eval_set", True) is None
    if missing:
        raise TypeError(
            f"--nc.eval_pass true needs the training images with the evaluation transform: "
            f"{type(data).__name__} must provide train_eval_dataloader() (a "
            "hug_lightning ClassificationDataModule: set self.train_eval_set in "
            "build_datasets). Or set --nc.eval_pass false.")


@torch.no_grad()
def run_eval_pass(trainer: Trainer, pl_module: LightningModule, collector: NCFeatureStats,
                  buffer_batches: int) -> None:
    """Feed ``collector`` the eval-mode features and logits of every training-eval batch.

    Args:
        trainer: The running trainer (its data module and precision context).
        pl_module: The module: ``forward_features`` and ``head.logits``; put back in the
            training mode it had.
        collector: The ``train_eval`` collector.
        buffer_batches: Batches concatenated before one collector update.
    """
    loader_fn = getattr(trainer.datamodule, "train_eval_dataloader", None)
    if loader_fn is None:
        raise TypeError("--nc.eval_pass true needs a data module with "
                        "train_eval_dataloader(); or set --nc.eval_pass false.")
    was_training = pl_module.training
    pl_module.eval()
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    try:
        for batch in loader_fn():
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            with trainer.precision_plugin.forward_context():
                features = pl_module.forward_features(batch[0])
                logits = pl_module.head.logits(features)
            pending.append((features, batch[1], logits))
            if len(pending) >= buffer_batches:  # fewer, larger collector updates
                collector.update(*(torch.cat(t) for t in zip(*pending)))
                pending = []
        if pending:
            collector.update(*(torch.cat(t) for t in zip(*pending)))
    finally:
        pl_module.train(was_training)


__all__ = ["check_eval_pass_data", "run_eval_pass"]
