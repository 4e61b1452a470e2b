"""The callback the grid runner adds to each ``fit``: a file that says the fit ran to its end.

A fit stopped by SIGTERM or Ctrl-C (see :mod:`hug_lightning.checkpointing`) saves ``last.ckpt``
and exits with status 143 or 130 from the ``hug-lightning`` command, but with 0 when ``fit`` is
driven from Python (``main()``), so the exit status alone cannot tell a finished fit from an
interrupted one everywhere. :class:`FitCompletedMarker` writes its file in ``on_fit_end``,
which Lightning calls only when ``fit`` returns normally (the loops' own stopping conditions:
``max_epochs``, ``max_steps``, early stopping), never after an exception or an interruption.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class FitCompletedMarker(Callback):
    """Write ``path`` (JSON: epoch, global step, time) when ``fit`` ends normally.

    Args:
        path: File to write; rank zero writes it. The runner deletes it before each fit.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = str(path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if getattr(trainer, "interrupted", False) or not trainer.is_global_zero:
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps({"epoch": trainer.current_epoch,
                                   "global_step": trainer.global_step, "time": time.time()}))
        tmp.replace(target)


def marker_callback_args(path: Path) -> list[str]:
    """Command-line arguments that append a :class:`FitCompletedMarker` to the trainer."""
    spec = {"class_path": f"{__name__}.FitCompletedMarker", "init_args": {"path": str(path)}}
    return ["--trainer.callbacks+", json.dumps(spec)]
