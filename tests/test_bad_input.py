"""Bad input gets one clear error that says what to do."""

from __future__ import annotations

import shutil
from urllib.error import URLError

import pytest
import torch

from conftest import tiny_args
from datagen import CIFAR10_CLASSES, write_cifar10_torchvision, write_image_folder
from hug_lightning.cli import main
from hug_lightning.data import CIFAR10DataModule, DataNotFoundError
from hug_lightning.data.folders import CorruptImageError
from hug_lightning.guards import check_labels
from hug_lightning.module import ClassifierModule
from hug_lightning.backbones import SmallConvNet


def _assert_layout_help(message: str, root, downloading: bool = False) -> None:
    assert str(root.resolve()) in message
    assert "cifar-10-batches-py" in message and "train" in message and "test" in message
    assert "--data.init_args.root" in message
    # the download flag is suggested only when it is off
    assert ("--data.init_args.download" in message) != downloading


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_root_offline(tmp_path, make_dir):
    root = tmp_path / "nothing_here"
    if make_dir:
        root.mkdir()
    dm = CIFAR10DataModule(root=str(root), download=False)
    with pytest.raises(DataNotFoundError) as err:
        dm.prepare_data()
    _assert_layout_help(str(err.value), root)


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    root = tmp_path / "cifar"
    with pytest.raises(DataNotFoundError) as err:
        CIFAR10DataModule(root=str(root), download=True).prepare_data()
    _assert_layout_help(str(err.value), root, downloading=True)
    assert "download failed" in str(err.value) and "name resolution" in str(err.value)
    assert "without network, copy the data into that folder" in str(err.value)


def test_missing_root_through_the_cli(tmp_path):
    with pytest.raises(DataNotFoundError, match="Accepted layouts"):
        main(["fit", *tiny_args(tmp_path / "absent", tmp_path)])


def test_label_outside_num_classes_in_the_files(tmp_path, no_checksum):
    root = write_cifar10_torchvision(tmp_path, train_per_class=2, test_per_class=1,
                                     label_offset=1)  # labels 1..10 for a 10-class set
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0)
    with pytest.raises(ValueError, match=r"Label 10 .*cifar-10-batches-py.*outside \[0, 10\)"):
        dm.setup("fit")


def test_label_outside_num_classes_in_a_batch():
    with pytest.raises(ValueError, match=r"label 12 is outside \[0, 10\)"):
        check_labels(torch.tensor([0, 3, 12]), 10, "train")
    model = ClassifierModule(backbone=SmallConvNet(width=4), num_classes=5)
    with pytest.raises(ValueError, match="outside"):
        model.step((torch.randn(2, 3, 32, 32), torch.tensor([1, 7])), "train")


def test_unreadable_image_names_the_file(tmp_path):
    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=2,
                              test_per_class=1)
    victim = sorted((root / "train" / "cat").iterdir())[0]
    victim.write_bytes(b"this is not an image")
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0)
    with pytest.raises(CorruptImageError) as err:
        dm.setup("fit")
    assert str(victim) in str(err.value) and "on_corrupt" in str(err.value)
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0, on_corrupt="skip")
    dm.setup("fit")
    assert len(dm.train_set) == 10 * 2 - 1


def test_wrong_number_of_class_folders(tmp_path):
    root = write_image_folder(tmp_path / "c7", CIFAR10_CLASSES[:7], train_per_class=1,
                              test_per_class=1)
    with pytest.raises(DataNotFoundError, match="holds 7 class folders"):
        CIFAR10DataModule(root=str(root), download=False, val_split=0).setup("fit")
    logs = tmp_path / "logs"
    with pytest.raises(DataNotFoundError, match="holds 7 class folders"):  # in prepare_data:
        main(["fit", *tiny_args(root, logs)])
    assert not list(logs.rglob("version_*"))  # before Lightning creates the run folder


def test_renamed_test_class_folder_is_an_error_not_shifted_labels(tmp_path):
    """Labels are the sorted folder names: test/car instead of test/automobile would give the
    test images of 'bird' label 1 ('automobile' in training), silently."""
    root = write_image_folder(tmp_path / "renamed", CIFAR10_CLASSES, train_per_class=1,
                              test_per_class=1)
    (root / "test" / "automobile").rename(root / "test" / "car")
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0)
    message = r"differ \(only in train: automobile; only in test: car\)"
    with pytest.raises(DataNotFoundError, match=message):
        dm.prepare_data()
    with pytest.raises(DataNotFoundError, match=message):
        dm.setup("test")


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_of_cifar_layout_is_an_error(tmp_path, split):
    root = write_image_folder(tmp_path / "empty", CIFAR10_CLASSES, train_per_class=2,
                              test_per_class=1)
    for f in (root / split / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match=rf"1 class folder\(s\) of .*{split} hold no "
                                                r"image files \(cat\)"):
        CIFAR10DataModule(root=str(root), download=False, val_split=0).setup("fit")


def test_data_module_set_up_for_test_then_fit(tmp_path):
    """Lightning calls setup('test') then setup('fit') on one module when a script tests
    before it trains: the training set must be built then (it was not)."""
    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=2,
                              test_per_class=1)
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0)
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 10
    dm.setup("fit")
    assert len(dm.train_set) == 20 and dm.val_dataloader() is not None
    built = dm.train_set
    dm.setup("test")
    dm.setup("validate")
    assert dm.train_set is built  # built once


@pytest.mark.parametrize("download", [True, False])
def test_root_inside_torchvision_folder_is_an_error_not_a_nested_download(tmp_path, download,
                                                                         monkeypatch):
    root = write_cifar10_torchvision(tmp_path, train_per_class=1, test_per_class=1)
    inner = root / "cifar-10-batches-py"
    monkeypatch.setattr(CIFAR10DataModule.tv_class, "download",
                        lambda self: pytest.fail("must not download"))
    with pytest.raises(DataNotFoundError, match="points into torchvision's folder") as err:
        CIFAR10DataModule(root=str(inner), download=download).prepare_data()
    assert str(root.resolve()) in str(err.value)
    assert not (inner / "cifar-10-batches-py").exists()


def test_incomplete_torchvision_folder(tmp_path):
    root = write_cifar10_torchvision(tmp_path, train_per_class=1, test_per_class=1)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFoundError, match="incomplete or corrupted"):
        CIFAR10DataModule(root=str(root), download=False).setup("fit")
    shutil.rmtree(root / "cifar-10-batches-py")


def test_bad_hyperparameters():
    from hug_lightning.data.splits import split_indices

    with pytest.raises(ValueError, match="batch_size"):
        CIFAR10DataModule(batch_size=0)
    with pytest.raises(ValueError, match="val_split"):
        split_indices(100, 1.5, 0)
    with pytest.raises(ValueError, match="val_split"):
        split_indices(100, 100, 0)
    with pytest.raises(ValueError, match="embedding_dim"):
        ClassifierModule(backbone=SmallConvNet(width=4), embedding_dim=0)
    with pytest.raises(TypeError, match="num_features"):
        ClassifierModule(backbone=torch.nn.Linear(3, 4))


@pytest.mark.parametrize("val_split", [True, -1, -0.5, 1.0, 1.5, "0.1"])
def test_val_split_no_data_set_can_take_is_rejected_by_the_constructor(tmp_path, val_split):
    """Before anything is loaded (the CLI's one-line 'invalid configuration' error)."""
    from hug_lightning.data import ImageNetSubsetDataModule, CIFAR10LTDataModule

    for cls in (CIFAR10DataModule, CIFAR10LTDataModule, ImageNetSubsetDataModule):
        with pytest.raises((TypeError, ValueError), match="val_split"):
            cls(root=str(tmp_path), val_split=val_split)


def test_val_split_larger_than_the_data_is_one_line_from_the_console(tmp_path, no_checksum,
                                                                      monkeypatch, capsys):
    """A count the generated training set (20 images) cannot give: exit status 2 and the flag
    to change, not a traceback from inside setup()."""
    from hug_lightning import cli

    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    root = write_cifar10_torchvision(tmp_path / "data", train_per_class=2, test_per_class=1)
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", *tiny_args(
        root, tmp_path / "logs", "--data.init_args.val_split", "500")])
    assert cli.console_main() == 2
    err = capsys.readouterr().err
    assert err.startswith("hug-lightning: error: val_split=500 asks for 500 of the 20 training "
                          "samples (--data.init_args.val_split)"), err


def test_rejected_value_is_one_line_from_the_console(tmp_path):
    """A value a constructor rejects: exit status 2 and the reason, not a traceback followed by
    a dump of the whole configuration."""
    import subprocess
    import sys

    from conftest import REPO
    proc = subprocess.run(
        [sys.executable, "-m", "hug_lightning", "fit", "--config", "ufm_hug",
         "--model.init_args.head.init_args.alpha", "-0.1",
         "--trainer.logger.init_args.save_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "invalid configuration: HUG: alpha and beta must be finite and >= 0" in proc.stderr
    assert "Traceback" not in proc.stderr and "Given value" not in proc.stderr
    assert not list(tmp_path.rglob("version_*"))  # nothing started, no run folder
    from hug_lightning.cli import ConfigError
    with pytest.raises(ConfigError, match="unknown NC metric"):  # Python: an exception
        main(["fit", "--config", "ufm_hug", "--nc.metrics", "[nc9]",
              "--trainer.logger.init_args.save_dir", str(tmp_path)])


def test_worker_error_is_reduced_to_its_message():
    """DataLoader workers re-raise with the worker's whole traceback as the message."""
    from torch._utils import ExceptionWrapper

    from hug_lightning.cli_errors import one_message
    try:
        raise CorruptImageError("Cannot read image file x.JPEG: truncated. Replace it.")
    except CorruptImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 3")
    with pytest.raises(CorruptImageError) as err:
        wrapped.reraise()
    assert "Traceback" in str(err.value)
    assert one_message(err.value) == ("Cannot read image file x.JPEG: truncated. Replace it. "
                                      "(CorruptImageError in DataLoader worker process 3)")
    assert one_message(ValueError("plain\ntwo lines")) == "plain\ntwo lines"


def _console(monkeypatch, capsys, args) -> tuple[int, str]:
    from hug_lightning.cli import console_main

    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["hug-lightning", *args])
    status = console_main()
    return status, capsys.readouterr().err


def test_bad_data_files_are_one_message_from_the_console(tmp_path, monkeypatch, capsys,
                                                         no_checksum):
    """A corrupt image (decoded at setup, or in a DataLoader worker) and a label out of range
    in the files: exit status 1 and the message that names the file, no traceback."""
    from datagen import write_imagenet_folder

    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=2,
                              test_per_class=1)
    victim = sorted((root / "train" / "cat").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated
    run = ["fit", *tiny_args(root, tmp_path / "logs", "--trainer.fast_dev_run", "true")]
    status, err = _console(monkeypatch, capsys, run)
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith(f"hug-lightning: error: Cannot read image file {victim}")

    labels = write_cifar10_torchvision(tmp_path / "tv", train_per_class=2, test_per_class=1,
                                       label_offset=1)
    run = ["fit", *tiny_args(labels, tmp_path / "logs", "--trainer.fast_dev_run", "true")]
    status, err = _console(monkeypatch, capsys, run)
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith("hug-lightning: error: Label 10 (sample ")

    wnids = ["n00000001", "n00000002"]
    inet = write_imagenet_folder(tmp_path / "inet", wnids, train_per_class=2, val_per_class=1)
    victim = sorted((inet / "train" / wnids[1]).iterdir())[0]
    victim.write_bytes(b"not a JPEG")
    (tmp_path / "classes.txt").write_text("\n".join(wnids) + "\n")
    run = ["fit", "--config", "imagenet100_ce", "--config", "debug",
           "--data.init_args.root", str(inet), "--data.init_args.subset",
           str(tmp_path / "classes.txt"), "--data.init_args.num_workers", "1",
           "--data.init_args.image_size", "16", "--data.init_args.resize_size", "16",
           "--data.init_args.batch_size", "4",
           "--model.init_args.backbone", '{"class_path": "hug_lightning.backbones.SmallConvNet", '
                                         '"init_args": {"width": 4}}',
           "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
           "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"]
    status, err = _console(monkeypatch, capsys, run)
    assert status == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith(f"hug-lightning: error: Cannot read image file {victim}")
    assert "(CorruptImageError in DataLoader worker process 0)" in err


def test_eval_batch_size_is_checked():
    """0 became the training batch size without a word; -5 failed in torch's sampler at the
    first validation."""
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"eval_batch_size must be positive.*got {bad}"):
            CIFAR10DataModule(eval_batch_size=bad)
    assert CIFAR10DataModule(batch_size=16).eval_batch_size == 16


@pytest.mark.parametrize("device_resident", [False, True])
def test_drop_last_leaving_no_training_batch_is_an_error(cifar10_folder_root, device_resident):
    """With fewer training samples than batch_size, drop_last left 0 batches: the scheduler
    then failed on 0 total steps, telling to set max_epochs (it was set)."""
    from hug_lightning.cli import ConfigError
    dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.5,
                           batch_size=101, drop_last=True, num_workers=0, pin_memory=False,
                           device_resident=device_resident)
    dm.setup("fit")
    with pytest.raises(ConfigError, match="leaves no training batch: the training set has 100 "
                                          r"samples \(100 per process\)"):
        dm.train_dataloader()
    dm.batch_size = 100
    assert len(dm.train_dataloader()) == 1
    dm.batch_size, dm.drop_last = 101, False
    assert len(dm.train_dataloader()) == 1


def test_partially_extracted_folder_says_so(tmp_path):
    """An archive cut short leaves a class folder with fewer images (the run went on without a
    word; long-tailed CIFAR then took that class as n_max) or the last class folders absent."""
    from hug_lightning.data import CIFAR10LTDataModule

    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=4,
                              test_per_class=1)
    for f in sorted((root / "train" / "truck").iterdir())[1:]:
        f.unlink()
    for module, extra in ((CIFAR10DataModule, {}),
                          (CIFAR10LTDataModule, {"imbalance_ratio": 1})):
        with pytest.warns(UserWarning, match=r"train hold unequal numbers of images \(truck: 1; "
                                             r"the others 4\), where CIFAR-10 has as many"
                                             r".*partial extraction"):
            module(root=str(root), download=False, val_split=0, **extra).setup("fit")
    shutil.rmtree(root / "train" / "truck")
    with pytest.raises(DataNotFoundError, match="holds 9 class folders.*partial extraction"):
        CIFAR10DataModule(root=str(root), download=False).prepare_data()


def test_balanced_folders_do_not_warn(cifar10_folder_root, recwarn):
    CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0).setup("fit")
    assert not [w for w in recwarn if "unequal" in str(w.message)]


@pytest.mark.parametrize("flag, value, reason", [
    ("lr", "-1", "Invalid learning rate: -1.0"),  # torch.optim.SGD's own messages
    ("momentum", "-0.5", "Invalid momentum value: -0.5"),
])
def test_a_value_the_optimizer_rejects_is_one_line_before_any_work(
        tmp_path, no_checksum, monkeypatch, capsys, flag, value, reason):
    """The optimizer checks its arguments only when it is built, in configure_optimizers: the
    data were read and the run folder made by then, and the command ended with a traceback
    (exit status 1). The model's constructor now builds it once: exit status 2, one line."""
    import functools

    from hug_lightning import cli

    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    root = write_cifar10_torchvision(tmp_path / "data", train_per_class=2, test_per_class=1)
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", *tiny_args(
        root, tmp_path / "logs", f"--model.init_args.optimizer.init_args.{flag}", value)])
    assert cli.console_main() == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hug-lightning: error: invalid configuration: optimizer SGD: {reason} "
                          "(set its arguments with --model.init_args.optimizer.init_args."), err
    assert "Traceback" not in err
    assert not list((tmp_path / "logs").rglob("version_*"))  # nothing started
    options = {"lr": 0.1, flag: float(value)}
    with pytest.raises(ValueError, match=reason):  # Python: the constructor's error
        ClassifierModule(backbone=SmallConvNet(width=4),
                         optimizer=functools.partial(torch.optim.SGD, **options))


def test_the_optimizer_check_accepts_an_optimizer_of_matrices_only():
    """The constructor's check builds the optimizer over a dummy parameter: a 1-element vector
    made torch.optim.Muon (2-D parameters only) a false 'invalid configuration'."""
    import functools

    from hug_lightning.factories import check_optimizer

    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        pytest.skip("this torch has no torch.optim.Muon")
    check_optimizer(functools.partial(muon, lr=0.02))  # no error
    with pytest.raises(ValueError, match="optimizer Muon: Learning rate should be >= 0"):
        check_optimizer(functools.partial(muon, lr=-1.0))


@pytest.mark.parametrize("argv, names, usage", [
    (["fit", "--config", "ufm_hug", "--model.init_args.lrr", "3"], ["'lrr' is not accepted"],
     "usage: hug-lightning [options] fit [--config CONFIG] [--<key> VALUE ...]"),
    (["fitt"], ["invalid choice: 'fitt'"],
     "usage: hug-lightning {fit,validate,test,predict} [--config CONFIG] [--<key> VALUE ...]")])
def test_a_parse_error_is_a_short_usage_then_the_error(argv, names, usage, monkeypatch, capsys):
    """argparse printed the usage of every option before the error (about 110 lines for fit):
    the error line came after a screen of options. One usage line, the --help tip, the error."""
    monkeypatch.setattr("sys.argv", ["hug-lightning"])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == usage
    assert lines[1].startswith("tip: For details of accepted options run: hug-lightning")
    assert lines[2].startswith("error: ")
    assert all(any(name in line for line in lines) for name in names)
    assert len(lines) < 15
