"""Forward+backward time of cross-entropy, the HUG variants and a per-class-loop HUG reference.

Usage::

    python bench/loss_bench.py --device cuda            # K in {10,100,1000}, B in {128,512}, d=512
    python bench/loss_bench.py --quick                  # small sizes, a few seconds on a CPU
    python bench/loss_bench.py --device cuda --compile  # also a torch.compile'd HUG-MHE

Every timing is the median over ``--repeats`` runs (after warm-up) of one forward+backward pass
with gradients into the features (as from a backbone) and into the classifier/proxies, measured
in the same process (CUDA events on GPU). The "loop" row reproduces the released code's style:
a Python loop over ``torch.unique(target)`` for the intra term and coincident proxies dropped by
boolean indexing (both sync with the device); it is the baseline the vectorized loss replaces.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.losses import hug_loss


def loop_reference(h: Tensor, W: Tensor, y: Tensor) -> Tensor:
    """HUG-MHE as the released code computes it (loop over classes, host syncs)."""
    x = h / h.norm(dim=1, keepdim=True)
    w = W / W.norm(dim=1, keepdim=True)
    d2 = 2 - 2 * (w @ w.T)
    iu = torch.triu_indices(W.shape[0], W.shape[0], 1, device=W.device)
    pair = d2[iu[0], iu[1]]
    inter = (1.0 / pair[pair > 0]).mean()
    classes = torch.unique(y)
    intra = h.new_zeros(())
    for c in classes:
        xc = x[y == c]
        intra = intra + (xc - w[c].detach()).norm(dim=1).mean()
    return inter + intra / len(classes)


def time_ms(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def bench_case(K: int, B: int, d: int, args: argparse.Namespace) -> dict[str, float]:
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(B, d, generator=g).to(dev).requires_grad_()
    W = torch.randn(K, d, generator=g).to(dev).requires_grad_()
    b = torch.zeros(K, device=dev, requires_grad=True)
    y = torch.randint(0, K, (B,), generator=g).to(dev)
    params = (h, W, b)
    with torch.no_grad():  # the loop must compute the vectorized loss, or its timing means nothing
        loop, vectorized = loop_reference(h, W, y), hug_loss(h, W, y).total
    if not torch.allclose(loop, vectorized, rtol=1e-4, atol=1e-6):
        raise AssertionError(f"K={K} B={B}: loop reference {loop.item()} != HUG-MHE "
                             f"{vectorized.item()}")

    def step(loss_fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            for p in params:
                p.grad = None
            loss_fn().backward()

        return run

    fns: dict[str, Callable[[], Tensor]] = {
        "ce": lambda: F.cross_entropy(F.linear(h, W, b), y),
        "mhe": lambda: hug_loss(h, W, y).total,
        "mhs": lambda: hug_loss(h, W, y, variant="mhs").total,
        "mgd": lambda: hug_loss(h, W, y, variant="mgd").total,
        "loop": lambda: loop_reference(h, W, y),
    }
    if args.compile:
        try:
            compiled = torch.compile(lambda h, W, y: hug_loss(h, W, y).total)
            fns["mhe_compiled"] = lambda: compiled(h, W, y)
            step(fns["mhe_compiled"])()  # compile outside the timing
        except Exception as exc:  # noqa: BLE001 (report, keep benchmarking)
            print(f"torch.compile failed for K={K} B={B}: {type(exc).__name__}: {exc}")
            fns.pop("mhe_compiled", None)
    row: dict[str, float] = {"K": K, "B": B, "d": d}
    for name, fn in fns.items():
        row[f"{name}_ms"] = time_ms(step(fn), dev, args.repeats, args.warmup)
    return row


def check(args: argparse.Namespace) -> None:
    """Device result vs float64 CPU for every variant; on CUDA, forward+backward with no sync."""
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(256, 64, generator=g, dtype=torch.float64), torch.randn(100, 64, generator=g)
    y = torch.randint(0, 50, (256,), generator=g)
    for variant in ("mhe", "mhs", "mgd"):
        ref = hug_loss(h, W.double(), y, variant=variant).total
        out = hug_loss(h.float().to(dev), W.to(dev), y.to(dev), variant=variant).total
        err = abs(out.item() - ref.item()) / abs(ref.item())
        print(f"check {variant}: {args.device} float32 vs cpu float64 relative error {err:.2e}")
        assert err < 1e-4, err
    if dev.type == "cuda":
        head = HUGHead(100, 64).to(dev)
        hd, yd = h.float().to(dev).requires_grad_(), y.to(dev)
        cases: dict[str, Callable[[], Tensor]] = {
            v: (lambda v=v: hug_loss(hd, head.proxies, yd, variant=v).total)
            for v in ("mhe", "mhs", "mgd")
        }
        cases["HUGHead bf16"] = lambda: head.forward_train(hd.bfloat16(), yd).loss
        for name, fn in cases.items():
            fn().backward()  # warm-up (library handles, caches)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # raises on any device-to-host sync
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fn()
                loss.backward()
                verdict = "no device sync"
            except RuntimeError as exc:
                verdict = f"SYNCS: {str(exc).splitlines()[0]}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"check {name}: forward+backward {verdict}")


def train_step_ms(K: int, B: int, args: argparse.Namespace) -> dict[str, float]:
    """ResNet-18 (CIFAR stem) SGD step, bf16 autocast on GPU: CE head vs HUG head."""
    import torchvision

    dev = torch.device(args.device)
    x = torch.randn(B, 3, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, K, (B,), device=dev)
    row: dict[str, float] = {"K": K, "B": B}
    for name, head in (("ce", CrossEntropyHead(K, 512)), ("hug", HUGHead(K, 512))):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=10)
        net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
        model = torch.nn.ModuleList([net, head]).to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out = head.forward_train(net(x), y)
            out.loss.backward()
            opt.step()

        row[f"{name}_ms"] = time_ms(step, dev, args.repeats, args.warmup)
    return row


def format_table(rows: list[dict[str, float]], compiled: bool) -> str:
    cols = ["CE", "MHE", "MHS", "MGD", "loop"] + (["MHE compiled"] if compiled else [])
    keys = ["ce", "mhe", "mhs", "mgd", "loop"] + (["mhe_compiled"] if compiled else [])
    head = ["K", "B", "d"] + [f"{c} ms" for c in cols]
    head += ["loop/MHE", "MHE/CE", "MHS/CE", "MGD/CE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(int(r["K"])), str(int(r["B"])), str(int(r["d"]))]
        cells += [f"{r[f'{k}_ms']:.3f}" if f"{k}_ms" in r else "n/a" for k in keys]
        cells += [
            f"{r['loop_ms'] / r['mhe_ms']:.1f}x",
            f"{r['mhe_ms'] / r['ce_ms']:.2f}x",
            f"{r['mhs_ms'] / r['ce_ms']:.2f}x",
            f"{r['mgd_ms'] / r['ce_ms']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per cell (median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before timing")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (CPU smoke)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(HUG-MHE)")
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--check", action="store_true", help="correctness and no-sync check first")
    p.add_argument("--train-step", action="store_true", help="also time a ResNet-18 step")
    p.add_argument("--image-size", type=int, default=32, help="input side for --train-step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: unchanged)")
    args = p.parse_args(argv)
    if args.quick:
        args.classes, args.batch, args.dim = [10, 100], [64], 64
        args.repeats, args.warmup = min(args.repeats, 3), 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Run the benchmark, print a Markdown table and return its rows."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.check:
        check(args)
    rows = [bench_case(K, B, args.dim, args) for K in args.classes for B in args.batch]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"forward+backward, median of {args.repeats} ({dev}, torch {torch.__version__})\n")
    print(format_table(rows, any("mhe_compiled_ms" in r for r in rows)))
    if args.train_step:
        print("\n| K | B | ResNet-18 step CE ms | HUG-MHE ms | HUG/CE |\n|---|---|---|---|---|")
        for K in args.classes:
            r = train_step_ms(K, max(args.batch), args)
            ratio = r["hug_ms"] / r["ce_ms"]
            print(f"| {K} | {r['B']} | {r['ce_ms']:.2f} | {r['hug_ms']:.2f} | {ratio:.3f}x |")
    return rows


if __name__ == "__main__":
    main()
