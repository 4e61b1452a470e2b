"""The schedule lasts exactly the run, under each trainer flag that changes the run's length.

The learning rate each optimizer step uses is read just before the step and compared with a
closed form written here; the number of steps (or epochs) the schedule spans is worked out here
from the flags, not taken from Lightning.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader, TensorDataset

from _models import LinearBackbone
from hug_lightning.heads import CrossEntropyHead
from hug_lightning.module import ClassifierModule
from hug_lightning.optim import OneCycleLR, WarmupCosineLR

K, N, BATCH, LR = 3, 12, 2, 0.5  # 6 batches per epoch
WARMUP, START, LOW = 1, 0.1, 0.05


class StepRates(Callback):
    """(epoch, learning rate of the first group) of every optimizer step, read before it."""

    def __init__(self) -> None:
        self.rates: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rates.append((trainer.current_epoch, optimizer.param_groups[0]["lr"]))


def factor(t: int, total: int) -> float:
    """WarmupCosineLR(warmup=1, start_factor=0.1, min_factor=0.05) after ``t`` of ``total``."""
    if t < WARMUP:
        return START + (1 - START) * t / WARMUP
    return LOW + (1 - LOW) * 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (total - WARMUP)))


def _fit(tmp_path, scheduler, interval="step", samples=N, drop_last=False, **flags):
    torch.manual_seed(0)
    x = torch.randn(samples, K)
    data = DataLoader(TensorDataset(x, torch.arange(samples) % K), batch_size=BATCH,
                      drop_last=drop_last)
    module = ClassifierModule(backbone=LinearBackbone(K), head=CrossEntropyHead, num_classes=K,
                              optimizer=lambda p: torch.optim.SGD(p, lr=LR),
                              scheduler=scheduler, scheduler_interval=interval)
    rates = StepRates()
    options = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                   default_root_dir=str(tmp_path), callbacks=[rates])
    options.update(flags)
    trainer = Trainer(**options)
    trainer.fit(module, data)
    return trainer, rates.rates


def _warmup_cosine(optimizer):
    return WarmupCosineLR(optimizer, warmup=WARMUP, start_factor=START, min_factor=LOW)


# (trainer flags, optimizer steps of the run): 6 batches of 2 per epoch unless said otherwise
STEP_RUNS = [
    ({}, 12),
    ({"accumulate_grad_batches": 4}, 4),  # ceil(6 / 4) = 2 steps per epoch
    ({"limit_train_batches": 3}, 6),
    ({"limit_train_batches": 0.5}, 6),
    ({"max_steps": 5}, 5),
    ({"max_steps": 5, "max_epochs": -1}, 5),
    ({"samples": 11, "drop_last": True}, 10),  # 5 full batches per epoch
    ({"samples": 11}, 12),  # the short last batch is a step too
]


@pytest.mark.parametrize("flags, steps", STEP_RUNS)
def test_per_step_schedule_spans_the_run(tmp_path, flags, steps):
    trainer, rates = _fit(tmp_path, _warmup_cosine, **flags)
    assert trainer.global_step == steps == len(rates)
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == steps
    assert [lr for _, lr in rates] == pytest.approx(
        [LR * factor(t, steps) for t in range(steps)], rel=1e-9)


@pytest.mark.parametrize("flags, steps", STEP_RUNS[:5])
def test_one_cycle_ends_on_the_last_step(tmp_path, flags, steps):
    """The last step uses the schedule's final rate (peak / (div_factor * final_div_factor))."""
    trainer, rates = _fit(tmp_path, OneCycleLR, **flags)
    assert len(rates) == steps
    assert rates[-1][1] == pytest.approx(LR / (25.0 * 1e4), rel=1e-9)
    assert max(lr for _, lr in rates) <= LR


# (trainer flags, epochs the run trains): max_steps may end the run before max_epochs
EPOCH_RUNS = [
    ({"max_epochs": 3}, 3),
    ({"max_epochs": 4, "max_steps": 8}, 2),  # 6 steps per epoch: the 8th is in epoch 2 of 4
    ({"max_epochs": -1, "max_steps": 8}, 2),
    ({"max_epochs": 5, "max_steps": 3, "accumulate_grad_batches": 4}, 2),  # 2 steps per epoch
]


@pytest.mark.parametrize("flags, epochs", EPOCH_RUNS)
def test_per_epoch_schedule_spans_the_epochs_that_train(tmp_path, flags, epochs):
    """scheduler_interval=epoch: a schedule as long as max_epochs never decayed in a run that
    max_steps ended first (and with max_epochs unset it was an error)."""
    trainer, rates = _fit(tmp_path, _warmup_cosine, interval="epoch", **flags)
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == epochs
    assert rates[-1][0] == epochs - 1
    assert [lr for _, lr in rates] == pytest.approx(
        [LR * factor(epoch, epochs) for epoch, _ in rates], rel=1e-9)
    trainer, rates = _fit(tmp_path, OneCycleLR, interval="epoch", **flags)
    assert rates[-1][1] == pytest.approx(LR / (25.0 * 1e4), rel=1e-9)
