"""Shared fixtures: generated data sets in both CIFAR layouts, the checksum bypass, CLI args."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from datagen import CIFAR10_CLASSES, write_cifar10_torchvision, write_image_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


def load_bench(name: str) -> ModuleType:
    """Import ``bench/<name>.py`` (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cifar10_tv_root(tmp_path_factory) -> Path:
    """Generated CIFAR-10 in torchvision's pickled format (20 train, 10 test per class)."""
    return write_cifar10_torchvision(tmp_path_factory.mktemp("cifar10_tv"))


@pytest.fixture(scope="session")
def cifar10_folder_root(tmp_path_factory) -> Path:
    """Generated CIFAR-10 in the image-folder layout (PNG files)."""
    return write_image_folder(tmp_path_factory.mktemp("cifar10_folder"), CIFAR10_CLASSES)


@pytest.fixture
def no_checksum(monkeypatch):
    """Bypass only torchvision's md5 comparison of CIFAR files (generated files differ).

    The files must still exist and are read by torchvision's own loading code.
    """
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def tiny_args(root: Path, log_dir: Path, *extra: str, config: str = "cifar10_ce") -> list[str]:
    """Arguments for a fast CPU run of a shipped config on generated data."""
    return [
        "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--config", str(REPO / "configs" / "debug.yaml"),
        "--data.init_args.root", str(root),
        "--data.init_args.download", "false",
        "--data.init_args.val_split", "0.2",
        "--model.init_args.backbone", '{"class_path": "hug_lightning.backbones.SmallConvNet", '
                                      '"init_args": {"width": 8}}',
        "--trainer.logger.init_args.save_dir", str(log_dir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]
