"""A subclass of ClassifierModule returning callbacks from ``configure_callbacks`` (Lightning's
own extension point) keeps the CLI's: the ``checkpoint`` group's best on val/acc, last.ckpt
written after every checkpoint decision, one progress bar (hug_lightning.model_callbacks).

Found by tiny CLI fits of such subclasses: Lightning's attach removed the group's
ModelCheckpoint, ran the model's after LastCheckpoint (last.ckpt held its state one epoch
old: a resume left a file it no longer knew of; in-process ckpt_path="best" loaded last.ckpt;
a SLURM requeue in an epoch's last batch saved before its decision) and left two progress
bars drawing.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import (Callback, EarlyStopping, LearningRateMonitor,
                                         ModelCheckpoint, ProgressBar, TQDMProgressBar)

from _slurm_helpers import requeue_and_restore
from conftest import REPO
from hug_lightning.checkpointing import LastCheckpoint
from hug_lightning.cli import main
from hug_lightning.interrupt import InterruptCheckpoint
from hug_lightning.model_callbacks import checkpoint_order, merge_model_callbacks
from hug_lightning.module import ClassifierModule
from hug_lightning.slurm_requeue import _last_checkpoint_hook

# as Lightning 2.6 writes it (copied from a run's last.ckpt)
ON_LOSS = ("ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None}")


class WithCheckpoint(ClassifierModule):
    """Lightning's example: a ModelCheckpoint on val/loss and an EarlyStopping of its own."""

    def configure_callbacks(self):
        return [ModelCheckpoint(monitor="val/loss", mode="min", filename="loss-{epoch}"),
                EarlyStopping(monitor="val/loss", patience=100), LearningRateMonitor()]


class WithBar(ClassifierModule):
    def configure_callbacks(self):
        return TQDMProgressBar(refresh_rate=5)


def _args(log: Path, epochs: int, *extra: str, model: str = "WithCheckpoint") -> list[str]:
    return ["--config", "ufm_ce", "--trainer.logger.init_args.save_dir", str(log),
            "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", "1",
            "--data.init_args.num_classes", "4", "--data.init_args.samples_per_class", "8",
            "--data.init_args.steps_per_epoch", "2", "--model.init_args.backbone.init_args.dim",
            "8", "--nc.enabled", "false", "--trainer.enable_model_summary", "false",
            "--model.class_path", f"{__name__}.{model}", *extra]


def _files(log: Path) -> list[str]:
    return sorted(p.name for p in log.glob("*/version_0/checkpoints/*.ckpt"))


def test_the_models_checkpoint_adds_to_the_groups(tmp_path):
    """The group's best on val/acc is kept and stays "best" (in process and --ckpt_path best),
    the model's ModelCheckpoint saves its own file, LastCheckpoint runs last: last.ckpt records
    the model's callback's final decision, and SLURM's requeue save waits for it."""
    cli = main(["fit", *_args(tmp_path, 3)])
    trainer = cli.trainer
    group, mine, last = trainer.checkpoint_callbacks
    assert (type(group), group.monitor, mine.monitor) == (ModelCheckpoint, "val/acc", "val/loss")
    assert isinstance(last, LastCheckpoint) and _last_checkpoint_hook(trainer)
    assert any(isinstance(c, EarlyStopping) for c in trainer.callbacks)
    assert any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks)
    assert sum(isinstance(c, InterruptCheckpoint) for c in trainer.callbacks) == 1
    assert Path(group.best_model_path).is_file() and Path(mine.best_model_path).is_file()
    recorded = torch.load(last.best_model_path, weights_only=True)["callbacks"][ON_LOSS]
    assert recorded["best_model_path"] == mine.best_model_path  # not one epoch old
    assert recorded["best_model_score"] == mine.best_model_score
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == group.best_model_path
    cli = main(["test", *_args(tmp_path, 3), "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == group.best_model_path


def test_a_resume_from_last_is_the_uninterrupted_run(tmp_path):
    """2 epochs, then ``--ckpt_path last`` to 3: the model's ModelCheckpoint ends with the
    uninterrupted run's best and files (with its state one epoch old in last.ckpt, the resumed
    one kept a file of epoch 1 it no longer knew of, against save_top_k=1)."""
    ref = main(["fit", *_args(tmp_path / "ref", 3)]).trainer.checkpoint_callbacks[1]
    main(["fit", *_args(tmp_path / "cut", 2)])
    cut = main(["fit", *_args(tmp_path / "cut", 3), "--ckpt_path", "last"])
    mine = cut.trainer.checkpoint_callbacks[1]
    assert mine.monitor == "val/loss"
    assert Path(mine.best_model_path).name == Path(ref.best_model_path).name
    assert float(mine.best_model_score) == float(ref.best_model_score)
    assert _files(tmp_path / "cut") == _files(tmp_path / "ref")


def test_the_models_progress_bar_replaces_the_clis(tmp_path):
    """One bar, the model's (the CLI's ThrottledProgressBar is no parent class of it: Lightning
    left both, every line drawn twice)."""
    cli = main(["fit", *_args(tmp_path, 1, "--trainer.enable_progress_bar", "true",
                              model="WithBar")])
    bars = [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is TQDMProgressBar and bars[0].refresh_rate == 5


def test_no_progress_bar_when_the_trainers_is_off(tmp_path, capsys):
    """``--trainer.enable_progress_bar false``: no bar (the model's drew, found by an audit);
    Lightning itself rejects a bar in ``trainer.callbacks`` with it."""
    cli = main(["fit", *_args(tmp_path, 1, "--trainer.enable_progress_bar", "false",
                              model="WithBar")])
    assert not [c for c in cli.trainer.callbacks if isinstance(c, ProgressBar)]
    assert cli.trainer.progress_bar_callback is None
    drawn = capsys.readouterr()
    assert "Epoch 0" not in drawn.out + drawn.err  # what TQDMProgressBar draws


def test_the_groups_settings_replace_it_and_the_order_is_kept():
    """Without a fit: a ModelCheckpoint of the model's with the group's state key replaces it
    (one state per key); a group that keeps no file comes after the model's; LastCheckpoint
    last; other callbacks keep their order."""
    group, other, last = ModelCheckpoint(monitor="val/acc", mode="max"), Callback(), \
        LastCheckpoint()
    before = [other, last]  # the group hidden from Lightning's attach
    same = ModelCheckpoint(monitor="val/acc", mode="max", filename="mine")
    assert merge_model_callbacks(before, [other, last, same], group) == [other, same, last]
    mine = ModelCheckpoint(monitor="val/loss")
    # the replacement takes the group's place, first, also after one of the model's (it was
    # left second: trainer.checkpoint_callback, in-process "best", was the val/loss one)
    assert merge_model_callbacks(before, [other, last, mine, same], group) == [other, same, mine,
                                                                               last]
    assert merge_model_callbacks(before, [other, last, mine], group) == [other, group, mine,
                                                                         last]
    quiet = ModelCheckpoint(monitor="val/acc", mode="max", save_top_k=0)
    assert checkpoint_order([last, quiet, other, mine], quiet) == [other, mine, quiet, last]
    assert merge_model_callbacks([other, group, last], [other, group, last], None) == \
        [other, group, last]  # nothing returned, nothing hidden: unchanged



def test_the_trainer_still_pickles(tmp_path):
    """Found by a review: the attach wrapper was a closure, so the CLI's trainer no longer
    pickled (``Can't pickle local object 'keep_template_callbacks.<locals>...'``): a
    ``ddp_spawn`` fit failed before its processes started, and ``torch.save`` of the module
    (its optimizer factory reaches the CLI) failed. A trainer sent to another process attaches
    the model's callbacks as the original does."""
    cli = main(["fit", *_args(tmp_path, 1)])
    torch.save(cli.model, tmp_path / "module.pt")
    sent = pickle.loads(pickle.dumps(cli.trainer))
    sent._callback_connector._attach_model_callbacks()  # as a spawned process's fit does
    assert [(type(c), c.monitor) for c in sent.checkpoint_callbacks] == \
        [(ModelCheckpoint, "val/acc"), (ModelCheckpoint, "val/loss"), (LastCheckpoint, None)]


@pytest.mark.slow
def test_a_ddp_spawn_fit_runs(tmp_path):
    """The same fit on 2 ``ddp_spawn`` processes (the trainer pickled to each) ends with the
    checkpoint files of one process's fit."""
    main(["fit", *_args(tmp_path / "one", 2)])
    path = os.pathsep.join([str(Path(__file__).parent), str(REPO)])  # this file's models
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-m", "hug_lightning", "fit",
                           *_args(tmp_path / "two", 2, "--trainer.devices", "2",
                                  "--trainer.strategy", "ddp_spawn")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _files(tmp_path / "two") == _files(tmp_path / "one") != []


MODEL = '''
from lightning.pytorch.callbacks import ModelCheckpoint

from hug_lightning.module import ClassifierModule


class WithCheckpoint(ClassifierModule):
    def configure_callbacks(self):
        return [ModelCheckpoint(monitor="val/loss", mode="min", filename="loss-{epoch}")]
'''


def _recorded(run: Path) -> dict[str, tuple[str, float | None]]:
    """Each ModelCheckpoint state's best file name and score that ``run``'s last.ckpt records."""
    state = torch.load(next(run.rglob("last.ckpt")), weights_only=True)["callbacks"]
    return {k: (Path(v["best_model_path"]).name, None if v["best_model_score"] is None
                else float(v["best_model_score"]))
            for k, v in state.items() if k.startswith("ModelCheckpoint")}


@pytest.mark.slow
def test_a_slurm_requeue_at_an_epochs_end_keeps_the_models_decision(tmp_path):
    """SIGUSR1 in an epoch's last batch: the requeue save waits for the epoch's checkpoint
    decisions (LastCheckpoint's hook, which slurm_requeue looks for last). With the model's
    ModelCheckpoint run after LastCheckpoint it was written before them: the run restored from
    it ended with other best files than the uninterrupted run."""
    (tmp_path / "slurm_model.py").write_text(MODEL)
    model = ("--model.class_path", "slurm_model.WithCheckpoint")
    requeue_and_restore(tmp_path, ["--data.init_args.steps_per_epoch", "3", *model], "ValLog",
                        "val", step=2, final_step=6, resumed=model)
    ref, res = _recorded(tmp_path / "ref"), _recorded(tmp_path / "res")
    assert ON_LOSS in ref and len(ref) == 2  # the group's and the model's
    assert res == ref
