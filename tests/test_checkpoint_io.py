"""Atomic checkpoint writes (hug_lightning.checkpointing.AtomicCheckpointIO)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from conftest import REPO
from hug_lightning.checkpointing import AtomicCheckpointIO, use_atomic_checkpoint_io


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(5.0)}, path)
    renames = []

    def failing_replace(src, dst):  # as if the process died just before the rename
        renames.append((Path(src), Path(dst)))
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(5)}, path)
    assert renames and renames[0][0].parent == path.parent and renames[0][1] == path
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no .part left
    monkeypatch.undo()
    io.save_checkpoint({"step": 3}, f"file://{path}")  # fsspec URL of a local file
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_only_lightnings_default_writer_is_replaced():
    class Strategy:
        def __init__(self, io):
            self._checkpoint_io = self.checkpoint_io = io

    class Mine(TorchCheckpointIO):
        pass

    for given, expected in ((None, AtomicCheckpointIO), (TorchCheckpointIO(), AtomicCheckpointIO),
                            (Mine(), Mine)):
        trainer = type("T", (), {"strategy": Strategy(given)})()
        use_atomic_checkpoint_io(trainer)
        assert type(trainer.strategy.checkpoint_io) is expected
    wrapped = AsyncCheckpointIO()
    trainer = type("T", (), {"strategy": Strategy(wrapped)})()
    use_atomic_checkpoint_io(trainer)
    assert type(wrapped.checkpoint_io) is AtomicCheckpointIO
    wrapped.teardown()


_WRITER = r"""
import sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from hug_lightning.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO() if sys.argv[1] == "atomic" else TorchCheckpointIO()
state = {"w": torch.randn(1_500_000)}  # ~6 MB
print("ready", flush=True)
step = 0
while True:
    step += 1
    state["step"] = step
    io.save_checkpoint(state, sys.argv[2])
"""


def _other_filesystem(path: Path) -> str | None:
    """A writable folder on another file system than ``path`` (for $TMPDIR), or None."""
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK) \
                and os.stat(candidate).st_dev != os.stat(path).st_dev:
            return candidate
    return None


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_truncated_checkpoint(tmp_path):
    """$TMPDIR on another file system than the logs: SIGKILL the writer at random moments; the
    checkpoint must always load. (With Lightning's TorchCheckpointIO in place of
    AtomicCheckpointIO, ``_WRITER ... lightning``, this failed with EOFError on 2 of 2 runs.)"""
    tmpdir = _other_filesystem(tmp_path)
    if tmpdir is None:
        pytest.skip("no second file system for $TMPDIR on this machine")
    path = tmp_path / "last.ckpt"
    env = {**os.environ, "TMPDIR": tmpdir, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng = random.Random(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, "atomic", str(path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:  # the first save is complete
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)  # raises on a truncated file
        assert state["w"].numel() == 1_500_000 and state["step"] >= 1


def test_a_part_left_by_a_kill_is_not_taken_for_an_hpc_checkpoint(tmp_path, monkeypatch):
    """SLURM auto-requeue: Lightning saves ``hpc_ckpt_<n>.ckpt`` (through this writer) and, on
    the restarted job, restores the one with the highest number in any file name holding
    ``hpc_ckpt_``. The part file of a save cut by SIGKILL (``.hpc_ckpt_2.ckpt.part``) counted
    as number 2: the restart looked for a missing ``hpc_ckpt_2.ckpt`` and failed."""
    from lightning.pytorch import Trainer

    trainer = Trainer(default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    connector = trainer._checkpoint_connector
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, connector.hpc_save_path(tmp_path))
    seen = []
    real_save = torch.save

    def save_then_inspect(obj, f):  # mid-write: the part file exists, as after a SIGKILL
        real_save(obj, f)
        f.flush()
        seen.append((sorted(p.name for p in tmp_path.iterdir()), connector._hpc_resume_path,
                     connector.hpc_save_path(tmp_path)))

    monkeypatch.setattr(torch, "save", save_then_inspect)
    io.save_checkpoint({"step": 2}, tmp_path / "hpc_ckpt_2.ckpt")
    names, resume, next_save = seen[0]
    assert len(names) == 2 and names[0].endswith(".part")  # hpc_ckpt_1.ckpt and the part
    assert resume == str(tmp_path / "hpc_ckpt_1.ckpt") and Path(resume).is_file()
    assert next_save == str(tmp_path / "hpc_ckpt_2.ckpt")
