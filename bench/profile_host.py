"""Where the host (Python) time of a training epoch goes: cProfile of a short ``fit``.

On a GPU the training loop is often host-bound (the CPU cannot launch kernels as fast as the GPU
runs them), so the Python cost per step and at epoch ends is what separates Lightning from a
plain loop. This runs ``bench/train_bench.py``'s device-resident setup with the NC collectors on
for a few epochs under cProfile and prints the functions with the most own time and the
project's functions by cumulative time.

    python bench/profile_host.py --device cuda --classes 100 --epochs 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

import train_bench as tb


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--toy", action="store_true")
    args = parser.parse_args(argv)
    ns = argparse.Namespace(device=args.device, toy=args.toy, small_width=0, steps=0, warmup=0,
                            batch_size=args.batch_size, workers=0, compile=False,
                            bf16=args.device == "cuda", channels_last=args.device == "cuda")
    if args.toy:
        ns.device, ns.bf16, ns.channels_last, ns.batch_size = "cpu", False, False, 32
        args.num_images, args.epochs = 256, 2
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.num_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, args.classes, (args.num_images,), generator=gen)
    profile = cProfile.Profile()
    profile.enable()
    out = tb.lightning_run(images, labels, ns, nc=True, epochs=args.epochs,
                           num_classes=args.classes)
    profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    print(f"epoch {out['epoch_s']:.3f} s (under cProfile), K={args.classes}", file=text)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats("hug_lightning", args.top)
    print(text.getvalue())
    return text.getvalue()


if __name__ == "__main__":
    main()
