"""Training throughput: a plain PyTorch loop vs ``hug_lightning`` (device-resident and classic data).

All numbers come from one process on one machine, so the ratios are comparable:

* (a) a hand-written PyTorch loop: same model, optimizer, precision and device-resident batches;
* (b) ``ClassifierModule`` + Lightning ``Trainer`` with the device-resident CIFAR path;
* (b0) the plain loop's body as a bare ``LightningModule`` (no head object, metrics, guards,
  logging or callbacks) on the same Trainer and data: (b0)/(a) is what Lightning itself costs,
  (b)/(b0) what ``ClassifierModule`` and the project's callbacks add;
* (b-cli) the Trainer ``hug-lightning fit`` builds from ``configs/cifar10_ce.yaml`` (+
  ``gpu.yaml``) with all the command's defaults (logger, progress bar, checkpoints, NC monitor;
  ``bench/cli_fit.py``), on the same data: what a user's run gets;
* (c) the same with the classic DataLoader (per-image crop/flip in CPU worker processes);
* HUG vs CE step time, neural-collapse collectors on vs off (both on path (b)), and the extra
  cost of the eval-pass NC mode over whole epochs.

Run ``python bench/train_bench.py --device cuda`` on a GPU (``--toy`` runs a tiny CPU version in
seconds: the test suite does that so the script never rots). Prints a Markdown table.

Beside it: ``train_models.py`` (backbones, data over tensors), ``train_timers.py`` (the arms'
clocks), ``train_report.py`` (ratios, table, JSON) and ``cli_fit.py`` ((b-cli)).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from hug_lightning.data.cifar import CIFAR10DataModule
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.metrics.callback import NeuralCollapseMonitor
from hug_lightning.module import ClassifierModule

if str(Path(__file__).resolve().parent) not in sys.path:  # its sibling modules, also when
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # loaded from a file path

from train_models import NullBackbone, TensorCIFAR, make_backbone  # noqa: E402
from train_report import dynamo_summary, report, reset_dynamo  # noqa: E402
from train_timers import EpochTimer, StepTimer, sync_device  # noqa: E402

MEAN, STD = CIFAR10DataModule.mean, CIFAR10DataModule.std


def optimizer_factory(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def plain_loop(images: Tensor, labels: Tensor, args: argparse.Namespace,
               on_step: Callable[[], None] | None = None) -> float:
    """(a) images/s of a hand-written loop over the same device-resident batches.

    ``on_step`` is called after every optimizer step (e.g. a profiler's ``step``).
    """
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = make_backbone(args)
    model = nn.Sequential(backbone, nn.Linear(backbone.num_features, 10))
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model: Callable = torch.compile(model) if args.compile else model
    opt = optimizer_factory(model.parameters())
    sampler = EpochShardSampler(labels, 1, 0, shuffle=True, seed=0)
    loader = DeviceBatchLoader(images, labels, args.batch_size, MEAN, STD, device,
                               sampler=sampler, augment=True, drop_last=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext())
    gc.collect()  # the earlier arms' garbage: a full collection must not fall in this one's time
    done, t0, epoch = 0, 0.0, 0
    while done < args.warmup + args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if done == args.warmup:
                sync_device(device)
                t0 = time.perf_counter()
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = nn.functional.cross_entropy(step_model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
            done += 1
            if done == args.warmup + args.steps:
                break
        epoch += 1
    sync_device(device)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


class MinimalModule(LightningModule):
    """(b0): the plain loop's step as a bare LightningModule, to split (b) - (a) into what
    Lightning's loop costs and what ``ClassifierModule`` adds (head object, accuracy counts,
    loss guard, label check, logging)."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels_last: bool,
                 compile: bool) -> None:
        super().__init__()
        self.model = nn.Sequential(backbone, nn.Linear(backbone.num_features, num_classes))
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(self.model(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer_factory(self.parameters())


def lightning_run(images: Tensor, labels: Tensor, args: argparse.Namespace, *, head: str = "ce",
                  device_resident: bool = True, nc: bool = False, eval_pass: bool = False,
                  eval_fp32: bool = True, epochs: int | None = None, num_classes: int = 10, minimal: bool = False,
                  extra_callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """One fit: images/s over the timed steps (``max_steps`` mode) or epoch seconds (``epochs``).

    ``minimal``: :class:`MinimalModule` instead of ``ClassifierModule`` and no NC monitor (b0).
    """
    torch.manual_seed(0)
    head_factory = (CrossEntropyHead if head == "ce"
                    else lambda k, d: HUGHead(k, d, alpha=1.0, beta=4.0, intra_power=2))
    model: LightningModule
    if minimal:
        model = MinimalModule(make_backbone(args), num_classes, args.channels_last, args.compile)
    else:
        model = ClassifierModule(backbone=make_backbone(args), head=head_factory,
                                 num_classes=num_classes, optimizer=optimizer_factory,
                                 channels_last=args.channels_last, compile=args.compile,
                                 compile_loss=args.compile_loss)
    data = TensorCIFAR(images, labels, num_classes=num_classes, batch_size=args.batch_size,
                       drop_last=True, num_workers=0 if device_resident else args.workers,
                       pin_memory=args.device == "cuda", device_resident=device_resident)
    timer, epoch_timer = StepTimer(args.warmup, None if epochs else args.steps), EpochTimer()
    monitor = NeuralCollapseMonitor(enabled=nc, val=False, eval_pass=eval_pass,
                                    eval_pass_fp32=eval_fp32)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=-1 if epochs else args.warmup + args.steps, max_epochs=epochs or 1000,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        # the epoch timer only where epochs are timed: every callback costs Lightning's hook
        # dispatch on every step, which (a) does not pay
        callbacks=[*([] if minimal else [monitor]), timer, *([epoch_timer] if epochs else []),
                   *extra_callbacks],
        benchmark=args.device == "cuda",
    )
    gc.collect()  # as in plain_loop
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return {"images_s": timer.steps * args.batch_size / max(timer.t1 - timer.t0, 1e-9),
            "epoch_s": epoch_timer.epoch_seconds(), "wall_s": time.perf_counter() - start}


MEASURES = ("a", "b", "b0", "bcli", "c", "hug", "nc10", "nc100", "eval")


def cli_measure(images: Tensor, labels: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """(b-cli): ``bench/cli_fit.py`` (imported from this file's folder)."""
    import importlib
    import sys
    from pathlib import Path

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    cli_fit = importlib.import_module("cli_fit")
    return cli_fit.cli_run(images, labels, args, TensorCIFAR, StepTimer,
                           null_backbone=f"{NullBackbone.__module__}.NullBackbone")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--toy", action="store_true", help="tiny CPU version (seconds)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=8, help="classic DataLoader workers")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--compile-loss", action="store_true",
                        help="(b), (c), hug, nc*: also compile the head's step (compile_loss)")
    parser.add_argument("--small-width", type=int, default=0,
                        help="SmallConvNet of this width instead of ResNet-18 (CPU runs; "
                             "128 gives d=512 features)")
    parser.add_argument("--measure", nargs="+", choices=MEASURES, default=list(MEASURES),
                        help="a: plain loop, b: device path, b0: bare LightningModule on the "
                             "device path, bcli: the Trainer of `hug-lightning fit` with its "
                             "defaults, c: classic loader, hug: HUG head, "
                             "nc10/nc100: epoch time with collectors on/off at K=10/100, "
                             "eval: eval-pass NC mode at K=100")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved repeats of each on/off pair (best kept)")
    parser.add_argument("--nc-epochs", type=int, default=3, help="epochs per NC run (1st not timed)")
    parser.add_argument("--overhead", action="store_true",
                        help="NullBackbone (no compute), batch 4: (b) - (a) is the host time per "
                             "step that Lightning and the module add; prints ms/step")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.overhead:
        args.batch_size, args.num_images = 4, min(args.num_images, 4096)
    if args.toy:
        args.device, args.steps, args.warmup, args.batch_size, args.num_images = "cpu", 4, 2, 32, 256
        args.workers, args.repeats, args.nc_epochs = 0, 1, 2
    args.bf16 = args.device == "cuda"
    torch.backends.cudnn.benchmark = args.device == "cuda"  # as Trainer(benchmark=True) does for (b)
    args.channels_last = args.device == "cuda"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = {k: torch.randint(0, k, (args.num_images,), generator=gen) for k in (10, 100)}
    want = set(args.measure)
    runs: dict[str, list[float]] = {}

    compile_stats: dict[str, dict[str, int | str]] = {}

    def record(key: str, value: float) -> None:
        runs.setdefault(key, []).append(value)
        if args.compile or args.compile_loss:  # dynamo's work in each's first run
            compile_stats.setdefault(key, dynamo_summary())
            reset_dynamo()
        if args.json:  # so far: a run cut by its time limit still leaves what it measured
            with open(args.json, "w") as f:
                json.dump({"partial": True, "repeats": runs, "dynamo": compile_stats}, f, indent=1)

    if args.compile or args.compile_loss:
        reset_dynamo()
    for _ in range(args.repeats):  # interleaved: a drift of clocks or caches hits both sides
        if "a" in want:
            record("a_plain_loop", plain_loop(images, labels[10], args))
        if want & {"b", "c", "hug"}:
            record("b_lightning_device", lightning_run(images, labels[10], args)["images_s"])
        if "b0" in want:
            record("b0_lightning_minimal",
                   lightning_run(images, labels[10], args, minimal=True)["images_s"])
        if "bcli" in want:
            record("bcli_hug_lightning_fit", cli_measure(images, labels[10], args)["images_s"])
        if "c" in want:
            record("c_lightning_dataloader",
                   lightning_run(images, labels[10], args, device_resident=False)["images_s"])
        if "hug" in want:
            record("b_hug", lightning_run(images, labels[10], args, head="hug")["images_s"])
        for k in (10, 100):
            if f"nc{k}" in want or (k == 100 and "eval" in want):
                for nc in (False, True):
                    out = lightning_run(images, labels[k], args, nc=nc, epochs=args.nc_epochs,
                                        num_classes=k)
                    record(f"epoch_s_K{k}_nc_{'on' if nc else 'off'}", out["epoch_s"])
        if "eval" in want:
            out = lightning_run(images, labels[100], args, nc=True, eval_pass=True,
                                epochs=args.nc_epochs, num_classes=100)
            record("epoch_s_K100_eval_pass", out["epoch_s"])
            if args.bf16:  # the pass in the trainer's bf16 instead of float32 (its default)
                out = lightning_run(images, labels[100], args, nc=True, eval_pass=True,
                                    eval_fp32=False, epochs=args.nc_epochs, num_classes=100)
                record("epoch_s_K100_eval_pass_bf16", out["epoch_s"])
    return report(args, runs, compile_stats)


__all__ = ["EpochTimer", "MEASURES", "MinimalModule", "NullBackbone", "StepTimer", "TensorCIFAR",
           "cli_measure", "dynamo_summary", "lightning_run", "main", "make_backbone",
           "optimizer_factory", "plain_loop", "reset_dynamo"]


if __name__ == "__main__":
    main()
