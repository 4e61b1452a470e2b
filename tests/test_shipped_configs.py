"""Every shipped config runs: fit (debug preset) then test from its last.ckpt, on generated data.

lightning-conventions.md 7.2 / 8: "Every shipped config is exercised" (ashleve runs all
experiment configs, torchgeo parametrizes over its configs). Only a few were (cifar10_ce,
cifar10_hug, imagenet100_ce, ufm_ce, ufm_hug); the CIFAR-100, long-tailed, MHS/MGD,
ImageNet-100 HUG and UFM-regime configs were only parsed, if at all. The backbone is swapped
for a small CNN (as torchgeo swaps timm models): what is checked is that each file's data,
head, optimizer, schedule and callbacks work together end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, tiny_args
from datagen import write_cifar100_torchvision, write_imagenet_folder
from hug_lightning.cli import main

PRESETS = {"debug", "gpu", "ddp"}  # combined with a config, not run alone
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem not in PRESETS)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    return write_cifar100_torchvision(tmp_path_factory.mktemp("cifar100_tv"))


@pytest.fixture(scope="module")
def imagenet100_root(tmp_path_factory) -> Path:
    text = (REPO / "hug_lightning" / "data" / "class_lists" / "imagenet100.txt").read_text()
    wnids = [line.strip() for line in text.splitlines() if line.strip()[:1] == "n"]
    assert len(wnids) == 100
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet100"), wnids,
                                 train_per_class=2, val_per_class=1)


def _args(name: str, request, log: Path) -> list[str]:
    if name.startswith("ufm"):  # no data files, already small; the debug preset is for images
        return ["--config", str(REPO / "configs" / f"{name}.yaml"),
                "--trainer.logger.init_args.save_dir", str(log), "--trainer.max_epochs", "1",
                "--trainer.enable_progress_bar", "false",
                "--model.init_args.backbone.init_args.dim", "16"]
    if name.startswith("imagenet"):
        args = tiny_args(request.getfixturevalue("imagenet100_root"), log, config=name)
        i = args.index("--data.init_args.download")
        del args[i:i + 4]  # never downloaded; val_split 0.2 of 2 images per class holds out 0
        return [*args, "--data.init_args.image_size", "32", "--data.init_args.resize_size", "36"]
    request.getfixturevalue("no_checksum")
    root = request.getfixturevalue("cifar100_root" if name.startswith("cifar100")
                                   else "cifar10_tv_root")
    args = tiny_args(root, log, config=name)
    if "_lt" in name:  # the generated sets are small: a milder ratio keeps every class
        args = [*args, "--data.init_args.imbalance_ratio", "3"]
    return args


def test_every_config_file_is_listed():
    assert {"cifar10_ce", "cifar100_hug_mgd", "cifar10_lt100_hug", "imagenet100_hug",
            "ufm_hug_rankin"} <= set(CONFIGS)
    assert not PRESETS & set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_fits_and_tests(name, request, tmp_path):
    args = _args(name, request, tmp_path)  # tiny_args: SmallConvNet backbone, debug preset
    cli = main(["fit", *args])
    assert cli.trainer.global_step > 0
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    cli = main(["test", *args, "--ckpt_path", str(last)])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
