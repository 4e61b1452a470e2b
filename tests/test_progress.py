"""ThrottledProgressBar: fewer redraws, the same bar; the command's choice of progress bar."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_args
from hug_lightning.backbones import SmallConvNet
from hug_lightning.cli import main
from hug_lightning.heads import CrossEntropyHead
from hug_lightning.module import ClassifierModule
from hug_lightning.progress import ThrottledProgressBar

BATCHES = 10


class BarCounts(Callback):
    """The count the train and validation bars show after each batch."""

    def __init__(self, bar: TQDMProgressBar) -> None:
        self.bar, self.train, self.val = bar, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append(self.bar.train_progress_bar.n)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if not trainer.sanity_checking:
            self.val.append(self.bar.val_progress_bar.n)


def _fit(bar: TQDMProgressBar, tmp_path, *callbacks: Callback) -> BarCounts:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * BATCHES, 3, 8, 8, generator=g),
                         torch.arange(8 * BATCHES) % 3)
    counts = BarCounts(bar)
    module = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead,
                              num_classes=3)
    trainer = Trainer(accelerator="cpu", max_epochs=1, callbacks=[bar, counts, *callbacks],
                      logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=2,
                      default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert trainer.progress_bar_metrics["train/loss"] > 0  # the values reach the bar
    return counts


def test_frozen_clock_draws_first_and_last_batch_only(tmp_path):
    bar = ThrottledProgressBar(min_interval_s=0.1)
    bar._clock = lambda: 100.0
    counts = _fit(bar, tmp_path)
    assert counts.train == [1] * (BATCHES - 1) + [BATCHES]
    assert counts.val == [1] * (BATCHES - 1) + [BATCHES]


def test_zero_interval_draws_every_batch_like_lightnings_bar(tmp_path):
    throttled = _fit(ThrottledProgressBar(min_interval_s=0.0), tmp_path / "a")
    lightning = _fit(TQDMProgressBar(), tmp_path / "b")
    assert throttled.train == lightning.train == list(range(1, BATCHES + 1))
    assert throttled.val == lightning.val == list(range(1, BATCHES + 1))


class BatchClock(Callback):
    """A clock that reads ``seconds`` per batch (the batch index times it): a steady step."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.now = seconds, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.now = batch_idx * self.seconds

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.now = batch_idx * self.seconds


def test_refresh_rate_and_interval_together_still_draw(tmp_path):
    """Found by an audit: with ``refresh_rate: 2`` and batches half the interval long, the
    interval's slot fell on every odd batch, which ``refresh_rate`` does not draw, so the bar
    stood still until the last batch. Batches the interval lets through are now counted among
    those ``refresh_rate`` draws: here every drawable batch is an interval apart, as
    Lightning's bar draws them."""
    clock = BatchClock(0.0625)  # binary fractions: exact intervals
    bar = ThrottledProgressBar(min_interval_s=0.125, refresh_rate=2)
    bar._clock = lambda: clock.now
    throttled = _fit(bar, tmp_path / "a", clock)
    lightning = _fit(TQDMProgressBar(refresh_rate=2), tmp_path / "b")
    assert throttled.train == lightning.train == [0, 2, 2, 4, 4, 6, 6, 8, 8, 10]
    assert throttled.val == lightning.val


def test_negative_interval_is_refused():
    with pytest.raises(ValueError, match="min_interval_s"):
        ThrottledProgressBar(min_interval_s=-1)


@pytest.mark.parametrize("extra, expected", [
    ((), ThrottledProgressBar),
    (("--trainer.callbacks+=TQDMProgressBar", "--trainer.callbacks.refresh_rate=5"),
     TQDMProgressBar),
    (("--trainer.enable_progress_bar", "false"), None),
])
def test_the_command_uses_the_throttled_bar_unless_told_otherwise(
        extra, expected, cifar10_folder_root, tmp_path):
    args = [a for a in tiny_args(cifar10_folder_root, tmp_path)]
    at = args.index("--trainer.enable_progress_bar")
    del args[at:at + 2]  # tiny_args turns the bar off
    cli = main([*args, *extra], run=False)
    bars = [c for c in cli.trainer.callbacks if isinstance(c, TQDMProgressBar)]
    if expected is None:
        assert bars == [] and cli.trainer.progress_bar_callback is None
    else:
        assert [type(b) for b in bars] == [expected]
        assert cli.trainer.progress_bar_callback is bars[0]
    if expected is TQDMProgressBar:
        assert bars[0].refresh_rate == 5


class FailsAt(ClassifierModule):
    """Raises in the training step of batch ``FAILS_AT`` (0-based) of the first epoch."""

    def training_step(self, batch, batch_idx):
        if batch_idx == FAILS_AT:
            raise RuntimeError("failed on purpose")
        return super().training_step(batch, batch_idx)


FAILS_AT = 6


@pytest.mark.parametrize("bar_class", [ThrottledProgressBar, TQDMProgressBar])
def test_a_fit_ended_by_an_exception_closes_its_bars(tmp_path, capsys, bar_class):
    """Found by an audit: a stray ``Epoch 0:  86%| 6/7`` after a test run's summary. Lightning's
    bar (the reference here) closes its bars only at a loop's normal end, so a fit ended by an
    exception left its training bar open, drawn again when collected, and the traceback began
    on its line. Ours closes it there: its line (6 of 7 batches) ends before the traceback."""
    import tqdm

    data = TensorDataset(torch.randn(8 * (FAILS_AT + 1), 3, 8, 8), torch.arange(8 * 7) % 3)
    bar = bar_class(min_interval_s=0) if bar_class is ThrottledProgressBar else bar_class()
    trainer = Trainer(accelerator="cpu", max_epochs=1, callbacks=[bar], logger=False,
                      enable_checkpointing=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    module = FailsAt(backbone=SmallConvNet(width=4), head=CrossEntropyHead, num_classes=3)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        trainer.fit(module, DataLoader(data, batch_size=8))
    train = bar.train_progress_bar
    assert (train.n, train.total) == (FAILS_AT, FAILS_AT + 1)
    closed = train not in tqdm.tqdm._instances
    out = capsys.readouterr().out
    if bar_class is TQDMProgressBar:  # the defect, in Lightning's own bar
        assert not closed and not out.endswith("\n")
        train.close()
        return
    assert closed and train.disable
    assert out.endswith("\n") and f"{FAILS_AT}/{FAILS_AT + 1}" in out.splitlines()[-1]
