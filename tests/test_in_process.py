"""What a notebook or script meets after ``main([...])`` returns or raises in its own process:
the process's state after a fit that ended with an exception.

A command-line run ends its process; an in-process one leaves the process to later cells, so a
fit must give back what it took (here: the SIGINT handler) on every way out.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hug_lightning.cli import main


class StopAt(Callback):
    """At the start of training batch 2: raises (a bug in user code) or sends SIGTERM."""

    def __init__(self, how: str = "error") -> None:
        self.how = how

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2 and trainer.current_epoch == 0:
            if self.how == "error":
                raise RuntimeError("a bug in a callback")
            signal.raise_signal(signal.SIGTERM)


sys.modules["tests_in_process_callbacks"] = type(sys)("tests_in_process_callbacks")
sys.modules["tests_in_process_callbacks"].StopAt = StopAt


def _ufm(log: Path, *extra: str) -> list[str]:
    """A tiny UFM fit (4 classes, 5 steps per epoch, 2 epochs)."""
    return ["fit", "--config", "ufm_ce", "--trainer.logger.init_args.save_dir", str(log),
            "--trainer.max_epochs", "2", "--data.init_args.num_classes", "4",
            "--data.init_args.samples_per_class", "8", "--data.init_args.steps_per_epoch", "5",
            "--model.init_args.backbone.init_args.dim", "8", "--nc.enabled", "false",
            "--trainer.enable_progress_bar", "false", *extra]


@pytest.mark.parametrize("how, raised", [("error", RuntimeError), ("sigterm", SIGTERMException)])
def test_a_fit_ended_by_an_exception_gives_ctrl_c_back(tmp_path, how, raised):
    """Found by an audit: after a fit that ended with an error or an interrupt, Ctrl-C was
    still handled by that fit's InterruptCheckpoint (Lightning's teardown, which runs after
    ``on_exception``, put back the handlers it had found after ``on_fit_start``: ours). The
    handler set before the fit (the test's own here) is the one in place after it."""
    def mine(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, mine)
    try:
        with pytest.raises(raised):
            main(_ufm(tmp_path, "--trainer.callbacks+", "tests_in_process_callbacks.StopAt",
                      "--trainer.callbacks.how", how))
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
