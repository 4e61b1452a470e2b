"""The stop request agreed by every process at the same batch (hug_lightning.interrupt).

The end-to-end checks (a real 2-process fit signalled at random moments, then resumed) are in
test_reliability.py; these are the fast unit checks of the agreement itself.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from _ddp_helpers import start_workers
from conftest import tiny_args
from datagen import CIFAR10_CLASSES, write_image_folder
from hug_lightning.cli import main
from hug_lightning.experiments.results import read_scalars
from hug_lightning.interrupt import AgreedStop, InterruptCheckpoint

STEPS = 10
#: (rank, step before which the rank's signal handler records a request, signal)
REQUESTS = [(1, 3, "SIGTERM"), (0, 6, "SIGINT")]


def _expected() -> list[str | None]:
    """What every rank must see: a request recorded before step i on any rank is seen by all at
    step i + 1; the strongest (SIGINT over SIGTERM) wins once both are in."""
    out = []
    for step in range(STEPS):
        seen = [name for _, before, name in REQUESTS if before <= step - 1]
        out.append("SIGINT" if "SIGINT" in seen else (seen[0] if seen else None))
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stop = AgreedStop()
    stop.start()
    seen = []
    for step in range(STEPS):
        for who, before, name in REQUESTS:
            if who == rank and before == step:
                stop.request(name)
        seen.append(stop.step())
    stop.finish()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_see_the_same_request_at_the_same_batch(tmp_path):
    start_workers(_worker, (str(tmp_path / "init"), str(tmp_path)))
    expected = _expected()
    assert expected[4] == "SIGTERM" and expected[3] is None and expected[-1] == "SIGINT"
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected, rank


def test_one_process_acts_on_its_own_request_at_once():
    stop = AgreedStop()
    stop.start()  # no process group: nothing to share
    assert not stop.distributed and stop.step() is None
    stop.request("SIGTERM")
    stop.request("SIGINT")  # the first request is kept
    assert stop.step() == "SIGTERM"


def test_the_callback_hands_sigterm_back_to_lightning_after_fit():
    """During fit, Lightning builds its SIGTERM handler from the connector's notifier, which
    the callback replaces, and its per-step broadcast of rank 0's flag (a GPU sync per step
    under NCCL) does nothing; after fit (validate, test) Lightning's own are used again."""
    class Connector:
        received_sigterm = False

        def _sigterm_notifier_fn(self, signum, frame):
            self.received_sigterm = True

    class EpochLoop:
        broadcasts = 0

        def _broadcast_sigterm_tensor(self):
            self.broadcasts += 1

    connector, loop = Connector(), EpochLoop()
    trainer = SimpleNamespace(_signal_connector=connector,
                              fit_loop=SimpleNamespace(epoch_loop=loop))
    cb = InterruptCheckpoint()
    previous = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    cb.on_fit_start(trainer, None)
    try:
        cb.on_train_start(trainer, None)
        loop._broadcast_sigterm_tensor()
        connector._sigterm_notifier_fn(signal.SIGTERM, None)  # what Lightning would call
        assert not connector.received_sigterm and cb.stop.requested == "SIGTERM"
        assert loop.broadcasts == 0
    finally:
        cb.on_fit_end(trainer, None)
        signal.signal(signal.SIGTERM, previous[1])  # Lightning's teardown does this in a fit
    assert signal.getsignal(signal.SIGINT) is previous[0]
    connector._sigterm_notifier_fn(signal.SIGTERM, None)
    loop._broadcast_sigterm_tensor()
    assert connector.received_sigterm and loop.broadcasts == 1


class SigtermAt(Callback):
    """SIGTERM to this process, once, in epoch 1: in validation batch 1 (``where="val"``) or
    at the start of the epoch's last training batch (``where="last"``)."""

    def __init__(self, where: str = "val") -> None:
        self.where, self.sent = where, False

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if (self.where == "val" and not self.sent and not trainer.sanity_checking
                and trainer.current_epoch == 1 and batch_idx == 1):
            self._send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (self.where == "last" and not self.sent and trainer.current_epoch == 1
                and batch_idx == trainer.num_training_batches - 1):
            self._send()


sys.modules["tests_interrupt_callbacks"] = type(sys)("tests_interrupt_callbacks")
sys.modules["tests_interrupt_callbacks"].SigtermAt = SigtermAt


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("intr"), CIFAR10_CLASSES,
                              train_per_class=10, test_per_class=3)


@pytest.mark.parametrize("where", ["val", "last"])
def test_an_interrupt_next_to_validation_keeps_that_validation(small_root, tmp_path, where):
    """SIGTERM during validation, or in the training batch that validation follows: the
    validation runs to its end before the stop (Lightning's loop raised after one validation
    batch, and the resumed run skipped the rest: val/* and the best-checkpoint decision of that
    epoch were lost). Interrupted + resumed = one run: same val/* and nc/val/* values, same
    weights, same best score."""
    def args(log: Path, *extra: str) -> list[str]:
        return tiny_args(small_root, log, "--trainer.deterministic", "true",
                         "--model.init_args.scheduler", "null", "--trainer.limit_train_batches",
                         "1.0", "--trainer.limit_val_batches", "1.0",
                         "--data.init_args.batch_size", "8", "--trainer.max_epochs", "3", *extra)

    main(["fit", *args(tmp_path / "ref")])
    with pytest.raises(SIGTERMException):
        main(["fit", *args(tmp_path / "cut", "--trainer.callbacks+",
                           "tests_interrupt_callbacks.SigtermAt",
                           "--trainer.callbacks.where", where)])
    main(["fit", *args(tmp_path / "cut", "--ckpt_path", "last")])

    def logged(log: Path) -> dict:
        scalars = read_scalars(next(log.glob("cifar10_ce/version_*")))
        return {tag: v for tag, v in scalars.items() if tag.startswith(("val/", "nc/val/"))}

    def final(log: Path) -> dict:
        ckpt = next(log.glob("cifar10_ce/version_*/checkpoints/last.ckpt"))
        return torch.load(ckpt, weights_only=True)

    ref, cut = logged(tmp_path / "ref"), logged(tmp_path / "cut")
    assert "val/acc" in ref and [s for s, _ in ref["val/acc"]] == [9, 19, 29]
    assert cut == ref
    a, b = final(tmp_path / "ref"), final(tmp_path / "cut")
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    best = [[v.get("best_model_score") for k, v in state["callbacks"].items()
             if k.startswith("ModelCheckpoint")] for state in (a, b)]
    assert best[0] == best[1] and best[0][0] is not None


def test_a_new_fit_starts_without_the_previous_fits_request():
    """The same callback object reused for a second ``trainer.fit`` (from Python) must not
    stop that fit at its first batch because the first one was interrupted."""
    class Connector:
        received_sigterm = False

    trainer = SimpleNamespace(_signal_connector=Connector())
    cb = InterruptCheckpoint()
    previous = signal.getsignal(signal.SIGINT)
    try:
        cb.on_fit_start(trainer, None)
        cb._on_signal(signal.SIGTERM, None)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert cb.interrupted_by == "SIGTERM" and trainer._signal_connector.received_sigterm
        cb._restore()
        trainer._signal_connector.received_sigterm = False  # Lightning resets it per run
        cb.on_fit_start(trainer, None)
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert cb.interrupted_by is None and not trainer._signal_connector.received_sigterm
    finally:
        cb._restore()
        signal.signal(signal.SIGINT, previous)
