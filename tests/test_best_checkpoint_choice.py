"""``--ckpt_path best`` (and the grid runner's best) with more ``ModelCheckpoint`` callbacks than
the CLI's ``checkpoint`` group: the group's best file, not the first one recorded.

Lightning records the user's ``trainer.callbacks`` before the CLI's groups, and "best" was the
first ``ModelCheckpoint`` state in ``last.ckpt``: a callback on ``val/loss`` or one saving
every N steps made ``test --ckpt_path best`` evaluate its file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hug_lightning.checkpointing import LastCheckpoint
from hug_lightning.cli import main
from hug_lightning.experiments import runner
from hug_lightning.recorded_best import (AmbiguousBestError, checkpoint_state_key,
                                         choose_recorded_best, recorded_best_checkpoint)
from hug_lightning.run_folders import resolve_evaluated

# state keys as Lightning 2.6 writes them (copied from a run's last.ckpt)
SHIPPED = ("ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None}")
ON_LOSS = ("ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0, "
           "'every_n_epochs': 1, 'train_time_interval': None}")
EVERY_STEP = ("ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 1, "
              "'every_n_epochs': 0, 'train_time_interval': None}")


def _run(tmp_path: Path, states: dict[str, tuple[str | None, str]]) -> Path:
    """``<tmp>/exp/version_0/checkpoints/last.ckpt`` (the newest file) recording
    ``{key: (monitor, file)}`` in this order (the user's first), the files created (an empty
    name: none saved)."""
    ckpts = tmp_path / "exp" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    last = ckpts / "last.ckpt"
    callbacks = {"LastCheckpoint": {"monitor": None, "best_model_path": str(last)}}
    for key, (monitor, name) in states.items():
        if name:
            torch.save({}, ckpts / name)
        callbacks[key] = {"monitor": monitor, "best_model_path": str(ckpts / name) if name else ""}
    torch.save({"callbacks": callbacks}, last)
    newest = last.stat().st_mtime + 10  # --ckpt_path best reads the newest checkpoint
    os.utime(last, (newest, newest))
    return last


def test_the_shipped_key_is_lightnings():
    assert checkpoint_state_key() == SHIPPED
    assert checkpoint_state_key({"monitor": "val/loss", "mode": "min"}) == ON_LOSS


@pytest.mark.parametrize("user", [ON_LOSS, EVERY_STEP])
def test_best_is_the_checkpoint_groups_not_the_first_recorded(tmp_path, user):
    monitor = "val/loss" if user == ON_LOSS else None
    last = _run(tmp_path, {user: (monitor, "mine.ckpt"), SHIPPED: ("val/acc", "acc.ckpt")})
    assert recorded_best_checkpoint(last) == last.parent / "acc.ckpt"
    assert runner.best_checkpoint(last.parent) == last.parent / "acc.ckpt"  # the grid runner
    # the group configured on val/loss (its key given): its own file
    if user == ON_LOSS:
        assert choose_recorded_best(last, ON_LOSS) == (last.parent / "mine.ckpt", ON_LOSS)


def test_without_the_groups_file_the_only_monitored_one_and_a_note(tmp_path, capsys):
    """The group saved nothing (``--checkpoint.save_top_k 0``): the only other monitored
    state is used (a step callback is not a "best"), and the CLI says which."""
    last = _run(tmp_path, {EVERY_STEP: (None, "step.ckpt"), ON_LOSS: ("val/loss", "loss.ckpt"),
                           SHIPPED: ("val/acc", "")})
    assert choose_recorded_best(last) == (last.parent / "loss.ckpt", ON_LOSS)
    cfg = {"ckpt_path": "best"}
    resolve_evaluated(cfg, {"save_dir": str(tmp_path), "name": "exp"}, "best")
    assert cfg["ckpt_path"] == str(last.parent / "loss.ckpt")
    assert "the only other monitored one: " + ON_LOSS in capsys.readouterr().err
    _run(tmp_path / "b", {EVERY_STEP: (None, "step.ckpt"), SHIPPED: ("val/acc", "")})
    with pytest.raises(FileNotFoundError, match="records no best checkpoint"):
        resolve_evaluated({}, {"save_dir": str(tmp_path / "b"), "name": "exp"}, "best")


def test_several_monitored_and_none_the_groups_is_an_error_naming_them(tmp_path):
    on_top5 = ON_LOSS.replace("val/loss", "val/top5").replace("'min'", "'max'")
    last = _run(tmp_path, {ON_LOSS: ("val/loss", "loss.ckpt"), on_top5: ("val/top5", "t5.ckpt"),
                           SHIPPED: ("val/acc", "")})
    with pytest.raises(AmbiguousBestError) as err:
        resolve_evaluated({}, {"save_dir": str(tmp_path), "name": "exp"}, "best")
    message = str(err.value)
    assert message.startswith("--ckpt_path best: ") and "--ckpt_path <file>" in message
    assert str(last.parent / "loss.ckpt") in message and str(last.parent / "t5.ckpt") in message


def _fit_args(tmp_path: Path) -> list[str]:
    """A tiny UFM fit with a ModelCheckpoint on val/loss and one every step of the user's."""
    mine = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"monitor": "val/loss", "mode": "min", "filename": "loss-{epoch}"}},
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"every_n_train_steps": 1, "filename": "step-{step}"}}]
    return ["--config", "ufm_ce", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_epochs", "3", "--trainer.check_val_every_n_epoch", "1",
            "--data.init_args.num_classes", "4", "--data.init_args.samples_per_class", "8",
            "--data.init_args.steps_per_epoch", "2", "--model.init_args.backbone.init_args.dim",
            "8", "--nc.enabled", "false", "--trainer.callbacks", json.dumps(mine)]


def test_cli_best_with_callbacks_of_the_users_own(tmp_path):
    """End to end: a fit with a ModelCheckpoint on val/loss and one every step before the
    shipped one; ``test --ckpt_path best`` in a new CLI evaluates the shipped one's best."""
    args = _fit_args(tmp_path)
    cli = main(["fit", *args])
    shipped = [c for c in cli.trainer.checkpoint_callbacks if c.monitor == "val/acc"]
    assert len(shipped) == 1
    cli = main(["test", *args, "--ckpt_path", "best"])
    assert cli.trainer.ckpt_path == shipped[0].best_model_path


def test_in_process_best_is_the_groups(tmp_path):
    """Found by an audit: in a notebook, ``cli.trainer.test(ckpt_path="best")`` after
    ``main(["fit", ...])`` loaded Lightning's first ModelCheckpoint's file, the user's (on
    val/loss), not the group's best on val/acc that ``--ckpt_path best`` evaluates."""
    cli = main(["fit", *_fit_args(tmp_path)])
    last = next(tmp_path.glob("*/version_0/checkpoints/last.ckpt"))
    recorded = torch.load(last, weights_only=True)["callbacks"][SHIPPED]["best_model_path"]
    mine = [c.best_model_path for c in cli.trainer.checkpoint_callbacks if c.monitor is None
            or c.monitor == "val/loss"]
    assert Path(recorded).is_file() and recorded not in mine  # another file than the user's
    assert cli.trainer.checkpoint_callback.best_model_path == recorded
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    assert cli.trainer.ckpt_path == recorded
    assert isinstance(cli.trainer.checkpoint_callbacks[-1], LastCheckpoint)  # still the last


def test_in_process_best_without_the_groups_file_is_the_clis_too(tmp_path):
    """The group keeps no file (``--checkpoint.save_top_k 0``): it is not put first, and the
    in-process "best" is the file ``test --ckpt_path best`` takes (the only other monitored
    one), not Lightning's error that no best model was saved."""
    args = [*_fit_args(tmp_path), "--checkpoint.save_top_k", "0"]
    cli = main(["fit", *args])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
    in_process = cli.trainer.ckpt_path
    assert Path(in_process).name.startswith("loss-")  # the user's on val/loss
    assert main(["test", *args, "--ckpt_path", "best"]).trainer.ckpt_path == in_process
