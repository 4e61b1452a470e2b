"""2-process DDP fits (gloo on CPU) where a process fails: the run ends at once, with one
message, and loses nothing it had saved.

Before: the process that did not fail learnt of it at its next collective and printed a
130-line gloo traceback ("Connection closed by peer") after the real error; an error every
process met (a corrupt image in the CIFAR folders, which every process decodes) was printed
once per process; ``nonfinite_loss: skip`` under DDP gave one traceback per process.
Every run has a hard timeout: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_args
from datagen import CIFAR10_CLASSES, write_image_folder, write_imagenet_folder

DDP = ("--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
PEER = "stopped because another process of this DDP run failed"
GLOO = "Connection closed by peer"

FAULTY_HEAD = '''
import os
from hug_lightning.heads import CrossEntropyHead


class FaultyHead(CrossEntropyHead):
    """Fails in training call number `at` of process `rank` only (a NaN loss or a bug)."""

    def __init__(self, num_classes: int, in_features: int, rank: int = 1, at: int = 7,
                 mode: str = "nan") -> None:
        super().__init__(num_classes, in_features)
        self.rank, self.at, self.mode, self.calls = rank, at, mode, 0

    def forward_train(self, features, labels):
        out = super().forward_train(features, labels)
        self.calls += self.training  # validation calls it too
        if int(os.environ.get("LOCAL_RANK", "0")) == self.rank and self.calls == self.at:
            if self.mode == "raise":
                raise RuntimeError(f"a bug in the head on process {self.rank}")
            out = out._replace(loss=out.loss * float("nan"))
        return out
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("ddpfail"), CIFAR10_CLASSES,
                              train_per_class=10, test_per_class=3)


def _fit(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    env.pop("HUG_LIGHTNING_TRACEBACK", None)
    try:
        return subprocess.run([sys.executable, "-m", "hug_lightning", "fit", *args, *DDP],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as err:  # the survivor waits in a collective
        pytest.fail(f"the DDP fit hung after a failure:\n{(err.stderr or b'')[-3000:]}")


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hug-lightning: error")]


@pytest.mark.slow
@pytest.mark.parametrize("rank, mode", [(1, "nan"), (0, "raise")])
def test_one_process_failing_mid_training_ends_the_run_with_its_error(root, tmp_path, rank,
                                                                      mode):
    """A NaN loss (`nonfinite_loss: raise`) on process 1, a bug in user code on process 0, in
    the second epoch: the error once, no gloo traceback; the main process, failing, ends the
    other one (it would wait in the next collective); the epoch-0 `last.ckpt` is intact."""
    (tmp_path / "faulty_head.py").write_text(FAULTY_HEAD)
    head = ('{"class_path": "faulty_head.FaultyHead", '
            f'"init_args": {{"rank": {rank}, "mode": "{mode}"}}}}')
    proc = _fit(tiny_args(root, tmp_path, "--model.init_args.head", head,
                          "--data.init_args.batch_size", "8", "--trainer.max_epochs", "2"),
                tmp_path)  # 80 training images: 5 steps per epoch, call 7 is in epoch 1
    assert proc.returncode == 1, proc.stderr[-3000:]
    error = ("error [rank 1/2]: Non-finite training loss at epoch 1" if mode == "nan"
             else "RuntimeError: a bug in the head on process 0")
    assert proc.stderr.count(error) == 1, proc.stderr[-3000:]
    tracebacks = proc.stderr.count("Traceback")  # a NaN loss: one line, no traceback
    assert GLOO not in proc.stderr and tracebacks == (mode != "nan"), proc.stderr[-3000:]
    # process 1 failed: process 0 says why it stopped; process 0 failed: it ended process 1
    peer = [PEER in line for line in _errors(proc.stderr)]  # a NaN loss: its one-line error
    assert sorted(peer) == [False] * (mode == "nan") + [True] * (rank == 1), proc.stderr[-3000:]
    assert "nonfinite_loss=skip" not in proc.stderr  # not offered: an error under DDP
    last = next(tmp_path.glob("cifar10_ce/version_0/checkpoints/last.ckpt"))
    state = torch.load(last, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (0, 5)


@pytest.mark.slow
def test_a_corrupt_image_every_process_decodes_is_one_message(root, tmp_path):
    """The CIFAR image folders are decoded by every process at set-up: the processes agree on
    the error, and only the first reports it (before: the message twice)."""
    bad = tmp_path / "data"
    shutil.copytree(root, bad)
    corrupt = sorted((bad / "train" / "cat").iterdir())[3]
    corrupt.write_bytes(b"not an image")
    proc = _fit(tiny_args(bad, tmp_path), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and f"Cannot read image file {corrupt}" in errors[0], errors
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_corrupt_image_one_process_reads_is_its_one_message(tmp_path):
    """ImageNet images are decoded per sample: the corrupt file is in one process's shard.
    Its message once; the other process's one line (process 1 failed) or nothing (process 0
    failed and ended process 1)."""
    from hug_lightning.data.imagenet import resolve_classes

    data = write_imagenet_folder(tmp_path / "inet", resolve_classes("imagenette", Path(".")),
                                 train_per_class=4, val_per_class=1)
    corrupt = sorted((data / "train").glob("*/*.JPEG"))[5]
    corrupt.write_bytes(b"not an image")
    args = tiny_args(data, tmp_path, "--data.init_args.subset", "imagenette",
                     "--data.init_args.image_size", "32", "--data.init_args.resize_size", "36",
                     "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "1.0",
                     config="imagenet100_ce")
    i = args.index("--data.init_args.download")
    del args[i:i + 2]  # ImageNet is never downloaded: no such option
    proc = _fit(args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert sum(f"{corrupt}" in e for e in errors) == 1, proc.stderr[-3000:]
    assert sum(PEER in e for e in errors) == len(errors) - 1 <= 1, errors
    assert GLOO not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_missing_data_under_ddp_is_one_message(tmp_path):
    """Only process 0 checks the folder (`prepare_data`): its message alone (it ends process 1,
    which printed a gloo traceback)."""
    proc = _fit(tiny_args(tmp_path / "nowhere", tmp_path), tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "CIFAR-10 data not found" in errors[0], errors
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_nonfinite_skip_under_ddp_is_one_config_message_before_launch(root, tmp_path):
    """Before: a ValueError traceback from each process's `setup`."""
    proc = _fit(tiny_args(root, tmp_path, "--model.init_args.nonfinite_loss", "skip"),
                tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = _errors(proc.stderr)
    assert len(errors) == 1 and "nonfinite_loss=skip works in one process only" in errors[0]
    assert "Traceback" not in proc.stderr and "GLOBAL_RANK: 1" not in proc.stderr


def _agree_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Each scenario's set-up on 2 processes: what :func:`agreed` raised, per process."""
    import torch.distributed as dist

    from hug_lightning.ddp_errors import PeerFailedError, agreed

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    scenarios = {"none": (None, None), "both_same": ("bad file x", "bad file x"),
                 "only_1": (None, "bad file y"), "differ": ("bad a", "bad b")}
    seen = {}
    for name, errors in scenarios.items():
        def work() -> int:
            if errors[rank] is not None:
                raise ValueError(errors[rank])
            return 7

        try:
            seen[name] = ("returned", agreed(work, "setting up"))
        except PeerFailedError as err:
            seen[name] = ("peer", err.quiet, str(err))
        except ValueError as err:
            seen[name] = ("own", str(err))
    torch.save(seen, os.path.join(out_dir, f"agree{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_processes_agree_on_set_up_errors(tmp_path):
    """The first process that failed raises its error, another one its own when it differs,
    else a quiet `PeerFailedError` (nothing printed); one that did not fail a loud one (it
    would go on to a collective the failed process never joins)."""
    from _ddp_helpers import start_workers

    start_workers(_agree_worker, (str(tmp_path / "init"), str(tmp_path)), 2, timeout_s=120)
    zero, one = (torch.load(tmp_path / f"agree{r}.pt") for r in (0, 1))
    assert zero["none"] == one["none"] == ("returned", 7)
    assert zero["both_same"] == ("own", "bad file x")
    assert one["both_same"] == ("peer", True, "process 0 failed while setting up")
    assert zero["only_1"] == ("peer", False, "process 1 failed while setting up")
    assert one["only_1"] == ("own", "bad file y")
    assert zero["differ"] == ("own", "bad a") and one["differ"] == ("own", "bad b")


def test_stop_children_is_not_taken_for_a_child_failure_by_lightnings_observer():
    """Lightning's child-process observer SIGKILLs the main process when a child ended with a
    non-zero status: the children ``stop_children`` killed must not count as such (before: the
    main process was killed too, within 5 s, while it reported its own error and exited)."""
    from types import SimpleNamespace

    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    from hug_lightning.ddp_errors import stop_children

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    child, main = subprocess.Popen(sleep), subprocess.Popen(sleep)  # main: stands for this one
    try:
        procs = [child]
        observer = _ChildProcessObserver(main.pid, procs, sleep_period=0)
        trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=procs)))
        stop_children(trainer, RuntimeError("a bug in process 0"))
        assert child.wait(timeout=10) != 0  # killed
        assert observer._run()  # the observer sees nothing left to watch and stops
        with pytest.raises(subprocess.TimeoutExpired):  # still alive: not killed by it
            main.wait(timeout=2)
    finally:
        for proc in (child, main):
            proc.kill()
            proc.wait()


def _single_trainer_worker(rank: int, init_file: str, out_dir: str) -> None:
    """A 2-process group (as after a DDP fit); process 0 alone sets up a data module attached
    to a 1-device trainer (as `if trainer.is_global_zero: Trainer(devices=1).test(...)`)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hug_lightning.data.base import ClassificationDataModule

    class Tiny(ClassificationDataModule):
        def build_datasets(self, stage: str) -> None:
            self.train_set = self.val_set = self.test_set = [0, 1, 2]

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 0:
        data = Tiny(num_workers=0)
        data.trainer = SimpleNamespace(world_size=1)
        data.setup("test")
        torch.save(data.test_set, os.path.join(out_dir, "set.pt"))
    dist.barrier()  # process 1 waits here: a collective in setup would be paired with it
    dist.destroy_process_group()


@pytest.mark.slow
def test_set_up_by_one_process_of_a_group_for_a_one_device_trainer_does_not_wait(tmp_path):
    """The agreement on set-up errors is among the trainer's processes (before: among the
    default group's, which process 1 never joined in `setup`: a hang or a gloo error)."""
    from _ddp_helpers import start_workers

    start_workers(_single_trainer_worker, (str(tmp_path / "init"), str(tmp_path)), 2,
                  timeout_s=30)
    assert torch.load(tmp_path / "set.pt") == [0, 1, 2]


def _raise_from(filename: str, cause: BaseException | None = None) -> BaseException:
    """The error `raise RuntimeError(<gloo's text>)` run as code of ``filename``."""
    code = compile(f"raise RuntimeError({GLOO + ' [127.0.0.1]:1234'!r}) from cause",
                   filename, "exec")
    try:
        exec(code, {"cause": cause})
    except RuntimeError as err:
        return err
    raise AssertionError("not raised")


def test_only_a_collective_failing_is_taken_for_another_process_failing(monkeypatch):
    """gloo's 'Connection closed by peer' is a plain RuntimeError raised in torch.distributed;
    the same words in an error from elsewhere (a DataLoader worker's re-raised error carries
    its traceback's text) are that error, shown as it is, not 'another process failed'."""
    import torch.distributed as dist

    from hug_lightning import ddp_errors

    monkeypatch.setattr(ddp_errors, "_process", lambda: (0, 2))
    in_dist = os.path.join(os.path.dirname(dist.__file__), "distributed_c10d.py")
    collective = _raise_from(in_dist)
    assert ddp_errors.peer_failure(collective)
    wrapped = _raise_from("/home/me/my_loader.py", cause=collective)  # chained: still found
    assert ddp_errors.peer_failure(wrapped)
    assert not ddp_errors.peer_failure(_raise_from("/home/me/my_loader.py"))
    for where in ("nn/parallel/distributed.py", "autograd/graph.py"):  # DDP's forward, backward
        assert ddp_errors.peer_failure(_raise_from(os.path.join(
            os.path.dirname(torch.__file__), *where.split("/"))))
    assert not ddp_errors.peer_failure(_raise_from(os.path.join(
        os.path.dirname(torch.__file__), "_utils.py")))  # a DataLoader worker's error re-raised
    monkeypatch.setattr(ddp_errors, "_process", lambda: (0, 1))  # one process: never
    assert not ddp_errors.peer_failure(collective)
