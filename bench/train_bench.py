"""Training throughput: a plain PyTorch loop vs ``hug_lightning`` (device-resident and classic data).

All numbers come from one process on one machine, so the ratios are comparable:

* (a) a hand-written PyTorch loop: same model, optimizer, precision and device-resident batches;
* (b) ``ClassifierModule`` + Lightning ``Trainer`` with the device-resident CIFAR path;
* (c) the same with the classic DataLoader (per-image crop/flip in CPU worker processes);
* HUG vs CE step time, neural-collapse collectors on vs off (both on path (b)), and the extra
  cost of the eval-pass NC mode over whole epochs.

Run ``python bench/train_bench.py --device cuda`` on a GPU (``--toy`` runs a tiny CPU version in
seconds: the test suite does that so the script never rots). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from lightning.pytorch import Callback, Trainer
from torch import Tensor, nn

from hug_lightning.backbones import CifarResNet, SmallConvNet
from hug_lightning.data.cifar import CIFAR10DataModule
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.metrics.callback import NeuralCollapseMonitor
from hug_lightning.module import ClassifierModule

MEAN, STD = CIFAR10DataModule.mean, CIFAR10DataModule.std


class TensorCIFAR(CIFAR10DataModule):
    """CIFAR-10 DataModule over tensors already in memory (no files)."""

    def __init__(self, images: Tensor, labels: Tensor, **kwargs: Any) -> None:
        super().__init__(root="unused", download=False, val_split=0, **kwargs)
        self._tensors = (images, labels)

    def prepare_data(self) -> None:
        pass

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images, labels = self._tensors
        return (images, labels) if train else (images[:2048], labels[:2048])


class StepTimer(Callback):
    """Wall time of the training batches after ``warmup`` (device synchronized)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, 0.0, 0.0, 0

    def _sync(self, module: nn.Module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._sync(pl_module)
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def make_backbone(toy: bool) -> nn.Module:
    return SmallConvNet(width=8) if toy else CifarResNet(depth=18)


def optimizer_factory(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def plain_loop(images: Tensor, labels: Tensor, args: argparse.Namespace) -> float:
    """(a) images/s of a hand-written loop over the same device-resident batches."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = nn.Sequential(make_backbone(args.toy), nn.Linear(8 * 4 if args.toy else 512, 10))
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model: Callable = torch.compile(model) if args.compile else model
    opt = optimizer_factory(model.parameters())
    sampler = EpochShardSampler(labels, 1, 0, shuffle=True, seed=0)
    loader = DeviceBatchLoader(images, labels, args.batch_size, MEAN, STD, device,
                               sampler=sampler, augment=True, drop_last=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext())
    done, t0, epoch = 0, 0.0, 0
    while done < args.warmup + args.steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if done == args.warmup:
                _sync(device)
                t0 = time.perf_counter()
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                loss = nn.functional.cross_entropy(step_model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == args.warmup + args.steps:
                break
        epoch += 1
    _sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def lightning_run(images: Tensor, labels: Tensor, args: argparse.Namespace, *, head: str = "ce",
                  device_resident: bool = True, nc: bool = False, eval_pass: bool = False,
                  epochs: int | None = None) -> tuple[float, float]:
    """(images/s over the timed steps, wall seconds of the whole fit)."""
    torch.manual_seed(0)
    head_factory = (CrossEntropyHead if head == "ce"
                    else lambda k, d: HUGHead(k, d, alpha=1.0, beta=4.0, intra_power=2))
    model = ClassifierModule(backbone=make_backbone(args.toy), head=head_factory,
                             optimizer=optimizer_factory, channels_last=args.channels_last,
                             compile=args.compile)
    data = TensorCIFAR(images, labels, batch_size=args.batch_size, drop_last=True,
                       num_workers=0 if device_resident else args.workers,
                       pin_memory=args.device == "cuda", device_resident=device_resident)
    timer = StepTimer(args.warmup)
    monitor = NeuralCollapseMonitor(enabled=nc, val=False, eval_pass=eval_pass)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=-1 if epochs else args.warmup + args.steps, max_epochs=epochs or 1000,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, monitor],
        benchmark=args.device == "cuda",
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    wall = time.perf_counter() - start
    return timer.steps * args.batch_size / max(timer.t1 - timer.t0, 1e-9), wall


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--toy", action="store_true", help="tiny CPU version (seconds)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=8, help="classic DataLoader workers")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-eval-pass", action="store_true", help="skip the epoch timings")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.toy:
        args.device, args.steps, args.warmup, args.batch_size, args.num_images = "cpu", 4, 2, 32, 256
        args.workers = 0
    args.bf16 = args.device == "cuda"
    args.channels_last = args.device == "cuda"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (args.num_images,), generator=gen)

    res: dict[str, float] = {"a_plain_loop": plain_loop(images, labels, args)}
    res["b_lightning_device"], _ = lightning_run(images, labels, args)
    res["c_lightning_dataloader"], _ = lightning_run(images, labels, args, device_resident=False)
    res["b_hug"], _ = lightning_run(images, labels, args, head="hug")
    res["b_nc_on"], _ = lightning_run(images, labels, args, nc=True)
    if not args.no_eval_pass:
        epochs = 2
        _, res["epochs_nc_train"] = lightning_run(images, labels, args, nc=True, epochs=epochs)
        _, res["epochs_nc_eval_pass"] = lightning_run(images, labels, args, nc=True,
                                                      eval_pass=True, epochs=epochs)
    ratios = {
        "(b)/(a) device-resident Lightning vs plain loop": res["b_lightning_device"] / res["a_plain_loop"],
        "(b)/(c) device-resident vs classic DataLoader": res["b_lightning_device"] / res["c_lightning_dataloader"],
        "HUG step / CE step": res["b_lightning_device"] / res["b_hug"],
        "collectors on / off (step time)": res["b_lightning_device"] / res["b_nc_on"],
    }
    if "epochs_nc_eval_pass" in res:
        ratios["eval-pass epoch / train-batch epoch"] = (res["epochs_nc_eval_pass"]
                                                         / res["epochs_nc_train"])
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"\n### train_bench on {device_name} (batch {args.batch_size}, "
          f"{'toy SmallConvNet' if args.toy else 'ResNet-18 CIFAR stem'}, "
          f"{'bf16-mixed, channels_last' if args.bf16 else 'fp32'})\n")
    print("| measurement | value |\n|---|---|")
    for key, value in res.items():
        unit = "s" if key.startswith("epochs") else "images/s"
        print(f"| {key} | {value:,.1f} {unit} |")
    for key, value in ratios.items():
        print(f"| {key} | {value:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "ratios": ratios, "device": device_name}, f, indent=1)
    return {**res, **ratios}


if __name__ == "__main__":
    main()
