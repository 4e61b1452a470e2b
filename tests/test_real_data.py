"""Real CIFAR-10 images (../shared/data/cifar10-jpg.tar.gz): a short CPU run learns."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, tiny_args
from hug_lightning.cli import main

TARBALL = Path(os.environ.get("HUG_CIFAR10_JPG",
                              REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))


@pytest.fixture(scope="session")
def cifar10_jpg_subset(tmp_path_factory) -> Path:
    """300 training and 100 test images per class of the real CIFAR-10 (JPEG class folders)."""
    if not TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 tarball not found at {TARBALL} (set HUG_CIFAR10_JPG)")
    out = tmp_path_factory.mktemp("cifar10_jpg_subset")
    keep = {"train": 300, "test": 100}
    with tarfile.open(TARBALL) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpg/<split>/<class>/NNNN.jpg
            if len(parts) != 4 or not member.isfile():
                continue
            _, split, cls, name = parts
            if int(Path(name).stem) >= keep[split]:
                continue
            member.name = str(Path(split) / cls / name)
            tar.extract(member, out, filter="data")
    return out


@pytest.mark.slow
def test_short_cpu_run_on_real_cifar10_learns(cifar10_jpg_subset, tmp_path):
    args = tiny_args(
        cifar10_jpg_subset, tmp_path,
        "--model.init_args.backbone.init_args.width", "32",
        "--model.init_args.optimizer.init_args.lr", "0.05",
        "--data.init_args.batch_size", "64",
        "--data.init_args.val_split", "0",
        "--trainer.max_epochs", "4",
        "--trainer.limit_train_batches", "1.0",
        "--trainer.limit_val_batches", "1.0",
        "--trainer.limit_test_batches", "1.0",
    )
    cli = main(["fit", *args])
    best = cli.trainer.checkpoint_callback.best_model_path
    cli = main(["test", *args, "--ckpt_path", best])
    acc = float(cli.trainer.callback_metrics["test/acc"])
    print(f"real CIFAR-10 subset: test accuracy {acc:.3f}")
    assert acc > 0.30, f"test accuracy {acc:.3f} on 1,000 real test images (chance: 0.10)"
