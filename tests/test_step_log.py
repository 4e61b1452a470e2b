"""Training-step logging without host synchronisation (``hug_lightning.step_log``).

The reference is Lightning itself: the same module logging its step values with ``self.log``
(what ``ClassifierModule`` did before) must give the loggers, the progress bar and
``callback_metrics`` the same values at the same steps. The synchronisation check counts the
tensor reads (``.item()``, ``float(t)``, ...) of the training loop on the CPU; the GPU version
(``tests/test_gpu.py``) uses CUDA's own detector.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from hug_lightning.backbones import SmallConvNet
from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.module import ClassifierModule
from hug_lightning.step_log import StepLog

K = 4


class RecordingLogger(Logger):
    """Keeps every (step, key, value) written, and counts ``save`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str, float]] = []
        self.saves = 0

    name = property(lambda self: "rec")
    version = property(lambda self: "0")

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records += [(step, key, float(value)) for key, value in metrics.items()]

    def save(self) -> None:
        self.saves += 1

    def train_step_records(self) -> list[tuple[int, str, float]]:
        steps = {s for s, k, _ in self.records if k == "train/loss"}
        return sorted(r for r in self.records if r[0] in steps and r[1] != "train/acc"
                      and not r[1].startswith(("geometry/", "nc/")))


class LoggedByLightning(ClassifierModule):
    """The reference: the same step values through ``self.log`` (Lightning's result
    collection), as ClassifierModule logged them before StepLog."""

    def log_step_values(self, out):
        self.log("train/loss", out["loss"].detach(), prog_bar=True)
        for name, value in (out.get("terms") or {}).items():
            self.log(f"train/{name}", value)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])


def _data(n: int = 80) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % K
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(module_cls, head, logger, tmp_path, prepare=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    module = module_cls(backbone=SmallConvNet(width=4), head=head, num_classes=K,
                        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    if prepare is not None:
        prepare(module)
    options = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=7,
                   limit_val_batches=2, logger=logger, log_every_n_steps=3,
                   enable_checkpointing=False, enable_model_summary=False,
                   num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    options.update(kwargs)
    trainer = Trainer(**options)
    trainer.fit(module, _data(), _data(16))
    return trainer


HEADS = {"ce": CrossEntropyHead,
         "hug": lambda k, d: HUGHead(k, d, alpha=1.0, beta=4.0, intra_power=2)}


@pytest.mark.parametrize("head, accumulate", [("ce", 1), ("hug", 1), ("ce", 2)])
def test_step_values_equal_what_lightning_logs(head, accumulate, tmp_path):
    """Same steps (log_every_n_steps 3 across two 7-batch epochs), keys (loss, the HUG terms,
    lr, epoch) and values; same progress bar and callback_metrics at the end. With gradient
    accumulation Lightning writes once per optimizer step (the window's last batch)."""
    ours, ref = RecordingLogger(), RecordingLogger()
    t_ours = _fit(ClassifierModule, HEADS[head], ours, tmp_path / "a",
                  accumulate_grad_batches=accumulate)
    t_ref = _fit(LoggedByLightning, HEADS[head], ref, tmp_path / "b",
                 accumulate_grad_batches=accumulate)
    got, want = ours.train_step_records(), ref.train_step_records()
    assert [r[:2] for r in got] == [r[:2] for r in want]
    assert [r[2] for r in got] == pytest.approx([r[2] for r in want], rel=1e-6)
    # 7 batches per epoch: optimizer steps 1-7 per epoch (1-4 with accumulate 2, the last
    # window short)
    assert sorted({s for s, _, _ in want}) == ([2, 5, 8, 11] if accumulate == 1 else [2, 5])
    if head == "hug":
        assert {"train/inter", "train/intra"} <= {k for _, k, _ in got}
    assert "train/loss" in t_ref.progress_bar_metrics
    assert t_ours.progress_bar_metrics["train/loss"] == pytest.approx(
        t_ref.progress_bar_metrics["train/loss"], rel=1e-6)
    for key in ("train/loss", "train/lr"):
        assert float(t_ours.callback_metrics[key]) == pytest.approx(
            float(t_ref.callback_metrics[key]), rel=1e-6)
    assert ours.saves >= 4  # as Lightning saves after each write (CSVLogger writes its file)


# --------------------------------------------------------------------------- no host reads
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
#: reads that only happen on the CPU (each skips its check for accelerator tensors), or of a
#: host copy: (file, function) of the frame that reads
CPU_ONLY = {("splits.py", "out_of_range_label"),  # check_labels: CPU labels only
            ("guards.py", "check"),  # FiniteLossGuard: its CPU branch
            ("collapse.py", "update"),  # NCFeatureStats: checks CPU labels only
            ("hug.py", "_validate"),  # HUGHead: checks CPU labels only (unless asked to)
            ("step_log.py", "values")}  # StepLog reads its pinned host copy


class ReadRecorder(Callback):
    """Records the tensor reads between the start of batch ``first`` and of batch ``last``
    (everything Lightning does after a batch included), by the reading frame."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last, self.on = first, last, False
        self.reads: Counter = Counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = self.first <= batch_idx < self.last

    def on_train_epoch_end(self, trainer, pl_module):
        self.on = False


@pytest.fixture
def read_recorder(monkeypatch):
    recorder = ReadRecorder(first=2, last=9)
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, __original=original, __name=name, **kwargs):
            if recorder.on:
                frames = traceback.extract_stack(limit=3)[:-1]
                frame = frames[-1]
                recorder.reads[(__name, os.path.basename(frame.filename), frame.name,
                                frame.lineno)] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return recorder


@pytest.mark.parametrize("head", ["ce", "hug"])
def test_training_steps_read_no_tensor_value(head, read_recorder, tmp_path):
    """Batches 2-8 of a fit logging every 2 steps, with the progress bar and the NC monitor:
    no tensor value read outside the CPU-only checks. Before StepLog, Lightning read the
    logged loss with ``.item()`` after every batch following the first logged one."""
    from hug_lightning.metrics.callback import NeuralCollapseMonitor
    _fit(ClassifierModule, HEADS[head], RecordingLogger(), tmp_path, max_epochs=1,
         limit_train_batches=10, log_every_n_steps=2, enable_progress_bar=True,
         callbacks=[read_recorder, NeuralCollapseMonitor(val=False, buffer_batches=2)])
    assert read_recorder.reads, "the recorder saw nothing: the check would pass vacuously"
    outside = {site: n for site, n in read_recorder.reads.items() if site[1:3] not in CPU_ONLY}
    assert outside == {}, f"tensor reads in the training steps: {outside}"


def test_reads_of_self_log_prog_bar_are_detected(read_recorder, tmp_path):
    """The detector does see Lightning's per-batch ``.item()`` of a progress-bar value."""
    _fit(LoggedByLightning, CrossEntropyHead, RecordingLogger(), tmp_path, max_epochs=1,
         limit_train_batches=10, log_every_n_steps=2, enable_progress_bar=False,
         callbacks=[read_recorder])
    lightning_reads = [site for site in read_recorder.reads if site[1:3] not in CPU_ONLY]
    assert any(site[0] == "item" for site in lightning_reads), read_recorder.reads


# --------------------------------------------------------------------------- StepLog itself
def test_floats_and_tensors_are_written_at_their_step(tmp_path):
    """A stand-in trainer: one write per record, floats as given, tensors read, the epoch
    added; ``poll`` and ``flush`` on an empty queue write nothing."""
    from types import SimpleNamespace

    logger = RecordingLogger()
    trainer = SimpleNamespace(loggers=[logger], world_size=1, current_epoch=3, global_step=41,
                              callback_metrics={}, logged_metrics={}, progress_bar_metrics={})
    log = StepLog()
    log.record(trainer, {"train/loss": torch.tensor(0.25), "train/lr": 0.1},
               prog_bar=("train/loss",))
    log.poll(trainer)
    log.flush(trainer)
    assert sorted(logger.records) == [(41, "epoch", 3.0), (41, "train/loss", 0.25),
                                      (41, "train/lr", 0.1)]
    assert trainer.progress_bar_metrics == {"train/loss": 0.25}
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(0.1)


def test_tensors_off_the_losss_device_are_read_as_numbers():
    """A learning rate kept as a CPU tensor next to a loss on another device (meta here, a
    GPU in practice) is not stacked with it (that would fail, or copy it to the device)."""
    from types import SimpleNamespace

    logger = RecordingLogger()
    trainer = SimpleNamespace(loggers=[logger], world_size=1, current_epoch=0, global_step=3,
                              callback_metrics={}, logged_metrics={}, progress_bar_metrics={})
    log = StepLog()
    stacked = []
    log._to_host = lambda vector: (stacked.append(vector) or torch.tensor([0.5]), None)
    log.record(trainer, {"train/loss": torch.tensor(0.5, device="meta"),
                         "train/lr": torch.tensor(0.1)})
    assert len(stacked) == 1 and stacked[0].shape == (1,) and stacked[0].device.type == "meta"
    assert sorted(logger.records) == [(3, "epoch", 0.0), (3, "train/loss", 0.5),
                                      (3, "train/lr", pytest.approx(0.1))]


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    from types import SimpleNamespace

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    barriers = []
    original = dist.barrier
    dist.barrier = lambda *a, **k: barriers.append(1) or original(*a, **k)
    logger = RecordingLogger()
    trainer = SimpleNamespace(loggers=[logger], world_size=2, current_epoch=0, global_step=7,
                              callback_metrics={}, logged_metrics={}, progress_bar_metrics={})
    StepLog().record(trainer, {"train/loss": torch.tensor(1.0 + 2.0 * rank),
                               "train/intra": torch.tensor(float(rank))}, sync_dist=True)
    dist.barrier = original
    torch.save({"records": sorted(logger.records), "barriers": len(barriers)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_sync_dist_is_the_mean_over_processes_without_a_barrier(tmp_path):
    """2 gloo processes with losses 1 and 3: both write 2; no ``barrier`` (Lightning's
    ``strategy.reduce`` calls one first, which blocks the host under NCCL)."""
    from _ddp_helpers import start_workers

    start_workers(_ddp_worker, (str(tmp_path / "init"), str(tmp_path)))
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["barriers"] == 0
        assert out["records"] == [(7, "epoch", 0.0), (7, "train/intra", 0.5),
                                  (7, "train/loss", 2.0)]
