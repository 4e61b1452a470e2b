"""A fit resumed in place after a kill logs as one uninterrupted run (``resumed_logs.py``).

A run killed without a save (SIGKILL, a lost node) leaves logs past its ``last.ckpt``; the fit
resumed from it logged those steps again: TensorBoard and ``metrics.csv`` had them twice. Here a
callback keeps a copy of ``last.ckpt`` at a point of a whole run, which then goes on (its later
logs are the killed run's); the copy is put back and the fit resumed with ``--ckpt_path last``.
Its TensorBoard view (scalars, figures) and ``metrics.csv`` must be the uninterrupted run's.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from conftest import REPO
from hug_lightning.cli import main


class KeepLast(Callback):
    """Copy the run's ``last.ckpt`` to ``keep.ckpt`` beside the experiment when the batch of
    global step ``step`` (or the epoch ``epoch``, or a validation at ``val_step``) starts."""

    def __init__(self, step: int = -1, epoch: int = -1, val_step: int = -1) -> None:
        self.step, self.epoch, self.val_step = step, epoch, val_step

    def _keep(self, trainer) -> None:  # noqa: ANN001
        run = Path(trainer.loggers[0].log_dir)
        shutil.copy(run / "checkpoints" / "last.ckpt", run.parent / "keep.ckpt")

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.current_epoch == self.epoch:
            self._keep(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            self._keep(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        if trainer.global_step == self.val_step and not trainer.sanity_checking:
            self._keep(trainer)


class TermAt(Callback):
    """SIGTERM to this process once, when the batch of global step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


sys.modules["tests_resumed_logs_callbacks"] = type(sys)("tests_resumed_logs_callbacks")
sys.modules["tests_resumed_logs_callbacks"].KeepLast = KeepLast
sys.modules["tests_resumed_logs_callbacks"].TermAt = TermAt


def _callback(name: str, **init: int) -> tuple[str, str]:
    return ("--trainer.callbacks+", json.dumps(
        {"class_path": f"tests_resumed_logs_callbacks.{name}", "init_args": init}))


def _fit(log: Path, *extra: str) -> Any:
    """The mini-batch UFM (5 steps per epoch, 3 epochs, validation and figures every epoch)
    logging to TensorBoard and CSV in one folder, ``<log>/exp/version_0``; Lightning's
    learning-rate monitor logs when a batch starts. Returns the CLI object."""
    loggers = [{"class_path": f"lightning.pytorch.loggers.{kind}Logger",
                "init_args": {"save_dir": str(log), "name": "exp", **options}}
               for kind, options in (("TensorBoard", {"default_hp_metric": False}), ("CSV", {}))]
    return main(["fit", "--config", str(REPO / "configs" / "ufm_ce.yaml"),
                 "--trainer.logger", json.dumps(loggers),
                 "--model.init_args.backbone.init_args.dim", "8",
                 "--data.init_args.samples_per_class", "4", "--data.init_args.batch_size", "8",
                 "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1",
                 "--trainer.log_every_n_steps", "1", "--nc.figures_every", "1",
                 "--trainer.callbacks+", "lightning.pytorch.callbacks.LearningRateMonitor",
                 *extra])


def _shown(run: Path) -> dict[str, Counter]:
    """What TensorBoard shows of a run folder (its reader drops purged events): the scalars'
    ``(tag, step, value)`` (NaN as a string, equal to itself) and the figures' ``(tag, step)``."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0,
                                                       "histograms": 0})
    events.Reload()
    tags = events.Tags()
    return {"scalars": Counter((tag, e.step, repr(e.value)) for tag in tags["scalars"]
                               for e in events.Scalars(tag)),
            "images": Counter((tag, e.step) for tag in tags["images"]
                              for e in events.Images(tag)),
            "histograms": Counter((tag, e.step) for tag in tags["histograms"]
                                  for e in events.Histograms(tag))}


def _written(run: Path) -> int:
    """How many values (scalars, figures) the run folder's event files hold, purged ones
    included."""
    return sum(len(event.summary.value) for path in run.glob("events.out.tfevents.*")
               for event in EventFileLoader(str(path)).Load())


_CUTS = {  # the fit's options, and where its last.ckpt is kept (the kill comes after)
    "epoch_end": ((), {"epoch": 2}),  # written at epoch 1's end
    "every_3_steps": (("--last.every_n_train_steps", "3"), {"step": 7}),  # at step 6
    "mid_epoch_validations": (("--last.every_n_train_steps", "2",  # at step 6, validations
                               "--trainer.val_check_interval", "0.4"), {"step": 7}),  # at 6, 8
    # killed in epoch 1's validation: its step-10 save (the epoch's last batch) came before it,
    # and a resume from there skipped epoch 1's end (train/acc of epoch 2 counted both epochs);
    # LastCheckpoint writes none there now, and last.ckpt is epoch 0's end
    "every_5_steps_epoch_ends": (("--last.every_n_train_steps", "5"), {"val_step": 10}),
}


@pytest.mark.parametrize("cut", [*_CUTS, "sigterm"])
def test_a_resume_after_a_kill_logs_as_the_uninterrupted_run(tmp_path, cut):
    """Found by an audit: each step after the checkpoint was in TensorBoard and metrics.csv
    twice (over 100 (tag, step) pairs in each case). The resume is exact: values are compared
    exactly: TensorBoard's scalars (and figures) as a multiset, ``metrics.csv`` byte for byte."""
    extra, keep_at = _CUTS.get(cut, ((), {}))
    ref, log = tmp_path / "ref", tmp_path / "cut"
    run = log / "exp" / "version_0"
    _fit(ref, *extra)
    if cut == "sigterm":  # last.ckpt of the stop at step 8; the fit resumed from it is killed
        with pytest.raises(SIGTERMException):
            _fit(log, *_callback("TermAt", step=7))
        shutil.copy(run / "checkpoints" / "last.ckpt", run.parent / "keep.ckpt")
        _fit(log, "--ckpt_path", "last")
    else:
        _fit(log, *extra, *_callback("KeepLast", **keep_at))
    shutil.copy(run.parent / "keep.ckpt", run / "checkpoints" / "last.ckpt")  # the kill
    killed = _rows(run / "metrics.csv")
    _fit(log, *extra, "--ckpt_path", "last")
    reference, resumed = _shown(ref / "exp" / "version_0"), _shown(run)
    assert _written(run) > _written(ref / "exp" / "version_0")  # the killed run's logs are there
    assert resumed["scalars"] == reference["scalars"]
    # the figures of the mid-epoch validations of the resumed epoch too (they draw the training
    # class means the checkpoint holds; they were missing, its training means not saved)
    assert resumed["images"] == reference["images"] != Counter()
    assert resumed["histograms"] == reference["histograms"]
    kept = (run / "metrics.csv").read_bytes()
    assert kept == (ref / "exp" / "version_0" / "metrics.csv").read_bytes()
    # nothing lost: the killed fit's rows from the cut on are set aside, the rest kept
    aside = _rows(run / "metrics.cut-1.csv")
    first = min(int(row["step"]) for row in aside)
    before = [row for row in _rows(run / "metrics.csv") if int(row["step"]) < first]
    assert aside and sorted(map(str, before + aside)) == sorted(map(str, killed))
    assert not (run / "metrics.cut-2.csv").exists()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def test_training_means_are_checkpointed_and_older_checkpoints_load(tmp_path):
    """The figures of a validation inside the epoch a fit resumes in draw the training class
    means of the last compute (not states): missing after a resume, the checkpoint did not hold
    them. Saved now for the training collectors (raw and spherical, as computed); a checkpoint
    without them (older) still loads, with no means until the epoch's end computes them."""
    cli = _fit(tmp_path, "--trainer.max_epochs", "2", "--nc.train", "true")
    monitor = next(cb for cb in cli.trainer.callbacks
                   if type(cb).__name__ == "NeuralCollapseMonitor")
    ckpt = torch.load(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    saved = next(v for k, v in ckpt["callbacks"].items() if "NeuralCollapseMonitor" in k)
    assert set(saved["means"]) == {"train", "train_eval"}  # not val's: nothing reads them later
    for legacy in (False, True):
        state = {k: v for k, v in saved.items() if not (legacy and k == "means")}
        fresh = type(monitor)(train=True, eval_pass=True)
        fresh.load_state_dict(state)
        fresh.setup(cli.trainer, cli.model, "fit")
        for name in ("train", "train_eval"):
            col, ran = fresh.collectors[name], monitor.collectors[name]
            assert col.has_means() is not legacy, (name, legacy)
            if not legacy:
                for spherical in (False, True):
                    assert torch.equal(col.means(spherical), ran.means(spherical)), name


def test_a_resume_from_a_step_save_at_an_epoch_end_warns_and_counts_the_next_epoch(tmp_path):
    """Another ModelCheckpoint's step save at an epoch's last batch (before that epoch's end):
    Lightning resumes it with the next epoch and skips the epoch's end, where the training
    accuracy counts restart; the next epoch's ``train/acc`` counted both epochs (0.525 at step
    14, uninterrupted 0.75). Now it is the uninterrupted run's, and a warning says what else
    is lost (hug_lightning.epoch_end_restart)."""
    steps = ("--trainer.callbacks+", json.dumps({
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "steps"), "every_n_train_steps": 5,
                      "save_top_k": -1, "filename": "{step}"}}))
    _fit(tmp_path / "ref", *steps)
    saved = tmp_path / "steps" / "step=10.ckpt"  # after epoch 1's last batch
    with pytest.warns(UserWarning, match="after epoch 1's last training batch, before its end"):
        _fit(tmp_path / "cut", *steps, "--ckpt_path", str(saved))
    accuracy = [{(step, value) for tag, step, value in _shown(log / "exp" / "version_0")["scalars"]
                 if tag == "train/acc"} for log in (tmp_path / "ref", tmp_path / "cut")]
    assert accuracy[1] == {(step, value) for step, value in accuracy[0] if step >= 10} != set()


def _purges(folder: Path) -> int:
    """The ``SessionLog.START`` events (purges) of a folder's event files."""
    return sum(1 for path in folder.glob("events.out.tfevents.*")
               for event in EventFileLoader(str(path)).Load() if event.HasField("session_log"))


def test_new_runs_and_evaluations_purge_nothing(tmp_path):
    """A fit into a new folder, also from a checkpoint, and an evaluation into a new version
    write no purge; the resume in place writes one."""
    _fit(tmp_path, "--trainer.max_epochs", "1")
    run = tmp_path / "exp" / "version_0"
    _fit(tmp_path, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))  # into version_1
    main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])  # version_2
    assert [_purges(tmp_path / "exp" / f"version_{n}") for n in range(3)] == [0, 0, 0]
    _fit(tmp_path, "--trainer.max_epochs", "4", "--ckpt_path", "last")  # version_1's, in place
    assert _purges(tmp_path / "exp" / "version_1") == 1
