"""The process-wide settings a run changes, given back when :func:`hug_lightning.cli.main` ends.

A command-line run ends its process; ``main([...])`` in a notebook or a script leaves the
process to later runs. Lightning sets these for the whole process and never puts them back:

* the Trainer's ``deterministic`` and ``benchmark`` call ``torch.use_deterministic_algorithms``
  and set ``torch.backends.cudnn.benchmark`` (``gpu.yaml`` has ``benchmark: true``), and
  ``deterministic: true`` sets ``CUBLAS_WORKSPACE_CONFIG``; a later Trainer with the default
  ``None`` leaves them as they are, so a later run was deterministic (on a GPU: an error at the
  first operation without a deterministic implementation) or autotuned although its
  configuration says nothing of it;
* ``seed_everything`` sets ``PL_GLOBAL_SEED`` and ``PL_SEED_WORKERS``: a later run with
  ``seed_everything: true`` (Lightning: the seed in ``PL_GLOBAL_SEED``, else 0) took the earlier
  run's seed, and one with ``seed_everything: false`` drew its data order from it
  (:func:`hug_lightning.data.loading.global_seed`) and seeded its DataLoader workers.

:class:`ProcessState` records them (and ``torch.set_float32_matmul_precision``'s value and
``torch.backends.cudnn.deterministic``, which user code may set) and puts back what it recorded.

Lightning's launcher (DDP without ``torchrun``) starts its other processes during the run, as
new runs of the same script, with the environment of that moment: a script's later ``main``
in them would find the earlier run's ``PL_GLOBAL_SEED`` where the launching process finds its
own (none): different seeds, hence different data shards, per process. The launching process
therefore passes what it found in :data:`FOUND_KEY`, and a process started with it gives back
those values, once: the first run there that gives back (not a ``run=False`` call) also
removes :data:`FOUND_KEY`. Its values are then the launching process's, and the same script
changes both alike, so its later runs record their own values, as the launching process does
(keeping :data:`FOUND_KEY`, they gave back the values of the launching run's start: a
``PL_GLOBAL_SEED`` the script set since was given back in the launching process and removed in
the others). The launcher's ``MASTER_PORT``, ``LOCAL_RANK``, ``WORLD_SIZE``... stay: with them
a later DDP run of the script reuses the processes it started, which run that script too.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

#: the environment variables a run sets for the process (Lightning's Trainer and seed_everything)
ENV_KEYS = ("CUBLAS_WORKSPACE_CONFIG", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
#: what the launching process found (JSON), for the processes Lightning's launcher starts
FOUND_KEY = "HUG_LIGHTNING_FOUND_ENV"


def _matmul_precision() -> str | None:
    """``torch.get_float32_matmul_precision()``; None where torch cannot say (set with both its
    legacy and its new ``fp32_precision`` API: reading it raises)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


@dataclass(frozen=True)
class ProcessState:
    """The torch flags and environment variables of :data:`ENV_KEYS` at one moment."""

    deterministic: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    matmul_precision: str | None
    env: dict[str, str | None]
    found: str | None  # FOUND_KEY's value before: put back as well
    launched: bool = False  # env is FOUND_KEY's: restore removes FOUND_KEY (used up)

    @classmethod
    def capture(cls) -> "ProcessState":
        """The process's state now, and :data:`FOUND_KEY` set for the processes the run's
        launcher may start; in one of those (``LOCAL_RANK`` > 0 and :data:`FOUND_KEY` set),
        the environment its launching process found."""
        found = os.environ.get(FOUND_KEY)
        launched = found is not None and os.environ.get("LOCAL_RANK", "0") != "0"
        env = json.loads(found) if launched else {key: os.environ.get(key) for key in ENV_KEYS}
        os.environ[FOUND_KEY] = json.dumps(env)
        return cls(deterministic=torch.are_deterministic_algorithms_enabled(),
                   warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                   cudnn_deterministic=torch.backends.cudnn.deterministic,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   matmul_precision=_matmul_precision(), env=env, found=found,
                   launched=launched)

    def restore(self) -> None:
        """Put back what :meth:`capture` recorded (only what differs); in a process started
        by Lightning's launcher, :data:`FOUND_KEY` is then removed: its values are given back."""
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != \
                (self.deterministic, self.warn_only):
            torch.use_deterministic_algorithms(self.deterministic, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        now = _matmul_precision()
        if self.matmul_precision is not None and now is not None and \
                now != self.matmul_precision:
            torch.set_float32_matmul_precision(self.matmul_precision)
        for key, value in self.env.items():
            _setenv(key, value)
        if self.launched:  # given back: later runs record their own (as the launching process)
            _setenv(FOUND_KEY, None)
        else:
            self.release()

    @classmethod
    @contextmanager
    def given_back(cls, unless_returned: bool = False) -> Iterator[ProcessState]:
        """:meth:`capture` on entry and :meth:`restore` on exit; with ``unless_returned``, a
        block that returns (no exception) only :meth:`release`s: what it set stays for the
        caller (``main(..., run=False)``, then ``cli.trainer.fit(...)``)."""
        found = cls.capture()
        try:
            yield found
        except BaseException:
            found.restore()
            raise
        if unless_returned:
            found.release()
        else:
            found.restore()

    def release(self) -> None:
        """Put back :data:`FOUND_KEY` only: the flags and variables the run set stay."""
        _setenv(FOUND_KEY, self.found)


def _setenv(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


__all__ = ["ENV_KEYS", "FOUND_KEY", "ProcessState"]
