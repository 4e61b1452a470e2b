"""Where the time of a training step goes: host profile of a fit, or (a) vs (b) op by op.

On a GPU the training loop is often host-bound (the CPU cannot launch kernels as fast as the GPU
runs them), so the Python cost per step and at epoch ends is what separates Lightning from a
plain loop; when the GPU is the bottleneck instead, extra *device* work is. Two modes:

* default: ``bench/train_bench.py``'s device-resident fit with the NC collectors on, for a few
  epochs under cProfile; prints the functions with the most own time and the project's
  functions by cumulative time;
* ``--compare``: ``torch.profiler`` over the same steps of (a) the plain loop and (b) the
  Lightning fit (collectors off); prints per-step device time by op/kernel for both, sorted by
  the difference, so extra work in (b) shows at the top (CUDA kernels on a GPU, CPU ops on a
  CPU).

    python bench/profile_host.py --device cuda --classes 100 --epochs 3
    python bench/profile_host.py --device cuda --compare --steps 20
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from collections import defaultdict

import torch
from lightning.pytorch import Callback
from torch.profiler import ProfilerActivity, profile, schedule

import train_bench as tb


def _op_times(prof: profile, cuda: bool, steps: int) -> tuple[dict[str, float], float]:
    """Microseconds per step by op name (device time on CUDA, self CPU time otherwise), and
    the wall time per step (the profiler's ``ProfilerStep`` ranges)."""
    out: dict[str, float] = defaultdict(float)
    wall = 0.0
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep"):
            wall += event.cpu_time_total / steps
            continue
        value = event.self_device_time_total if cuda else event.self_cpu_time_total
        if value > 0:
            out[event.key] += value / steps
    return out, wall


class _ProfilerStep(Callback):
    def __init__(self, prof: profile) -> None:
        self.prof = prof

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.prof.step()


def compare(ns: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor, top: int) -> str:
    cuda = ns.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    active = ns.steps
    times, walls = {}, {}
    for name in ("a", "b"):
        # wait + warmup + active = the run's steps: with --warmup under 2 the profiler's
        # warm-up took profiled steps, and the times of fewer steps were divided by active
        warmup = min(ns.warmup, 2)
        sched = schedule(wait=ns.warmup - warmup, warmup=warmup, active=active, repeat=1)
        with profile(activities=activities, schedule=sched) as prof:
            if name == "a":
                tb.plain_loop(images, labels, ns, on_step=prof.step)
            else:
                tb.lightning_run(images, labels, ns, extra_callbacks=[_ProfilerStep(prof)])
        times[name], walls[name] = _op_times(prof, cuda, active)
    keys = sorted(set(times["a"]) | set(times["b"]),
                  key=lambda k: -abs(times["b"].get(k, 0.0) - times["a"].get(k, 0.0)))
    unit = "device" if cuda else "self-CPU"
    busy = {k: sum(times[k].values()) for k in times}
    lines = [f"per-step {unit} time, us (over {active} profiled steps)",
             f"total: (a) {busy['a']:,.0f}  (b) {busy['b']:,.0f}",
             f"wall per step (profiled): (a) {walls['a']:,.0f}  (b) {walls['b']:,.0f}; busy "
             f"fraction (a) {busy['a'] / max(walls['a'], 1e-9):.2f}  "
             f"(b) {busy['b'] / max(walls['b'], 1e-9):.2f}  (near 1: the device is the limit; "
             "well below: the host is)",
             "| op / kernel | (a) | (b) | (b) - (a) |", "|---|---|---|---|"]
    for key in keys[:top]:
        a, b = times["a"].get(key, 0.0), times["b"].get(key, 0.0)
        lines.append(f"| {key[:90]} | {a:,.1f} | {b:,.1f} | {b - a:+,.1f} |")
    return "\n".join(lines)


def host_profile(ns: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor,
                 classes: int, epochs: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    out = tb.lightning_run(images, labels, ns, nc=True, epochs=epochs, num_classes=classes)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    print(f"epoch {out['epoch_s']:.3f} s (under cProfile), K={classes}", file=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats("hug_lightning", top)
    return text.getvalue()


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--compare", action="store_true", help="(a) vs (b), op by op")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps (--compare)")
    parser.add_argument("--warmup", type=int, default=15, help="unprofiled steps (--compare)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" and not args.toy
    ns = argparse.Namespace(device="cuda" if cuda else "cpu", toy=args.toy, small_width=0,
                            steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                            workers=0, compile=False, compile_loss=False, bf16=cuda,
                            channels_last=cuda)
    if args.toy:
        ns.batch_size, ns.steps, ns.warmup = 32, 3, 3
        args.num_images, args.epochs = 256, 2
    torch.backends.cudnn.benchmark = cuda
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    classes = 10 if args.compare else args.classes
    labels = torch.randint(0, classes, (args.num_images,), generator=gen)
    if args.compare:
        text = compare(ns, images, labels, args.top)
    else:
        text = host_profile(ns, images, labels, classes, args.epochs, args.top)
    print(text)
    return text


if __name__ == "__main__":
    main()
