"""Tests written from a mutation audit of module.py, optim.py, guards.py and checkpointing.py.

Every expected value is computed here by hand (known predictions, the schedule's formula,
known save steps), not by the code under test. Each test runs a tiny CPU fit or none.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _models import LinearBackbone
from hug_lightning.backbones import SmallConvNet
from hug_lightning.checkpointing import (LastCheckpoint, find_last_checkpoint,
                                         recorded_best_checkpoint)
from hug_lightning.guards import FiniteLossGuard, NonFiniteLossError
from hug_lightning.heads import CrossEntropyHead
from hug_lightning.module import ClassifierModule
from hug_lightning.optim import WarmupCosineLR

K = 4  # classes; the features are 5 * one_hot(label), so the head's weights set predictions
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


class Passthrough(nn.Module):
    """A parameter-free backbone: the input vector is the feature vector."""

    num_features = K

    def forward(self, x):
        return x


class RecordingLogger(Logger):
    """Keeps every logged (step, name, value)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str, float]] = []

    @property
    def name(self) -> str:
        return "rec"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.records.append((step, key, float(value)))

    def values(self, key: str) -> list[float]:
        return [v for _, k, v in self.records if k == key]


def _loader(batch_size: int = 4) -> DataLoader:
    x = 5.0 * nn.functional.one_hot(LABELS, K).float()
    return DataLoader(TensorDataset(x, LABELS), batch_size=batch_size, shuffle=False)


def _set_predictions(head: CrossEntropyHead, pred: list[int]) -> None:
    """Make the head predict class ``pred[y]`` for every sample of class ``y``."""
    with torch.no_grad():
        w = torch.full((K, K), 0.1)
        for y, p in enumerate(pred):
            w[p, y] = 1.0
        head.fc.weight.copy_(w)
        head.fc.bias.zero_()


def _trainer(tmp_path: Path, logger=None, callbacks=(), **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=2, logger=logger or False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=1, num_sanity_val_steps=0,
                   default_root_dir=str(tmp_path), callbacks=list(callbacks))
    options.update(kwargs)
    return Trainer(**options)


def _frozen_module(**kwargs) -> ClassifierModule:
    """lr 0: the weights move only when a callback sets them."""
    return ClassifierModule(backbone=Passthrough(), head=CrossEntropyHead, num_classes=K,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.0), **kwargs)


# predictions per true class (index) and the accuracy they give on LABELS
ALL_RIGHT = [0, 1, 2, 3]          # 1.0
THREE_QUARTERS = [0, 1, 2, 0]     # 0.75
HALF = [0, 1, 3, 2]               # 0.5
QUARTER = [0, 2, 3, 1]            # 0.25


class ScriptedPredictions(Callback):
    """Training epoch e predicts with train[e]; validation epoch e with val[e]; the sanity
    check with `sanity`."""

    def __init__(self, train, val, sanity=ALL_RIGHT) -> None:
        self.train, self.val, self.sanity = train, val, sanity

    def on_train_epoch_start(self, trainer, pl_module):
        _set_predictions(pl_module.head, self.train[trainer.current_epoch])

    def on_validation_epoch_start(self, trainer, pl_module):
        pred = self.sanity if trainer.sanity_checking else self.val[trainer.current_epoch]
        _set_predictions(pl_module.head, pred)


def test_train_accuracy_is_correct_over_seen_and_restarts_every_epoch(tmp_path):
    """Kills: numerator/denominator swapped, counts not reset per epoch, batches counted
    instead of samples."""
    logger = RecordingLogger()
    script = ScriptedPredictions(train=[THREE_QUARTERS, QUARTER], val=[HALF, HALF])
    trainer = _trainer(tmp_path, logger, [script])
    trainer.fit(_frozen_module(), _loader(), _loader())
    assert logger.values("train/acc") == pytest.approx([0.75, 0.25], abs=1e-12)


def test_val_acc_best_is_the_running_max_and_ignores_the_sanity_check(tmp_path):
    """Kills: a running minimum instead of maximum, the sanity check counted as an epoch."""
    logger = RecordingLogger()
    script = ScriptedPredictions(train=[HALF] * 3, val=[HALF, QUARTER, THREE_QUARTERS],
                                 sanity=ALL_RIGHT)  # the sanity check must not count
    trainer = _trainer(tmp_path, logger, [script], max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(_frozen_module(), _loader(), _loader())
    assert logger.values("val/acc") == pytest.approx([0.5, 0.25, 0.75], abs=1e-12)
    assert logger.values("val/acc_best") == pytest.approx([0.5, 0.5, 0.75], abs=1e-12)


class NaNAt(Callback):
    """Poison the head (NaN loss) before the training batch at (epoch, batch_idx)."""

    def __init__(self, epoch: int, batch_idx: int) -> None:
        self.epoch, self.batch_idx = epoch, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch_idx):
            with torch.no_grad():
                pl_module.head.fc.bias.fill_(float("nan"))


def test_nonfinite_error_names_the_global_step_not_the_batch_index(tmp_path):
    """2 batches per epoch: epoch 1's first batch is global step 2, batch_idx 0."""
    script = ScriptedPredictions(train=[HALF, HALF], val=[HALF, HALF])
    trainer = _trainer(tmp_path, None, [script, NaNAt(epoch=1, batch_idx=0)])
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, global step 2: loss=nan"):
        trainer.fit(_frozen_module(), _loader(), _loader())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_guard_catches_inf_as_well_as_nan(value):
    guard = FiniteLossGuard("raise")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, global step 17: loss=-?(inf|nan)"):
        guard.check(torch.tensor(value), {}, 3, 17)
    assert guard.check(torch.tensor(1.5), {}, 3, 18) is True
    skip = FiniteLossGuard("skip")
    assert skip.check(torch.tensor(value), {}, 0, 0) is False and skip.skipped == 1
    assert skip.check(torch.tensor(0.0), {}, 0, 1) is True and skip.skipped == 1


def test_warmup_below_one_is_a_fraction_and_one_or_more_is_steps():
    opt = lambda: torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)  # noqa: E731
    assert WarmupCosineLR(opt(), warmup=0.25, total_steps=40).warmup_steps == 10
    one = WarmupCosineLR(opt(), warmup=1, total_steps=40, start_factor=0.1)
    assert one.warmup_steps == 1
    assert one.factor(0) == pytest.approx(0.1) and one.factor(1) == pytest.approx(1.0)
    assert WarmupCosineLR(opt(), warmup=3, total_steps=40).warmup_steps == 3


class LrEveryStep(Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_module_steps_the_schedule_every_batch_over_the_whole_run(tmp_path):
    """2 epochs x 4 batches: WarmupCosineLR sees total_steps = 8 and moves every batch; the
    logged train/lr is the body's (first group's) rate, the head's is scaled."""
    total, warmup, start, low, lr, scale = 8, 2, 0.1, 0.2, 0.4, 0.5

    def factor(t):
        if t < warmup:
            return start + (1 - start) * t / warmup
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    module = ClassifierModule(
        backbone=LinearBackbone(K), head=CrossEntropyHead, num_classes=K, head_lr_scale=scale,
        optimizer=lambda p: torch.optim.SGD(p, lr=lr),
        scheduler=lambda o: WarmupCosineLR(o, warmup=warmup, start_factor=start,
                                           min_factor=low))
    seen, logger = LrEveryStep(), RecordingLogger()
    trainer = _trainer(tmp_path, logger, [seen])
    trainer.fit(module, _loader(batch_size=2), _loader())
    by_name = {g["name"]: i for i, g in enumerate(trainer.optimizers[0].param_groups)}
    expected = [lr * factor(t) for t in range(total)]
    assert [s[by_name["body"]] for s in seen.lrs] == pytest.approx(expected, rel=1e-9)
    assert [s[by_name["head"]] for s in seen.lrs] == pytest.approx(
        [scale * v for v in expected], rel=1e-9)
    assert by_name["body"] == 0  # train/lr logs param_groups[0] (float32)
    assert logger.values("train/lr") == pytest.approx(expected, rel=1e-6)


class SavedSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize("max_steps, expected", [(-1, [3, 4, 6, 8]), (7, [3, 4, 6, 7])])
def test_last_checkpoint_step_and_epoch_saves(tmp_path, max_steps, expected):
    """every_n_train_steps=3, 4 batches per epoch, 2 epochs: saves at steps 3 and 6, at each
    epoch end (4, 8) and at the end of training (7 when max_steps stops mid-epoch), each
    state once; last.ckpt holds the final step."""
    saved = SavedSteps()
    last = LastCheckpoint(every_n_train_steps=3)
    last.dirpath = str(tmp_path / "ckpt")
    script = ScriptedPredictions(train=[HALF, HALF], val=[HALF, HALF])
    trainer = _trainer(tmp_path, None, [script, last, saved], enable_checkpointing=True,
                       max_steps=max_steps, limit_val_batches=0)
    trainer.fit(_frozen_module(), _loader(batch_size=2))
    assert saved.steps == expected
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert state["global_step"] == expected[-1]


def test_fast_dev_run_writes_no_last_checkpoint(tmp_path):
    """Found by an audit: ``fast_dev_run`` turns checkpointing off, but the step-mode and
    end-of-training saves of ``LastCheckpoint`` (``--last.every_n_train_steps N``) went past
    Lightning's check; with the dummy logger of a fast_dev_run their folder is
    ``./checkpoints``, so a quick check left a ``last.ckpt`` in the working directory."""
    last = LastCheckpoint(every_n_train_steps=1)
    last.dirpath = str(tmp_path / "ckpt")
    trainer = _trainer(tmp_path, None, [last], enable_checkpointing=True, fast_dev_run=3)
    trainer.fit(_frozen_module(), _loader(batch_size=2))
    assert trainer.global_step == 3 and not (tmp_path / "ckpt").exists()


def test_find_last_checkpoint_picks_the_newest_run(tmp_path):
    paths = []
    for i, version in enumerate(["version_0", "version_1", "version_2"]):
        path = tmp_path / "exp" / version / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        paths.append(path)
    for path, mtime in zip(paths, [2_000_000, 3_000_000, 1_000_000]):
        os.utime(path, (mtime, mtime))
    assert find_last_checkpoint(tmp_path, "exp") == paths[1]
    assert find_last_checkpoint(tmp_path, "other") is None


def test_recorded_best_checkpoint_as_recorded_or_next_to_a_moved_last(tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    last = run / "last.ckpt"

    def write(best_path: str) -> None:
        torch.save({"callbacks": {"ModelCheckpoint{'monitor': 'val/acc'}":
                                  {"best_model_path": best_path}}}, last)

    elsewhere = tmp_path / "elsewhere" / "epoch=3.ckpt"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    write(str(elsewhere))  # recorded path exists (even away from last.ckpt)
    assert recorded_best_checkpoint(last) == elsewhere
    (run / "epoch=1.ckpt").write_bytes(b"x")
    write("/old/place/run/checkpoints/epoch=1.ckpt")  # the run was moved
    assert recorded_best_checkpoint(last) == run / "epoch=1.ckpt"
    write("/old/place/run/checkpoints/epoch=9.ckpt")  # gone
    assert recorded_best_checkpoint(last) is None


def test_channels_last_module_feeds_the_backbone_channels_last_images():
    module = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead,
                              channels_last=True)
    seen = []
    module.backbone.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    module(torch.randn(2, 3, 32, 32))
    assert seen == [True]


def test_no_weight_decay_bias_exempts_every_bias_and_only_biases():
    """Linear biases too (embedding, cross-entropy head), not only BatchNorm's."""
    model = ClassifierModule(backbone=SmallConvNet(width=4), head=CrossEntropyHead,
                             embedding_dim=8, no_weight_decay=["bias"],
                             optimizer=lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-3))
    optimizer = model.configure_optimizers()
    named = dict(model.named_parameters())
    biases = {id(p) for n, p in named.items() if n.rsplit(".", 1)[-1] == "bias"}
    assert {id(named["head.fc.bias"]), id(named["embedding.0.bias"])} <= biases
    exempt = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0
              for p in g["params"]}
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 1e-3
               for p in g["params"]}
    assert exempt == biases and decayed == {id(p) for p in named.values()} - biases


def test_running_stats_snapshot_restores_the_stats_of_the_latest_save():
    """A skip puts back the statistics from just before the skipped batch, not older ones."""
    from hug_lightning.guards import RunningStatsSnapshot
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    snap = RunningStatsSnapshot(net)
    bn = net[1]
    snap.save()
    net(torch.randn(8, 3))  # a good batch
    snap.save()
    expected = [b.clone() for b in bn.buffers()]
    net(torch.full((8, 3), float("nan")))  # a poisoned batch, then skipped
    snap.restore()
    for got, want in zip(bn.buffers(), expected):
        assert torch.equal(got, want)


def test_nonfinite_skip_under_ddp_is_an_error_at_the_start_of_fit():
    """Lightning stops a DDP run when a step returns None: 'skip' crashed at the first NaN."""
    from types import SimpleNamespace

    from hug_lightning.backbones import SmallConvNet
    from hug_lightning.module import ClassifierModule
    module = ClassifierModule(backbone=SmallConvNet(width=4), nonfinite_loss="skip")
    module._trainer = SimpleNamespace(world_size=2, datamodule=None, strategy=None)
    with pytest.raises(ValueError, match="nonfinite_loss=skip works in one process only"):
        module.setup("fit")
    module.setup("test")  # evaluation never skips: fine
    module._trainer.world_size = 1
    module.setup("fit")
