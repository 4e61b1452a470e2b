"""Resumed = uninterrupted, where earlier tests did not look: the UFM's mini-batch order, the
loaders' checks of a resumed checkpoint (device-resident loader, a schedule sized by the
trainer)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import REPO, tiny_args
from datagen import CIFAR10_CLASSES, write_image_folder
from hug_lightning.cli import main
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.experiments.results import read_scalars


class TermAt(Callback):
    """SIGTERM to this process once, at the start of the batch of global step ``step``."""

    def __init__(self, step: int = 7) -> None:
        self.step, self.sent = step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


sys.modules["tests_resume_callbacks"] = type(sys)("tests_resume_callbacks")
sys.modules["tests_resume_callbacks"].TermAt = TermAt
_TERM_AT_7 = ("--trainer.callbacks+", "tests_resume_callbacks.TermAt")


def _ufm(log: Path, *extra: str) -> list[str]:
    """A small mini-batch UFM run (40 samples, batches of 8: 5 steps per epoch)."""
    return ["fit", "--config", str(REPO / "configs" / "ufm_ce.yaml"),
            "--trainer.logger.init_args.save_dir", str(log),
            "--model.init_args.backbone.init_args.dim", "8",
            "--data.init_args.samples_per_class", "4", "--data.init_args.batch_size", "8",
            "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1",
            "--trainer.log_every_n_steps", "1", "--nc.figures_every", "0", *extra]


def _final(log: Path) -> dict:
    ckpt = next(log.glob("ufm_ce/version_0/checkpoints/last.ckpt"))
    return torch.load(ckpt, weights_only=True)


def _assert_one_run(ref: Path, cut: Path) -> None:
    a, b = _final(ref), _final(cut)
    assert a["global_step"] == b["global_step"] == 15
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    logged = [{tag: values for tag, values in read_scalars(log / "ufm_ce" / "version_0").items()
               if not tag.startswith("hp/")} for log in (ref, cut)]
    assert "train/loss" in logged[0] and logged[0] == logged[1]


@pytest.mark.parametrize("mid_epoch, max_steps", [(False, []), (True, []),
                                                   (False, ["--trainer.max_steps", "1000"]),
                                                   (True, ["--trainer.max_steps", "1000"])])
def test_ufm_mini_batch_resume_is_exact(tmp_path, mid_epoch, max_steps):
    """Found by an audit: the mini-batch UFM shuffled with one generator made per fit and
    advanced by each epoch, so a resumed fit replayed epoch 0's order in epoch k (and a
    mid-epoch resume restarted the epoch with another order). With ``max_steps`` set (not
    reached), Lightning took the resume from an epoch's end for a restart inside it: 11 steps
    instead of 15, the epoch's end run twice (see hug_lightning.max_steps_resume)."""
    main(_ufm(tmp_path / "ref", *max_steps))
    if mid_epoch:  # interrupted at step 7 (inside epoch 1)
        with pytest.raises(SIGTERMException):
            main(_ufm(tmp_path / "cut", *max_steps, *_TERM_AT_7))
    else:  # fit 1 epoch, then resume to 3
        main(_ufm(tmp_path / "cut", *max_steps, "--trainer.max_epochs", "1"))
    main(_ufm(tmp_path / "cut", *max_steps, "--ckpt_path", "last"))
    _assert_one_run(tmp_path / "ref", tmp_path / "cut")


@pytest.mark.parametrize("cut", [["--trainer.max_epochs", "1", "--trainer.max_steps", "15"],
                                 ["--trainer.max_epochs", "-1", "--trainer.max_steps", "5"]])
def test_ufm_resume_of_a_fit_bounded_by_max_steps_alone_is_exact(tmp_path, cut):
    """``max_epochs -1 --trainer.max_steps 15``, cut at the end of epoch 1 (step 5) by
    ``max_epochs`` or by ``max_steps`` (Lightning issue #19617: the resume ran the epoch's end
    again after one more batch, and every later epoch a batch off), resumed."""
    steps = ("--trainer.max_epochs", "-1", "--trainer.max_steps", "15")
    main(_ufm(tmp_path / "ref", *steps))
    main(_ufm(tmp_path / "cut", *cut))
    main(_ufm(tmp_path / "cut", *steps, "--ckpt_path", "last"))
    _assert_one_run(tmp_path / "ref", tmp_path / "cut")


def _device_loader(batch_size: int, next_batch: int) -> DeviceBatchLoader:
    images, labels = torch.zeros(16, 3, 32, 32, dtype=torch.uint8), torch.arange(16) % 4
    return DeviceBatchLoader(images, labels, batch_size, (0, 0, 0), (1, 1, 1), "cpu",
                             sampler=EpochShardSampler(labels, seed=0),
                             next_batch_fn=lambda: next_batch)


def test_device_loader_refuses_a_mid_epoch_resume_with_another_batch_size():
    """Found by an audit: the CPU loader refused it, the device-resident one took the rest of
    the epoch at the new batch size's offset (samples repeated or skipped, silently)."""
    state = _device_loader(4, 0).state_dict()
    _device_loader(4, 2).load_state_dict(state)  # same size: fine
    _device_loader(8, 0).load_state_dict(state)  # saved at an epoch end: fine
    with pytest.raises(ValueError, match="batch_size 4 per process; this run uses 8"):
        _device_loader(8, 1).load_state_dict(state)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("resume"), CIFAR10_CLASSES,
                              train_per_class=10, test_per_class=3)


@pytest.mark.parametrize("device_resident", ["false", "true"])
def test_loader_checks_run_with_a_schedule_sized_by_the_trainer(small_root, tmp_path,
                                                                 device_resident):
    """Found by an audit: with the shipped configs' OneCycleLR, whose length comes from
    ``trainer.estimated_stepping_batches``, Lightning set the training data up before it
    restored the checkpoint and never gave the loaders their saved states (Lightning issue
    #20550): a mid-epoch resume at another batch size or with another seed went on silently."""
    def fit(*extra: str) -> None:
        main(["fit", *tiny_args(small_root, tmp_path, "--trainer.limit_train_batches", "1.0",
                                "--data.init_args.device_resident", device_resident,
                                "--data.init_args.batch_size", "16", *extra)])

    fit("--trainer.max_steps", "2", "--last.every_n_train_steps", "1")  # inside epoch 0
    with pytest.raises(ValueError, match="batch_size 16 per process; this run uses 8"):
        fit("--data.init_args.batch_size", "8", "--ckpt_path", "last")
    with pytest.raises(ValueError, match="used seed 0, this run uses 1"):
        fit("--seed_everything", "1", "--ckpt_path", "last")


def _every_write(run: Path) -> dict[str, list[int]]:
    """The steps of every scalar write of a run folder, all event files, duplicates kept
    (TensorBoard's reader would hide them)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps: dict[str, list[int]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value") or value.HasField("tensor"):
                    steps.setdefault(value.tag, []).append(int(event.step))
    return steps


def test_a_resume_in_place_writes_each_step_once(tmp_path):
    """Found by an audit: a fit resumed into its own folder declared the HPARAMS metrics
    again, a second (NaN) ``hp/val_acc_best`` and ``hp/test_acc`` at step 0 after the run's
    later values (the HPARAMS tab shows NaN for the run until its next validation)."""
    main(_ufm(tmp_path / "ref"))
    with pytest.raises(SIGTERMException):
        main(_ufm(tmp_path / "cut", *_TERM_AT_7))
    main(_ufm(tmp_path / "cut", "--ckpt_path", "last"))
    ref, cut = (_every_write(log / "ufm_ce" / "version_0") for log in (tmp_path / "ref",
                                                                       tmp_path / "cut"))
    assert ref["hp/val_acc_best"][0] == 0 and cut == ref


def test_a_test_after_a_fit_in_one_trainer_keeps_the_hparams_tab_values(tmp_path):
    """Found in review: ``trainer.fit(...)`` then ``trainer.test(...)`` (one trainer, one log
    folder) declared the HPARAMS metrics again at test start: NaN ``hp/val_acc_best`` and
    ``hp/nc1_pinv`` at step 0 after the fit's values, which the tab (last value) then shows."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from hug_lightning.heads import CrossEntropyHead
    from hug_lightning.metrics.callback import NeuralCollapseMonitor
    from hug_lightning.module import ClassifierModule
    from hug_lightning.ufm import FreeFeatures, UFMDataModule

    data = UFMDataModule(num_classes=4, samples_per_class=4)
    model = ClassifierModule(backbone=FreeFeatures(dim=8), head=CrossEntropyHead)
    trainer = Trainer(accelerator="cpu", max_epochs=2, log_every_n_steps=1,
                      logger=TensorBoardLogger(tmp_path, default_hp_metric=False),
                      callbacks=[NeuralCollapseMonitor()], enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    writes = _every_write(tmp_path / "lightning_logs" / "version_0")
    assert writes["hp/val_acc_best"] == [0, 0, 1] and writes["hp/nc1_pinv"] == [0, 0, 1]
    assert writes["hp/test_acc"] == [0, 2]  # declared once (NaN), then the test's value


# mode max on a loss that falls every epoch: each epoch after the first is a bad one, so the
# schedule reduces on a known beat (patience 1, cooldown 1: after epochs 2 and 5)
_PLATEAU = ('{"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau", "init_args": '
            '{"mode": "max", "patience": 1, "cooldown": 1, "factor": 0.5}}')


def _plateau_run(log: Path, *extra: str) -> list[str]:
    return _ufm(log, "--model.init_args.scheduler", _PLATEAU, "--trainer.max_epochs", "4",
                "--model.init_args.scheduler_monitor", "val/loss",
                "--model.init_args.optimizer.init_args.lr", "0.5", *extra)


def _reference_plateau(values: list[float], lr: float) -> tuple[list[float], dict]:
    """The learning rate of each epoch and the final state of torch's ReduceLROnPlateau rule
    (mode max, relative threshold 1e-4, patience 1, cooldown 1, factor 0.5), written out."""
    best, bad, cooldown, lrs = -float("inf"), 0, 0, []
    for value in values:
        lrs.append(lr)
        if value > best * (1 + 1e-4):
            best, bad = value, 0
        else:
            bad += 1
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        if bad > 1:
            lr, cooldown, bad = lr * 0.5, 1, 0
    return lrs, {"best": best, "num_bad_epochs": bad, "cooldown_counter": cooldown,
                 "_last_lr": [lr, lr]}


@pytest.mark.parametrize("cut", ["epoch_end", "mid_epoch", "after_last_validation"])
def test_reduce_on_plateau_resume_is_exact(tmp_path, cut):
    """Found in the README's known limits: Lightning steps a plateau schedule after the epoch's
    last.ckpt and never at the end of an epoch a fit resumed inside, so each resume dropped
    one step (2 epochs + a resume to 4 halved the rate after the third epoch, not the second).
    A fit cut at an epoch end, by SIGTERM inside an epoch, or resumed from the `checkpoint`
    group's file written after the last batch's validation (5 validations per epoch) must
    follow the uninterrupted fit's rates, scheduler state and weights."""
    extra = (("--trainer.val_check_interval", "0.2", "--checkpoint.save_top_k", "-1",
              "--checkpoint.filename", "e{epoch}-s{step}")
             if cut == "after_last_validation" else ())
    ref, resumed = tmp_path / "ref", tmp_path / "cut"
    main(_plateau_run(ref, *extra))
    if cut == "epoch_end":
        main(_plateau_run(resumed, "--trainer.max_epochs", "2"))
        main(_plateau_run(resumed, "--ckpt_path", "last"))
    elif cut == "mid_epoch":  # SIGTERM at step 7, inside epoch 1
        with pytest.raises(SIGTERMException):
            main(_plateau_run(resumed, *_TERM_AT_7))
        main(_plateau_run(resumed, "--ckpt_path", "last"))
    else:  # written after epoch 1's last validation, before its epoch end
        saved = next(ref.glob("ufm_ce/version_0/checkpoints/e1-s10.ckpt"))
        main(_plateau_run(resumed, *extra, "--ckpt_path", str(saved)))
    logged = [read_scalars(log / "ufm_ce" / "version_0") for log in (ref, resumed)]
    epoch_ends = [value for step, value in logged[0]["val/loss"] if step % 5 == 4]
    lrs, state = _reference_plateau(epoch_ends, 0.5)
    assert lrs == [0.5, 0.5, 0.5, 0.25]  # the beat above (val/loss fell every epoch)
    assert [value for _, value in logged[0]["train/lr"]][::5] == lrs
    assert logged[1]["train/lr"] == logged[0]["train/lr"][-len(logged[1]["train/lr"]):]
    a, b = _final(ref), _final(resumed)
    assert a["global_step"] == b["global_step"] == 20
    assert {key: a["lr_schedulers"][0][key] for key in state} == state
    assert a["lr_schedulers"][0] == b["lr_schedulers"][0]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
