"""(b-cli) of ``train_bench.py``: throughput of the Trainer that ``hug-lightning fit`` builds.

The bench's (b) runs ``ClassifierModule`` on a bare ``Trainer`` (no logger, progress bar or
checkpoints) to isolate the module. This measure builds everything through the command's own
parser instead: ``configs/cifar10_ce.yaml`` plus ``configs/gpu.yaml`` on a GPU, with every
default of the command (TensorBoard logger, progress bar, ``ModelCheckpoint``,
``LastCheckpoint``, interrupt handling, the NC monitor on training batches, calibration), then
fits it on the same in-memory device-resident images as (a) and (b). Only validation is off
(``limit_val_batches 0``), as in (b): the timed window holds training steps only.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import Tensor

REPO = Path(__file__).resolve().parents[1]


def backbone_override(args: argparse.Namespace, null_backbone: str = "") -> list[str]:
    """The ``--model.init_args.backbone`` argument matching ``train_bench.make_backbone``
    (``null_backbone``: the import path of its ``NullBackbone``, for ``--overhead``)."""
    if getattr(args, "overhead", False):
        return ["--model.init_args.backbone", null_backbone]
    width = 8 if args.toy else args.small_width
    if not width:
        return []  # the config's ResNet-18
    return ["--model.init_args.backbone",
            f'{{"class_path": "hug_lightning.backbones.SmallConvNet", '
            f'"init_args": {{"width": {width}}}}}']


def cli_arguments(args: argparse.Namespace, save_dir: str, null_backbone: str = "") -> list[str]:
    """Arguments of ``hug-lightning fit`` for this bench run (without the subcommand)."""
    device = (["--config", str(REPO / "configs" / "gpu.yaml")] if args.device == "cuda"
              else ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"])
    return ["--config", str(REPO / "configs" / "cifar10_ce.yaml"), *device,
            "--trainer.max_steps", str(args.warmup + args.steps),
            "--trainer.max_epochs", "1000",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger.init_args.save_dir", save_dir,
            "--data.init_args.root", save_dir, "--data.init_args.download", "false",
            "--data.init_args.batch_size", str(args.batch_size),
            "--data.init_args.val_split", "0",
            *(["--model.init_args.compile", "true"] if args.compile else []),
            *backbone_override(args, null_backbone)]


def cli_run(images: Tensor, labels: Tensor, args: argparse.Namespace,
            data_class: Any, timer_class: Any, null_backbone: str = "") -> dict[str, Any]:
    """images/s over the timed steps of a fit built by the command's parser; ``data_class``
    and ``timer_class`` are ``train_bench``'s ``TensorCIFAR`` and ``StepTimer``."""
    from hug_lightning.cli import main

    with tempfile.TemporaryDirectory() as save_dir:
        cli = main(cli_arguments(args, save_dir, null_backbone), run=False)
        assert cli.model.channels_last == (args.device == "cuda")
        timer = timer_class(args.warmup, args.steps)
        cli.trainer.callbacks.append(timer)
        data = data_class(images, labels, num_classes=10, batch_size=args.batch_size,
                          drop_last=True, num_workers=0, pin_memory=False,
                          device_resident=True)
        gc.collect()  # as in train_bench's arms: no full collection of their garbage in here
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=data)
        return {"images_s": timer.steps * args.batch_size / max(timer.t1 - timer.t0, 1e-9),
                "wall_s": time.perf_counter() - start,
                "callbacks": [type(c).__name__ for c in cli.trainer.callbacks]}


__all__ = ["backbone_override", "cli_arguments", "cli_run"]
