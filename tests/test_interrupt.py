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


def _requeue_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stop = AgreedStop()
    stop.start()
    seen = []
    for step in range(8):
        if (rank, step) in ((1, 2), (0, 3)):  # SLURM signals every task, maybe a batch apart
            stop.request_requeue()
        seen.append((stop.step(), stop.requeue))
    stop.finish()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_a_requeue_request_is_agreed_once_at_the_same_batch(tmp_path):
    """SIGUSR1 (SLURM's requeue) recorded on rank 1 before step 2 and on rank 0 before step 3:
    one requeue, seen by both ranks at step 3 (a batch late), no stop; rank 0's own request,
    made before that step, is the same requeue (reset, not acted on again)."""
    start_workers(_requeue_worker, (str(tmp_path / "init"), str(tmp_path)))
    expected = [(None, step == 3) for step in range(8)]
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected, rank
    single = AgreedStop()
    single.start()
    single.request_requeue()
    assert single.step() is None and single.requeue  # one process: at once, then reset
    assert single.step() is None and not single.requeue


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


class SignalAt(Callback):
    """SIGTERM to this process, once, in epoch ``epoch``: at the start of training batch
    ``batch`` (``where="train"``, -1: the epoch's last) or in validation batch 1
    (``where="val"``); ``again_in_save``: a second SIGTERM while last.ckpt is being written."""

    def __init__(self, where: str = "train", epoch: int = 1, batch: int = -1,
                 again_in_save: bool = False, ctrl_c: bool = False) -> None:
        self.where, self.epoch, self.batch, self.again = where, epoch, batch, again_in_save
        self.signum = signal.SIGINT if ctrl_c else signal.SIGTERM
        self.sent = False

    def _send(self) -> None:
        self.sent = True
        os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if (self.where == "val" and not self.sent and not trainer.sanity_checking
                and trainer.current_epoch == self.epoch and batch_idx == 1):
            self._send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        target = self.batch if self.batch >= 0 else trainer.num_training_batches - 1
        if (self.where == "train" and not self.sent and trainer.current_epoch == self.epoch
                and batch_idx == target):
            self._send()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.again and self.sent:
            self.again = False
            os.kill(os.getpid(), self.signum)


sys.modules["tests_interrupt_callbacks"] = type(sys)("tests_interrupt_callbacks")
sys.modules["tests_interrupt_callbacks"].SignalAt = SignalAt


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("intr"), CIFAR10_CLASSES,
                              train_per_class=10, test_per_class=3)


def _args(root: Path, log: Path, *extra: str) -> list[str]:
    """3 epochs of 10 batches, deterministic (interrupted + resumed must equal one run)."""
    return tiny_args(root, log, "--trainer.deterministic", "true", "--model.init_args.scheduler",
                     "null", "--trainer.limit_train_batches", "1.0",
                     "--trainer.limit_val_batches", "1.0", "--data.init_args.batch_size", "8",
                     "--trainer.max_epochs", "3", *extra)


def _logged(log: Path) -> dict:
    scalars = read_scalars(next(log.glob("cifar10_ce/version_*")))
    return {tag: v for tag, v in scalars.items() if tag.startswith(("val/", "nc/val/"))}


def _final(log: Path) -> dict:
    return torch.load(next(log.glob("cifar10_ce/version_*/checkpoints/last.ckpt")),
                      weights_only=True)


def _assert_one_run(ref: Path, cut: Path) -> None:
    """Interrupted + resumed = one run: same val/* and nc/val/* values at the same steps, same
    weights and optimizer step, same best score."""
    assert _logged(cut) == _logged(ref)
    a, b = _final(ref), _final(cut)
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    best = [[v.get("best_model_score") for k, v in state["callbacks"].items()
             if k.startswith("ModelCheckpoint")] for state in (a, b)]
    assert best[0] == best[1] and best[0][0] is not None


_SIGNAL = ("--trainer.callbacks+", "tests_interrupt_callbacks.SignalAt")


@pytest.mark.parametrize("case, settings, signal_at", [
    # validation: the stop waited for it; the epoch's last batch: its validation runs first
    ("in_validation", (), ("--trainer.callbacks.where", "val")),
    ("last_batch", (), ()),
    # inside an accumulation window: the stop waits for the optimizer step
    ("accumulating", ("--trainer.accumulate_grad_batches", "2"),
     ("--trainer.callbacks.batch", "2")),
    # before a mid-epoch validation (after batches 4 and 9): the stop waits one batch
    ("before_mid_epoch_val", ("--trainer.val_check_interval", "0.5"),
     ("--trainer.callbacks.batch", "4")),
    # a second SIGTERM while last.ckpt is written: ignored, the save completes
    ("again_in_save", (), ("--trainer.callbacks.batch", "3",
                           "--trainer.callbacks.again_in_save", "true")),
    # the same with Ctrl-C: the second press during the save does not abort it
    ("ctrl_c_again_in_save", (), ("--trainer.callbacks.batch", "3", "--trainer.callbacks.ctrl_c",
                                  "true", "--trainer.callbacks.again_in_save", "true")),
])
def test_interrupted_and_resumed_is_one_run(small_root, tmp_path, case, settings, signal_at):
    """Found by an audit: a stop inside a gradient-accumulation window lost the accumulated
    gradients; one before a mid-epoch validation shifted every later validation by a batch;
    a validation next to the stop was cut (Lightning's loop raises after one validation
    batch); a second SIGTERM during the save exited before writing it."""
    main(["fit", *_args(small_root, tmp_path / "ref", *settings)])
    with pytest.raises(SIGTERMException):
        main(["fit", *_args(small_root, tmp_path / "cut", *settings, *_SIGNAL, *signal_at)])
    interrupted_at = _final(tmp_path / "cut")["global_step"]
    assert 0 < interrupted_at < _final(tmp_path / "ref")["global_step"]
    main(["fit", *_args(small_root, tmp_path / "cut", *settings, "--ckpt_path", "last")])
    _assert_one_run(tmp_path / "ref", tmp_path / "cut")
    if "again_in_save" in case:  # the interrupt save itself, not the epoch-end save before
        assert interrupted_at == 10 + 4


def test_a_signal_in_the_fits_last_batch_lets_it_finish(small_root, tmp_path):
    """The fit's last batch: nothing is left to resume, so the fit finishes (exit status 0)
    instead of reporting an interruption that needed one more --ckpt_path last run."""
    main(["fit", *_args(small_root, tmp_path / "ref")])
    main(["fit", *_args(small_root, tmp_path / "cut", *_SIGNAL, "--trainer.callbacks.epoch",
                        "2")])  # returns: no SIGTERMException
    _assert_one_run(tmp_path / "ref", tmp_path / "cut")


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


def test_step_saves_do_not_replace_the_final_epoch_end_save(small_root, tmp_path):
    """``--last.every_n_train_steps N``: the epoch-end and end-of-training saves were skipped
    when the step trigger had saved that global step already (always, for N = 1), so the final
    last.ckpt held the state from before the last validation (best score, NC sums, progress)."""
    main(["fit", *_args(small_root, tmp_path / "ref")])
    main(["fit", *_args(small_root, tmp_path / "steps", "--last.every_n_train_steps", "1")])
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "steps")
    assert a["global_step"] == b["global_step"]  # (its epoch counter is one later: train end)
    assert set(a["callbacks"]) <= set(b["callbacks"])
    for key, state in a["callbacks"].items():
        if not key.startswith("LastCheckpoint"):
            assert (repr(state).replace(str(tmp_path / "ref"), "<run>")
                    == repr(b["callbacks"][key]).replace(str(tmp_path / "steps"), "<run>")), key
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_the_interrupt_save_is_the_one_resumed(small_root, tmp_path):
    """Found by an audit: the interrupt save went to ``trainer.checkpoint_callback``'s folder,
    the best-checkpoint callback's (or a ``ModelCheckpoint`` added to trainer.callbacks):
    with ``--checkpoint.dirpath`` elsewhere, ``last.ckpt`` was written there and
    ``--ckpt_path last`` resumed from the previous epoch-end save, silently losing the
    interrupted epoch's batches. It belongs with the ``LastCheckpoint``'s saves."""
    with pytest.raises(SIGTERMException):
        main(["fit", *_args(small_root, tmp_path / "cut", "--checkpoint.dirpath",
                            str(tmp_path / "best"), *_SIGNAL, "--trainer.callbacks.batch", "3")])
    assert _final(tmp_path / "cut")["global_step"] == 10 + 4
    assert not (tmp_path / "best" / "last.ckpt").exists()
