"""A corrupt image met mid-epoch ends ``fit`` with its error and leaves an exact ``last.ckpt``
(hug_lightning.data_error_save): replaced file + ``--ckpt_path last`` = one uninterrupted run."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from conftest import tiny_args
from datagen import write_imagenet_folder
from hug_lightning import cli
from hug_lightning.cli import main
from hug_lightning.data.folders import CorruptImageError
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.data_error_save import save_after_data_error, unresumable
from hug_lightning.experiments.results import read_scalars

NOT_AN_IMAGE = b"\xff\xd8\xff\xe0 not a JPEG" * 4


class CorruptAtEpoch(Callback):
    """Overwrite ``path`` with bytes no decoder reads when training epoch ``epoch`` starts (in
    the epochs before, it was read fine: a copy going bad on a network file system)."""

    def __init__(self, path: str = "", epoch: int = 0) -> None:
        self.path, self.epoch = path, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            Path(self.path).write_bytes(NOT_AN_IMAGE)


sys.modules["tests_data_error_callbacks"] = type(sys)("tests_data_error_callbacks")
sys.modules["tests_data_error_callbacks"].CorruptAtEpoch = CorruptAtEpoch

WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
         "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]  # imagenette
BATCH = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """60 training JPEGs (48 after the validation split: 6 batches of 8), 10 validation."""
    return write_imagenet_folder(tmp_path_factory.mktemp("inet"), WNIDS, train_per_class=6,
                                 val_per_class=1)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> Path:
    """The log folder of the fit that never meets a corrupt image."""
    log = tmp_path_factory.mktemp("ref")
    main(["fit", *_args(root, log)])
    return log


def _logged(log: Path) -> dict:
    scalars = read_scalars(next(log.glob("imagenet100_ce/version_*")))
    return {tag: v for tag, v in scalars.items() if tag.startswith(("val/", "train/loss"))}


def _args(root: Path, log: Path, *extra: str) -> list[str]:
    args = tiny_args(root, log, config="imagenet100_ce")
    i = args.index("--data.init_args.download")
    del args[i:i + 2]  # ImageNet is never downloaded: no such option
    return [*args, "--data.init_args.subset", "imagenette", "--data.init_args.image_size", "32",
            "--data.init_args.resize_size", "36", "--data.init_args.batch_size", str(BATCH),
            "--trainer.deterministic", "true", "--trainer.limit_train_batches", "1.0",
            "--trainer.limit_val_batches", "1.0", "--trainer.max_epochs", "2", *extra]


def _image_of_batch(root: Path, log: Path, epoch: int, batch: int) -> Path:
    """The file of the last sample of training batch ``batch`` of ``epoch`` (this seed)."""
    dm = main(_args(root, log), run=False).datamodule
    dm.setup("fit")
    sampler = EpochShardSampler(dm.train_set, seed=0)  # the configs' seed_everything
    sampler.set_epoch(epoch)
    return dm.train_set.path(int(sampler.shard_indices()[batch * BATCH + BATCH - 1]))


def _last(log: Path) -> Path:
    return next(log.glob("imagenet100_ce/version_*/checkpoints/last.ckpt"))


def _load(log: Path) -> dict:
    return torch.load(_last(log), weights_only=True)


def _fit_failing(args: list[str], console: bool, monkeypatch, capsys) -> str:
    """Run the fit that meets the corrupt image; its error message."""
    if not console:
        with pytest.raises(CorruptImageError) as err:
            main(["fit", *args])
        return str(err.value)
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["hug-lightning", "fit", *args])
    assert cli.console_main() == 1  # one message, no traceback
    return capsys.readouterr().err


@pytest.mark.parametrize("epoch, batch, workers, read_ahead", [
    (0, 2, 0, False),  # in the first epoch, read in the main process
    (1, 3, 2, False),  # in the second, found by a DataLoader worker (re-raised with its class)
    (1, 0, 0, False),  # at an epoch's first batch: the epoch-end save is that state
    (0, 3, 0, True),  # Lightning reading one batch ahead: batch 3 fails while 2 is fetched
])
def test_corrupt_image_mid_epoch_saves_an_exact_last_ckpt(root, reference, tmp_path, monkeypatch,
                                                          capsys, epoch, batch, workers,
                                                          read_ahead):
    """Before, the error stopped fit and everything since the last periodic save was lost.
    With a loader that reads ahead (Lightning's fetcher does for loaders of unknown length) the
    error of batch k comes while batch k - 1 is fetched: k - 1 batches were trained, and the
    checkpoint says so (the resume starts at batch k - 1, which was never trained)."""
    steps = _load(reference)["global_step"]
    victim = _image_of_batch(root, tmp_path / "probe", epoch, batch)
    intact = victim.read_bytes()
    cut = _args(root, tmp_path / "cut", "--data.init_args.num_workers", str(workers))
    corrupt = ("--trainer.callbacks+", "tests_data_error_callbacks.CorruptAtEpoch",
               "--trainer.callbacks.path", str(victim), "--trainer.callbacks.epoch", str(epoch))
    try:
        with monkeypatch.context() as patch:
            if read_ahead:  # no length: Lightning's fetcher prefetches one batch
                patch.setattr("lightning.pytorch.loops.fetchers.sized_len", lambda _: None)
            message = _fit_failing([*cut, *corrupt], workers > 0, patch, capsys)
    finally:
        victim.write_bytes(intact)
    assert str(victim) in message  # still the error that names the bad file
    assert str(_last(tmp_path / "cut")) in message and "--ckpt_path last" in message
    trained = epoch * steps // 2 + batch - read_ahead  # only the batches really trained
    assert _load(tmp_path / "cut")["global_step"] == trained
    saved = tmp_path / "saved.ckpt"
    saved.write_bytes(_last(tmp_path / "cut").read_bytes())
    try:  # the file still corrupt: on_corrupt skip goes on without it
        victim.write_bytes(NOT_AN_IMAGE)
        main(["fit", *_args(root, tmp_path / "skip", "--data.init_args.on_corrupt", "skip"),
              "--ckpt_path", str(saved)])
    finally:
        victim.write_bytes(intact)
    assert _load(tmp_path / "skip")["global_step"] == steps
    main(["fit", *cut, "--ckpt_path", "last"])
    a, b = _load(reference), _load(tmp_path / "cut")
    assert a["global_step"] == b["global_step"] == steps
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert _logged(tmp_path / "cut") == _logged(reference)  # the same values at the same steps


@pytest.mark.parametrize("setting, why", [
    (("--trainer.accumulate_grad_batches", "2"), "accumulation window"),
    (("--trainer.val_check_interval", "0.5"), "mid-epoch validation"),  # after batches 3, 6
])
def test_no_save_where_a_resume_would_not_be_exact(root, tmp_path, setting, why):
    """Batch 3 fails: after batch 3 of a window of 2 (its gradients are not in checkpoints), or
    right after a mid-epoch validation (Lightning's restart would shift the later logged
    steps). Nothing is written and the message says why."""
    victim = _image_of_batch(root, tmp_path / "probe", 0, 3)
    intact = victim.read_bytes()
    try:
        victim.write_bytes(NOT_AN_IMAGE)
        with pytest.raises(CorruptImageError, match=re.escape(str(victim))) as err:
            main(["fit", *_args(root, tmp_path / "cut", *setting)])
    finally:
        victim.write_bytes(intact)
    assert "Nothing saved to" in str(err.value) and why in str(err.value)
    assert not list((tmp_path / "cut").rglob("last.ckpt"))


def test_other_errors_and_ddp_runs_save_nothing(tmp_path):
    """A NaN loss or a bug leaves a state not known to be consistent: no save, the message as
    it was. Under DDP the other processes may be in the next batch's all-reduce: no collective
    save (it would hang), only a message saying so; single-process runs save."""
    saved = []
    callback = SimpleNamespace(trained_this_fit=True, save_top_k=1, dirpath=str(tmp_path),
                               filename="last", FILE_EXTENSION=".ckpt",
                               _last_global_step_saved=0, _save_now=saved.append)
    trainer = SimpleNamespace(world_size=2, current_epoch=1, global_step=9)
    other = RuntimeError("loss is nan")
    save_after_data_error(callback, trainer, other)
    assert str(other) == "loss is nan" and not saved
    assert "DDP" in unresumable(trainer)
    bad = CorruptImageError("Cannot read image file x.JPEG.")
    save_after_data_error(callback, trainer, bad)
    assert not saved and str(bad).startswith("Cannot read image file x.JPEG. Nothing saved to "
                                             f"{tmp_path / 'last.ckpt'}: under DDP")
