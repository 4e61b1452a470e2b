"""Step values when the device is behind the host (``hug_lightning.step_log``).

On a GPU the host usually runs a step or more ahead, so StepLog's copies complete later than
the step that logged them. ``FakeEvent`` makes that the rule on the CPU: a copy completes only
when waited for. Every reader must still see what ``self.log`` would show it (the reference,
``LoggedByLightning``, from ``test_step_log.py``).
"""

from __future__ import annotations

import pytest
from lightning.pytorch import Callback

from hug_lightning.heads import CrossEntropyHead
from hug_lightning.module import ClassifierModule
from test_step_log import LoggedByLightning, RecordingLogger, _fit


class FakeEvent:
    """A copy the device never finishes before the host waits for it (a GPU far behind)."""

    def __init__(self) -> None:
        self.waited = False

    def query(self) -> bool:
        return self.waited

    def synchronize(self) -> None:
        self.waited = True


def _behind(module) -> None:
    module.step_log._to_host = lambda vector: (vector.clone(), FakeEvent())


class Pending(Callback):
    def __init__(self) -> None:
        self.counts = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(len(pl_module.step_log._pending))


def test_values_wait_for_the_device_and_land_at_their_steps(tmp_path):
    """Copies never ready before the epoch's end: they queue up (logged at batches 3 and 6 of
    7) and are written then, at their own steps, with the values self.log gives."""
    ours, ref, pending = RecordingLogger(), RecordingLogger(), Pending()
    _fit(ClassifierModule, CrossEntropyHead, ours, tmp_path / "a", prepare=_behind,
         max_epochs=1, callbacks=[pending])
    _fit(LoggedByLightning, CrossEntropyHead, ref, tmp_path / "b", max_epochs=1)
    assert pending.counts == [0, 0, 1, 1, 1, 2, 2]
    got, want = ours.train_step_records(), ref.train_step_records()
    assert [r[:2] for r in got] == [r[:2] for r in want] and {r[0] for r in got} == {2, 5}
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], rel=1e-6)


def test_a_callback_monitoring_a_step_value_gets_it_in_the_same_batch(tmp_path):
    """ModelCheckpoint(monitor="train/loss", every_n_train_steps=3) reads callback_metrics
    right after the logged batch: the value is waited for there (nothing left pending), and
    the best score is the lowest logged loss."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    logger, pending = RecordingLogger(), Pending()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss", mode="min",
                           every_n_train_steps=3, save_top_k=1)
    _fit(ClassifierModule, CrossEntropyHead, logger, tmp_path, prepare=_behind, max_epochs=1,
         enable_checkpointing=True, callbacks=[pending, ckpt])
    assert pending.counts == [0] * 7
    losses = [v for _, k, v in logger.records if k == "train/loss"]
    assert len(losses) == 2
    assert float(ckpt.best_model_score) == pytest.approx(min(losses), rel=1e-6)


class ReadAtValidationEnd(Callback):
    """``train/loss`` as callbacks see it at the end of each validation and training epoch."""

    def __init__(self) -> None:
        self.seen = []

    def on_validation_end(self, trainer, pl_module):
        self.seen.append(("val", trainer.progress_bar_metrics.get("train/loss"),
                          float(trainer.callback_metrics.get("train/loss", -1))))

    def on_train_epoch_end(self, trainer, pl_module):  # before the module's own hook
        self.seen.append(("epoch", trainer.progress_bar_metrics.get("train/loss")))


def test_a_validation_sees_the_last_logged_values(tmp_path):
    """Found by an audit: with the device behind, the validations of a fit (mid-epoch, every
    half epoch here, and at the epoch's end) and the callbacks' epoch-end hooks, the progress
    bar's among them, saw the values of an earlier logged step (none in the first epoch);
    self.log gives them the last one. They are written when validation starts."""
    ours, ref = ReadAtValidationEnd(), ReadAtValidationEnd()
    _fit(ClassifierModule, CrossEntropyHead, RecordingLogger(), tmp_path / "a", prepare=_behind,
         callbacks=[ours], val_check_interval=0.5)
    _fit(LoggedByLightning, CrossEntropyHead, RecordingLogger(), tmp_path / "b",
         callbacks=[ref], val_check_interval=0.5)
    assert [s[0] for s in ref.seen] == ["val", "val", "epoch"] * 2
    assert None not in [s[1] for s in ref.seen]
    assert [s[0] for s in ours.seen] == [s[0] for s in ref.seen]
    assert [v for s in ours.seen for v in s[1:]] == pytest.approx(
        [v for s in ref.seen for v in s[1:]], rel=1e-6)


def test_without_validation_the_epoch_end_hooks_see_the_last_logged_values(tmp_path):
    """The callbacks' epoch-end hooks (the progress bar's final line among them) run before
    the module's; with no validation and the device behind they saw an earlier step's values.
    The last batch of an epoch writes them."""
    ours, ref = ReadAtValidationEnd(), ReadAtValidationEnd()
    _fit(ClassifierModule, CrossEntropyHead, RecordingLogger(), tmp_path / "a", prepare=_behind,
         callbacks=[ours], limit_val_batches=0)
    _fit(LoggedByLightning, CrossEntropyHead, RecordingLogger(), tmp_path / "b",
         callbacks=[ref], limit_val_batches=0)
    assert [s[0] for s in ref.seen] == ["epoch"] * 2 and None not in [s[1] for s in ref.seen]
    assert [s[1] for s in ours.seen] == pytest.approx([s[1] for s in ref.seen], rel=1e-6)


class SigtermAt(Callback):
    """What a SIGTERM does to ``interrupt`` at the start of training batch ``batch``."""

    def __init__(self, interrupt, batch: int) -> None:
        self.interrupt, self.batch = interrupt, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch:
            import signal
            self.interrupt._on_signal(signal.SIGTERM, None)


@pytest.mark.parametrize("module_cls", [ClassifierModule, LoggedByLightning])
def test_an_interrupt_writes_the_values_still_on_their_way(module_cls, tmp_path):
    """Found by an audit: SIGTERM after batch 5 (logged at batches 2 and 5): the stop saves
    last.ckpt to resume from, and the values of the device still behind were dropped, a gap
    in the run's logs that the resumed run does not fill. They are written at the stop, as
    self.log writes them."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from hug_lightning.interrupt import InterruptCheckpoint

    logger, interrupt = RecordingLogger(), InterruptCheckpoint()
    with pytest.raises(SIGTERMException):
        _fit(module_cls, CrossEntropyHead, logger, tmp_path, prepare=_behind, max_epochs=1,
             enable_progress_bar=False,  # Lightning's bar stays open after an exception: a
             # stray "Epoch 0: 86% 6/7" line after pytest's summary (not what is tested here)
             enable_checkpointing=True, callbacks=[
                 interrupt, SigtermAt(interrupt, 5), ModelCheckpoint(dirpath=tmp_path / "ck")])
    assert (tmp_path / "ck" / "last.ckpt").is_file()
    assert sorted(s for s, k, _ in logger.records if k == "train/loss") == [2, 5]
