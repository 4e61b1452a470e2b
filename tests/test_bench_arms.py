"""train_bench's arms run the same work: steps, timed steps, optimizer, channels-last weights,
and no bench-only callback in a timed step that the plain loop (a) does not have."""

from __future__ import annotations

import argparse

import torch
from lightning.pytorch import Callback

from conftest import load_bench


def test_every_arm_steps_alike_with_the_same_settings(monkeypatch):
    bench = load_bench("train_bench")
    seen: list[dict] = []

    def counting_sgd(params):
        params = list(params)
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        if len(tensors) == 1:  # the module constructor's probe (factories.check_optimizer)
            return torch.optim.SGD(params, lr=0.1)
        record = {"steps": 0, "channels_last": all(
            p.is_contiguous(memory_format=torch.channels_last) for p in tensors if p.dim() == 4)}
        seen.append(record)

        class Counting(torch.optim.SGD):
            def step(self, closure=None):
                record["steps"] += 1
                return super().step(closure)

        return Counting(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    timers: list = []

    class Timer(bench.StepTimer):
        def __init__(self, *args):
            super().__init__(*args)
            timers.append(self)

    class Callbacks(Callback):
        def on_train_start(self, trainer, pl_module):
            seen[-1]["callbacks"] = sorted(type(c).__name__ for c in trainer.callbacks)

    monkeypatch.setattr(bench, "optimizer_factory", counting_sgd)
    monkeypatch.setattr(bench, "StepTimer", Timer)
    args = argparse.Namespace(device="cpu", toy=True, overhead=False, small_width=0, steps=4,
                              warmup=2, batch_size=8, workers=0, compile=False,
                              compile_loss=False, bf16=False, channels_last=True)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)  # 4 steps per epoch
    labels = torch.arange(32) % 10
    bench.plain_loop(images, labels, args)
    for minimal in (False, True):
        bench.lightning_run(images, labels, args, minimal=minimal, extra_callbacks=[Callbacks()])
    assert [r["steps"] for r in seen] == [6, 6, 6]  # warm-up + timed, across an epoch's end
    assert all(r["channels_last"] for r in seen)
    assert [t.steps for t in timers] == [4, 4]
    assert "EpochTimer" not in seen[1]["callbacks"] + seen[2]["callbacks"]


def test_every_arm_collects_the_earlier_arms_garbage_before_its_steps(monkeypatch):
    """Arms run one after another in one process, so a full collection of the earlier fits'
    garbage (0.2 s on the CPU) fell inside whichever arm's timed steps triggered it: (b-cli)'s
    first repeat of the overhead probe ran at 1,415 images/s against 2,337 in the second. Each
    arm now collects before its steps (automatic collection is off here: only those count)."""
    import gc
    import time
    bench = load_bench("train_bench")
    events: list[tuple[str, float]] = []

    def on_gc(phase, info):
        if phase == "stop" and info["generation"] == 2:
            events.append(("collect", time.perf_counter()))

    def first_step_sgd(params):
        class Marking(torch.optim.SGD):
            def step(self, closure=None):
                events.append(("step", time.perf_counter()))
                return super().step(closure)
        return Marking(params, lr=0.1)

    class MarkingTimer(bench.StepTimer):  # (b-cli) takes its optimizer from the config
        def on_train_batch_start(self, trainer, *rest):
            events.append(("step", time.perf_counter()))
            super().on_train_batch_start(trainer, *rest)

    monkeypatch.setattr(bench, "optimizer_factory", first_step_sgd)
    monkeypatch.setattr(bench, "StepTimer", MarkingTimer)
    args = argparse.Namespace(device="cpu", toy=False, overhead=True, small_width=0, steps=2,
                              warmup=1, batch_size=4, workers=0, compile=False,
                              compile_loss=False, bf16=False, channels_last=False)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(64) % 10
    arms = {"a": lambda: bench.plain_loop(images, labels, args),
            "b": lambda: bench.lightning_run(images, labels, args),
            "b0": lambda: bench.lightning_run(images, labels, args, minimal=True),
            "bcli": lambda: bench.cli_measure(images, labels, args)}
    gc.callbacks.append(on_gc)
    gc.disable()
    try:
        for name, arm in arms.items():
            events.clear()
            arm()
            kinds = [kind for kind, _ in events]
            assert "collect" in kinds[:kinds.index("step")], name
    finally:
        gc.enable()
        gc.callbacks.remove(on_gc)
