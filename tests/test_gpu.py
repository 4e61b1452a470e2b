"""GPU-only checks: no host synchronisation per training step, device batches equal CPU batches.

A ``.item()``, a pageable host-to-device copy or a data-dependent shape in the step makes the
CPU wait for the GPU every step, so the host can no longer queue work ahead and every microsecond
of Python (Lightning's hooks included) adds to the step time. These tests run the real training
loop under ``torch.cuda.set_sync_debug_mode`` and list every synchronising call site. They are
skipped without a GPU (CI has none); ``bench/gpu_session.sh`` runs them on the lent GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import load_bench
from hug_lightning.backbones import SmallConvNet
from hug_lightning.data.cifar import CIFAR10DataModule
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.metrics.callback import NeuralCollapseMonitor
from hug_lightning.module import ClassifierModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MEAN, STD = CIFAR10DataModule.mean, CIFAR10DataModule.std


def _data(n: int = 1024, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, k, (n,), generator=gen))


class _SyncRecorder(Callback):
    """Sync debug mode "warn" from the start of batch ``first`` to the end of batch ``last``."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.sites: list[str] = []
        self._ctx = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.first:
            self._ctx = warnings.catch_warnings(record=True)
            self._log = self._ctx.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.last and self._ctx is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.sites = [f"{w.filename}:{w.lineno}" for w in self._log
                          if "synchroniz" in str(w.message)]
            self._ctx.__exit__(None, None, None)
            self._ctx = None


def test_sync_detection_catches_a_pageable_copy():
    """The detector used below sees what the old per-batch normalization did every step."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.tensor([0.5, 0.25], device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_device_batches_equal_cpu_batches():
    images, labels = _data()
    batches = []
    for device in ("cpu", "cuda"):
        sampler = EpochShardSampler(labels, 1, 0, shuffle=True, seed=3)
        sampler.set_epoch(2)
        loader = DeviceBatchLoader(images, labels, 128, MEAN, STD, device, sampler=sampler,
                                   augment=True, drop_last=True)
        batches.append([(x.cpu(), y.cpu()) for x, y in loader])
    for (xc, yc), (xg, yg) in zip(*batches, strict=True):
        assert torch.equal(yc, yg)
        assert torch.allclose(xc, xg, atol=1e-6)


def test_device_loader_batches_do_not_synchronize():
    images, labels = _data()
    sampler = EpochShardSampler(labels, 1, 0, shuffle=True, seed=0)
    loader = DeviceBatchLoader(images, labels, 128, MEAN, STD, "cuda", sampler=sampler,
                               augment=True, drop_last=True)
    it = iter(loader)
    next(it)  # the epoch's index copy happens here, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            next(it)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Losses(Callback):
    """Each batch's loss, kept on the device, by the step Lightning logs it at."""

    def __init__(self) -> None:
        self.by_step: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.by_step[trainer.global_step - 1] = outputs["loss"].detach().clone()


@pytest.mark.parametrize("head", ["ce", "hug"])
def test_training_steps_do_not_synchronize(head):
    """Steps 3-10 of a bf16 fit with the NC collectors on, logging every 2 steps with the
    progress bar shown: no synchronising call at all, and the logged losses (copied to the host
    behind an event) are the steps' losses."""
    from test_step_log import RecordingLogger

    torch.manual_seed(0)
    factory = (CrossEntropyHead if head == "ce"
               else lambda k, d: HUGHead(k, d, alpha=1.0, beta=4.0, intra_power=2))
    model = ClassifierModule(backbone=SmallConvNet(width=16), head=factory, channels_last=True)
    images, labels = _data()
    data = load_bench("train_bench").TensorCIFAR(images, labels, batch_size=64, drop_last=True,
                                                 num_workers=0, device_resident=True)
    recorder, losses, logger = _SyncRecorder(first=3, last=10), _Losses(), RecordingLogger()
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=12,
                      limit_val_batches=0, num_sanity_val_steps=0, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=True,
                      enable_model_summary=False, log_every_n_steps=2,
                      callbacks=[recorder, losses,
                                 NeuralCollapseMonitor(val=False, buffer_batches=2)])
    trainer.fit(model, datamodule=data)
    assert recorder.sites == [], f"host synchronisations in the training step: {recorder.sites}"
    logged = {step: value for step, key, value in logger.records if key == "train/loss"}
    assert sorted(logged) == [1, 3, 5, 7, 9, 11]
    for step, value in logged.items():
        assert value == pytest.approx(float(losses.by_step[step]), rel=1e-6), step
    assert trainer.progress_bar_metrics["train/loss"] == pytest.approx(logged[11], rel=1e-6)


def test_cli_fit_steps_do_not_synchronize(cifar10_folder_root, tmp_path):
    """``hug-lightning fit`` with the shipped GPU preset, device-resident data and every
    default callback of the command (progress bar, checkpoints, NC monitor, calibration,
    interrupt handling), logging every 2 steps: steps 3-10 have no synchronising call."""
    from conftest import REPO, tiny_args
    from hug_lightning.cli import main

    cli = main(tiny_args(cifar10_folder_root, tmp_path,
                         "--config", str(REPO / "configs" / "gpu.yaml"),
                         "--data.init_args.device_resident", "true",
                         "--data.init_args.batch_size", "4",
                         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "14",
                         "--trainer.log_every_n_steps", "2",
                         "--trainer.enable_progress_bar", "true"), run=False)
    recorder = _SyncRecorder(first=3, last=10)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 14
    assert recorder.sites == [], f"host synchronisations in the training step: {recorder.sites}"
