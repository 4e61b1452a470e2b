"""Long-tailed CIFAR-10/100 (LDAM protocol) on generated torchvision-format data."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from datagen import write_cifar10_torchvision, write_cifar100_torchvision
from hug_lightning.cli import main
from hug_lightning.data import (CIFAR10DataModule, CIFAR10LTDataModule, CIFAR100DataModule,
                                CIFAR100LTDataModule)
from hug_lightning.data.long_tail import long_tail_counts, profile_n_max, stratified_split

N_MAX = 100  # generated training images per class


@pytest.fixture(scope="session")
def cifar10_lt_root(tmp_path_factory) -> Path:
    return write_cifar10_torchvision(tmp_path_factory.mktemp("c10lt"), train_per_class=N_MAX,
                                     test_per_class=4)


@pytest.fixture(scope="session")
def cifar100_lt_root(tmp_path_factory) -> Path:
    return write_cifar100_torchvision(tmp_path_factory.mktemp("c100lt"), train_per_class=N_MAX,
                                      test_per_class=2)


def closed_form(n_max: int, k: int, ratio: float) -> list[int]:
    return [math.floor(n_max * ratio ** (-i / (k - 1))) for i in range(k)]


def test_ldam_reference_counts():
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    totals = {(5000, 10, 100): 12406, (5000, 10, 10): 20431, (500, 100, 100): 10847,
              (500, 100, 10): 19573}  # the training-set sizes reported with LDAM
    for (n_max, k, ratio), total in totals.items():
        counts = long_tail_counts(n_max, k, ratio)
        assert sum(counts) == total and counts == closed_form(n_max, k, ratio)
        assert counts[0] == n_max and counts[-1] == n_max // ratio
    assert long_tail_counts(500, 5, 10, "step") == [500, 500, 50, 50, 50]
    assert long_tail_counts(7, 4, 1) == [7, 7, 7, 7]
    with pytest.raises(ValueError, match=">= 1"):
        long_tail_counts(10, 10, 0.5)
    with pytest.raises(ValueError, match="exp"):
        long_tail_counts(10, 10, 10, "linear")


@pytest.mark.parametrize("ratio", [10, 100])
@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_counts_equal_closed_form(which, ratio, request, no_checksum):
    cls, k = (CIFAR10LTDataModule, 10) if which == "cifar10" else (CIFAR100LTDataModule, 100)
    root = request.getfixturevalue(f"{which}_lt_root")
    dm = cls(root=str(root), download=False, imbalance_ratio=ratio, num_workers=0)
    assert isinstance(dm, CIFAR10DataModule if k == 10 else CIFAR100DataModule)
    dm.setup("fit")
    expected = closed_form(N_MAX, k, ratio)
    assert torch.bincount(dm.train_set.targets, minlength=k).tolist() == expected
    assert dm.val_set is dm.test_set  # val_split 0: the balanced test set
    assert torch.equal(dm.train_eval_set.indices, dm.train_set.indices)
    test_counts = torch.bincount(dm.test_set.targets, minlength=k).tolist()
    assert len(set(test_counts)) == 1  # the test set stays balanced
    counts = dm.class_counts
    assert counts["long_tail"] == counts["train"] == expected and counts["n_max"] == N_MAX
    assert counts["val_source"] == "test" and counts["test"] == test_counts


def test_selection_is_seeded_and_a_subset(cifar10_lt_root, no_checksum):
    def build(seed: int) -> CIFAR10LTDataModule:
        dm = CIFAR10LTDataModule(root=str(cifar10_lt_root), download=False, seed=seed,
                                 imbalance_ratio=10, num_workers=0)
        dm.setup("fit")
        return dm

    a, b, c = build(0), build(0), build(1)
    assert torch.equal(a.train_set.indices, b.train_set.indices)  # every rank, every run
    assert not torch.equal(a.train_set.indices, c.train_set.indices)
    assert a.train_set.indices.unique().numel() == len(a.train_set)
    # Every image kept is an original training image of its class.
    full = CIFAR10DataModule(root=str(cifar10_lt_root), download=False)
    images, labels = full.load_split(train=True)
    assert torch.equal(labels[a.train_set.indices], a.train_set.targets)
    assert torch.equal(images[a.train_set.indices], a.train_set.images[a.train_set.indices])


def test_val_split_from_long_tailed_train(cifar10_lt_root, no_checksum, caplog):
    dm = CIFAR10LTDataModule(root=str(cifar10_lt_root), download=False, imbalance_ratio=100,
                             val_split=0.2, num_workers=0)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    train_idx, val_idx = dm.train_set.indices, dm.val_set.indices
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    train = torch.bincount(dm.train_set.targets, minlength=10)
    val = torch.bincount(dm.val_set.targets, minlength=10)
    assert (train + val).tolist() == closed_form(N_MAX, 10, 100)
    assert (train >= 1).all() and val[0] == 20  # 20% of the head class, >= 1 kept per class
    assert dm.class_counts["val_source"] == "train" and dm.class_counts["val"] == val.tolist()
    ratio = train.max().item() / train.min().item()  # what is left of ratio 100 after the split
    assert (f"{val.sum().item()} held out for validation, training ratio now {ratio:.3g}"
            in caplog.text)
    t, v = stratified_split(torch.tensor([0] * 10 + [1] * 3), 4, seed=0)  # int: about 4
    assert len(v) == 4 and len(t) == 9


def test_bad_ratio_is_a_clear_error(cifar10_lt_root, no_checksum):
    with pytest.raises(ValueError, match="imbalance_ratio must be >= 1"):
        CIFAR10LTDataModule(imbalance_ratio=0.5)
    dm = CIFAR10LTDataModule(root=str(cifar10_lt_root), download=False, imbalance_ratio=1000)
    with pytest.raises(ValueError, match=r"imbalance_ratio <= 100"):
        dm.setup("fit")


@pytest.mark.parametrize("config, which", [("cifar10_lt100_ce", "cifar10"),
                                           ("cifar100_lt100_hug", "cifar100")])
def test_cli_fit_then_test(config, which, request, no_checksum, tmp_path):
    root = request.getfixturevalue(f"{which}_lt_root")
    k = 10 if which == "cifar10" else 100
    args = tiny_args(root, tmp_path, "--trainer.limit_train_batches", "2", config=config)
    cli = main(["fit", *args])
    assert cli.model.num_classes == k
    run = Path(cli.trainer.log_dir)
    saved = json.loads((run / "class_counts.json").read_text())
    assert saved["train"] == cli.datamodule.class_counts["train"]
    assert saved["long_tail"] == closed_form(N_MAX, k, 100)  # the config's ratio 100
    assert saved["val_source"] == "train"  # tiny_args sets val_split 0.2
    assert list(run.glob("events.out.tfevents.*"))
    last = run / "checkpoints" / "last.ckpt"
    cli = main(["test", *args, "--ckpt_path", str(last), "--trainer.limit_test_batches", "1.0"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    test_run = Path(cli.trainer.log_dir)
    assert json.loads((test_run / "class_counts.json").read_text())["test"] == [4 if k == 10
                                                                                else 2] * k


def test_too_large_ratio_and_a_class_without_images(tmp_path, monkeypatch, capsys):
    """A ratio above the smallest class was a ValueError traceback at setup (now the CLI's
    one-line ConfigError); a class left with no image said "use imbalance_ratio <= 0"."""
    from datagen import CIFAR10_CLASSES, write_image_folder
    from hug_lightning.cli import ConfigError, console_main
    from hug_lightning.data import BadDataError

    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=3,
                              test_per_class=1)
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", *tiny_args(
        root, tmp_path / "logs", "--data.init_args.imbalance_ratio", "4", "--data.init_args"
        ".val_split", "0", "--trainer.fast_dev_run", "true", config="cifar10_lt100_ce")])
    assert console_main() == 2
    err = capsys.readouterr().err
    assert "imbalance_ratio=4 leaves no training image" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match=r"use imbalance_ratio <= 3"):
        CIFAR10LTDataModule(root=str(root), download=False, imbalance_ratio=4).setup("fit")
    for f in (root / "train" / "dog").iterdir():
        f.write_bytes(b"unreadable")
    dm = CIFAR10LTDataModule(root=str(root), download=False, imbalance_ratio=2,
                             on_corrupt="skip")
    with pytest.raises(BadDataError, match=r"has no readable image of classes \[5\]"):
        dm.setup("fit")


def test_resume_on_another_long_tailed_subset_is_refused(cifar10_lt_root, no_checksum, tmp_path,
                                                         monkeypatch, capsys):
    """`fit --ckpt_path last` with another imbalance_ratio (or seed, val_split, ...) trained the
    rest of the run on other images without a word, and rewrote the run's class_counts.json
    with the new counts; it is refused now, the first counts kept, and the same options resume."""
    from hug_lightning.cli import console_main

    args = tiny_args(cifar10_lt_root, tmp_path, "--trainer.limit_train_batches", "2",
                     "--data.init_args.val_split", "0", "--trainer.limit_val_batches", "1",
                     config="cifar10_lt100_ce")
    run = Path(main(["fit", *args]).trainer.log_dir)
    first = (run / "class_counts.json").read_text()
    assert json.loads(first)["train"] == closed_form(N_MAX, 10, 100)
    monkeypatch.delenv("HUG_LIGHTNING_TRACEBACK", raising=False)
    resume = ["--ckpt_path", "last", "--trainer.max_epochs", "2"]
    for changed in (["--data.init_args.imbalance_ratio", "10"], ["--data.init_args.seed", "1"]):
        monkeypatch.setattr("sys.argv", ["hug-lightning", "fit", *args, *resume, *changed])
        assert console_main() == 2
        err = capsys.readouterr().err
        assert "other CIFAR-10-LT training images" in err and "Traceback" not in err
        assert (run / "class_counts.json").read_text() == first  # the run's own counts kept
    main(["validate", *args, "--ckpt_path", "last", "--data.init_args.imbalance_ratio", "10"])
    assert (run / "class_counts.json").read_text() == first  # evaluating is not refused
    cli = main(["fit", *args, *resume])  # the same options: resumed
    assert cli.trainer.current_epoch == 2 and Path(cli.trainer.log_dir) == run
    assert json.loads((run / "class_counts.json").read_text()) == json.loads(first)


def exact_counts(n_max: int, k: int, ratio: int) -> list[int]:
    """``floor(n_max * ratio ** (-c / (k - 1)))`` in integers: the largest ``n`` with
    ``n ** (k - 1) * ratio ** c <= n_max ** (k - 1)`` (no floating point)."""
    out = []
    for c in range(k):
        n = int(n_max * ratio ** (-c / (k - 1)))  # a guess, then corrected exactly
        while (n + 1) ** (k - 1) * ratio ** c <= n_max ** (k - 1):
            n += 1
        while n ** (k - 1) * ratio ** c > n_max ** (k - 1):
            n -= 1
        out.append(n)
    return out


def largest_fitting_n_max(available: list[int], ratio: int) -> int:
    """Down from the largest class, the first ``n_max`` whose profile every class can fill."""
    return next(m for m in range(max(available), 0, -1)
                if all(n <= a for n, a in zip(exact_counts(m, len(available), ratio), available)))


def test_profile_n_max_against_a_search():
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        k = int(torch.randint(2, 12, (), generator=gen))
        ratio = int(torch.randint(1, 60, (), generator=gen))
        available = (100 - torch.randint(0, 100, (k,), generator=gen)
                     * (torch.rand(k, generator=gen) < 0.3)).tolist()
        assert profile_n_max(available, ratio) == largest_fitting_n_max(available, ratio)
        assert long_tail_counts(100, k, ratio) == exact_counts(100, k, ratio)


def test_classes_short_of_images(tmp_path):
    """A class with fewer images than the others lowered n_max to its size for every class: one
    unreadable image anywhere (on_corrupt skip) or a tail class holding 5 of 20 images changed
    the whole profile (its counts and ratio) although that class needs only 2 of them."""
    from datagen import CIFAR10_CLASSES, write_image_folder

    root = write_image_folder(tmp_path / "c10", CIFAR10_CLASSES, train_per_class=20,
                              test_per_class=1)
    available = [20] * 10

    def shorten(c: int, keep: int) -> list[int]:
        for f in sorted((root / "train" / CIFAR10_CLASSES[c]).iterdir())[keep:]:
            f.unlink()
        available[c] = keep
        dm = CIFAR10LTDataModule(root=str(root), download=False, imbalance_ratio=10,
                                 num_workers=0)
        dm.setup("fit")
        assert dm.class_counts["n_max"] == largest_fitting_n_max(available, 10)
        return torch.bincount(dm.train_set.targets, minlength=10).tolist()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert shorten(9, 5) == exact_counts(20, 10, 10)  # the tail needs 2: as if complete
    assert not [w for w in caught if "cannot fill the profile" in str(w.message)]
    need = exact_counts(20, 10, 10)[2]
    assert shorten(2, need) == exact_counts(20, 10, 10)  # just enough
    with pytest.warns(UserWarning, match=rf"cannot fill the profile from 20 images \(class 2: "
                                         rf"{need - 2} of "):
        scaled = shorten(2, need - 2)  # 2 short of its share: the profile is scaled down
    assert scaled == exact_counts(largest_fitting_n_max(available, 10), 10, 10)
    assert scaled[2] <= need - 2 and scaled[0] < 20
    assert shorten(0, 10) == exact_counts(10, 10, 10)  # the head class short: n_max its size


@pytest.mark.parametrize("cls, val_split", [(CIFAR10LTDataModule, 0), (CIFAR10DataModule, 0),
                                            (CIFAR10LTDataModule, 0.2)])
def test_validate_reads_the_training_images_only_to_hold_some_out(cls, val_split,
                                                                  cifar10_lt_root, no_checksum,
                                                                  monkeypatch):
    """`validate` with val_split 0 scores the test split: it decoded (and, LT, drew from) the
    whole training set for nothing; with a held-out part it needs them."""
    dm = cls(root=str(cifar10_lt_root), download=False, val_split=val_split, num_workers=0)
    reads, load = [], dm.load_split
    monkeypatch.setattr(dm, "load_split", lambda train: (reads.append(train), load(train))[1])
    dm.setup("validate")
    dm.setup("validate")  # built once
    if val_split:
        assert reads == [False, True] and dm.val_set is not dm.test_set  # drawn from training
    else:
        assert reads == [False] and dm.train_set is None and dm.val_set is dm.test_set
    dm.setup("fit")  # the training set now, once
    assert reads == ([False, True] if val_split else [False, False, True])
    assert dm.train_set is not None and len(dm.train_set) > 0


def test_every_fit_of_one_data_module_writes_its_class_counts(cifar10_lt_root, no_checksum,
                                                             tmp_path):
    """One LT data module used by two trainers (a sweep in a notebook): the sets are built once,
    and the second run's folder had no class_counts.json (written only while building)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from hug_lightning.backbones import SmallConvNet
    from hug_lightning.module import ClassifierModule

    dm = CIFAR10LTDataModule(root=str(cifar10_lt_root), download=False, imbalance_ratio=10,
                             batch_size=16, num_workers=0, pin_memory=False)
    folders = []
    for name in ("first", "second"):
        trainer = Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                          logger=TensorBoardLogger(tmp_path, name=name), accelerator="cpu",
                          enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False)
        trainer.fit(ClassifierModule(backbone=SmallConvNet(width=4), num_classes=10), dm)
        folders.append(Path(trainer.log_dir))
    assert folders[0] != folders[1]
    for folder in folders:
        saved = json.loads((folder / "class_counts.json").read_text())
        assert saved["train"] == closed_form(N_MAX, 10, 10) == dm.class_counts["train"]
