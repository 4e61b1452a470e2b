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
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
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
    """CIFAR-style DataModule over tensors already in memory (no files); any number of classes."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int = 10, **kwargs: Any) -> None:
        super().__init__(root="unused", download=False, val_split=0, **kwargs)
        self._tensors = (images, labels)
        self.num_classes = int(num_classes)

    def prepare_data(self) -> None:
        pass

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        images, labels = self._tensors
        return (images, labels) if train else (images[:2048], labels[:2048])


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StepTimer(Callback):
    """Wall time of the training batches after ``warmup`` (device synchronized).

    With ``steps`` the clock stops at the end of training batch ``warmup + steps``, as the plain
    loop's does: the end of the fit (the last epoch-end hooks: NC compute, checkpoint saves,
    logger flush) comes once per fit, not per step, and stays out of the window."""

    def __init__(self, warmup: int, steps: int | None = None) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, 0.0, 0.0, 0
        self.stop = None if steps is None else warmup + steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.t0 = time.perf_counter()

    def _end(self, trainer, pl_module) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    def on_train_batch_end(self, trainer, pl_module, outputs, batch,  # noqa: ANN001
                           batch_idx) -> None:
        if trainer.global_step == self.stop:
            self._end(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        if self.stop is None or trainer.global_step < self.stop:  # stopped early
            self._end(trainer, pl_module)


class EpochTimer(Callback):
    """Wall time of each whole epoch, epoch-end hooks (NC compute, logging) included.

    An epoch runs from one ``on_train_epoch_start`` to the next (or to ``on_train_end``), so
    everything Lightning, the module and the callbacks do at the epoch's end is inside it.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def _stamp(self, pl_module) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        self.stamps.append(time.perf_counter())

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stamp(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._stamp(pl_module)

    def epoch_seconds(self, skip: int = 1) -> float:
        """Mean epoch time after the first ``skip`` epochs (cuDNN autotuning, allocator)."""
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])][skip:]
        return sum(times) / max(len(times), 1)


class NullBackbone(nn.Module):
    """A model that costs (almost) nothing: one tiny linear layer on 2x2 pixels. With it the
    step time of (a) and (b) is framework and data time only, so (b) - (a) per step is the host
    time Lightning and the module add (``--overhead``)."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, self.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x[:, :, :2, :2].flatten(1)).tanh()


def make_backbone(args: argparse.Namespace) -> nn.Module:
    """ResNet-18 (CIFAR stem); ``--small-width W``: SmallConvNet with ``4 W`` features."""
    if getattr(args, "overhead", False):
        return NullBackbone()
    if args.toy:
        return SmallConvNet(width=8)
    return SmallConvNet(width=args.small_width) if args.small_width else CifarResNet(depth=18)


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
                _sync(device)
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
    _sync(device)
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


def dynamo_summary() -> dict[str, int | str]:
    """Compact ``torch._dynamo`` counters since the last :func:`reset_dynamo`: frames compiled,
    distinct graphs, graph breaks, and the most frequent break reason (``--compile`` runs)."""
    from torch._dynamo.utils import counters
    breaks = counters["graph_break"]
    out = {"frames": int(counters["frames"]["total"]),
           "graphs": int(counters["stats"]["unique_graphs"]),
           "graph_breaks": int(sum(breaks.values()))}
    if breaks:
        reason, n = breaks.most_common(1)[0]
        out["top_break"] = f"{n}x {reason[:120]!r}"
    return out


def reset_dynamo() -> None:
    from torch._dynamo.utils import counters
    counters.clear()


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
    # best of the repeats: highest throughput, shortest epoch
    res = {k: (min(v) if k.startswith("epoch") else max(v)) for k, v in runs.items()}
    ratios: dict[str, float] = {}

    def ratio(name: str, num: str, den: str) -> None:
        if num in res and den in res:
            ratios[name] = res[num] / res[den]

    ratio("(b)/(a) device-resident Lightning vs plain loop", "b_lightning_device", "a_plain_loop")
    ratio("(b0)/(a) bare LightningModule vs plain loop", "b0_lightning_minimal", "a_plain_loop")
    ratio("(b)/(b0) ClassifierModule vs bare LightningModule", "b_lightning_device",
          "b0_lightning_minimal")
    ratio("(b-cli)/(a) `hug-lightning fit` (all defaults) vs plain loop",
          "bcli_hug_lightning_fit", "a_plain_loop")
    ratio("(b-cli)/(b) the command's defaults vs a bare Trainer", "bcli_hug_lightning_fit",
          "b_lightning_device")
    ratio("(b)/(c) device-resident vs classic DataLoader", "b_lightning_device",
          "c_lightning_dataloader")
    ratio("HUG step / CE step", "b_lightning_device", "b_hug")
    for k in (10, 100):
        ratio(f"collectors on / off, epoch time, K={k}", f"epoch_s_K{k}_nc_on",
              f"epoch_s_K{k}_nc_off")
    ratio("eval-pass epoch / collectors-off epoch, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_nc_off")
    ratio("eval-pass epoch / train-collector epoch, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_nc_on")
    ratio("eval-pass epoch, float32 pass / bf16 pass, K=100", "epoch_s_K100_eval_pass",
          "epoch_s_K100_eval_pass_bf16")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    model_name = ("NullBackbone (overhead probe)" if args.overhead else
                  f"SmallConvNet width {args.small_width} (d={4 * args.small_width})"
                  if args.small_width else "ResNet-18 CIFAR stem")
    print(f"\n### train_bench on {device_name} (batch {args.batch_size}, "
          f"{'toy SmallConvNet' if args.toy else model_name}, "
          f"{'bf16-mixed, channels_last' if args.bf16 else 'fp32'}"
          f"{', torch.compile' if args.compile else ', eager'}"
          f"{', loss compiled' if args.compile_loss else ''}; best of {args.repeats})\n")
    print("| measurement | value | all repeats |\n|---|---|---|")
    for key, value in res.items():
        unit = "s" if key.startswith("epoch") else "images/s"
        every = ", ".join(f"{v:,.3f}" if unit == "s" else f"{v:,.0f}" for v in runs[key])
        print(f"| {key} | {value:,.3f} {unit} | {every} |")
    for key, value in ratios.items():
        print(f"| {key} | {value:.3f} | |")
    if "a_plain_loop" in res and "b_lightning_device" in res:
        ms = {k: 1e3 * args.batch_size / v for k, v in res.items() if not k.startswith("epoch")}
        a, b = ms["a_plain_loop"], ms["b_lightning_device"]
        split = ""
        if "b0_lightning_minimal" in ms:
            b0 = ms["b0_lightning_minimal"]
            split = f", of which Lightning (b0) - (a) = {b0 - a:.3f} ms"
        print(f"| per step: (a) {a:.3f} ms, (b) {b:.3f} ms, "
              f"(b) - (a) = {b - a:.3f} ms{split} | | |")
    for key, stats in compile_stats.items():
        print(f"| torch.compile, {key}: " + ", ".join(f"{k} {v}" for k, v in stats.items())
              + " | | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": res, "repeats": runs, "ratios": ratios, "device": device_name,
                       "compile": args.compile, "compile_loss": args.compile_loss,
                       "dynamo": compile_stats}, f, indent=1)
    return {**res, **ratios}


if __name__ == "__main__":
    main()
