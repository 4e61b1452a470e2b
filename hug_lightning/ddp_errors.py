"""How the processes of a DDP run fail together, with one message (no Lightning import).

When one process of a DDP run meets an error that the others do not (a corrupt image in its
shard, a NaN loss, a bug in user code), it raises and exits; the others learn of it at their
next collective, which fails at once on gloo ("Connection closed by peer") and printed a
130-line traceback that says nothing about the cause, after the failing process's own message.

* :func:`peer_failure` recognises such a follow-on error, which
  :func:`hug_lightning.cli.console_main` turns into one line;
* :func:`agreed` runs the data set-up (decoding every image of the CIFAR folders, on every
  process) and then agrees on its errors: every process met the same error, only the first
  reports it (one message, not one per process); another error than the first's is reported
  as well;
* :func:`stop_children`: the main process of Lightning's launcher, failing, ends the processes
  it started (as Lightning does on Ctrl-C, and torchrun's agent for any failure), which on
  GPUs would wait inside an NCCL collective until its timeout (30 minutes by default);
* :func:`report` writes a message in one piece (two processes' messages do not interleave),
  naming the process when there are several.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Callable

#: texts of the errors a collective raises when another process has ended (gloo, the store)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "Did the remote server shutdown or crash", "Broken pipe")


def _process() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in the default group, ``(0, 1)`` outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class PeerFailedError(RuntimeError):
    """Another process of the run failed (``quiet``: with the error this one met too, which
    that process reports)."""

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def agreed(fn: Callable[[], Any], what: str) -> Any:
    """``fn()`` on every process of a DDP run, then an agreement on its errors (collective:
    every process calls it at the same point; outside DDP just ``fn()``).

    The process of lowest rank that failed raises its error; another process raises its own
    error when it differs, else a quiet :class:`PeerFailedError` (the same message would be
    printed once per process); one that did not fail raises a :class:`PeerFailedError` instead
    of going on to a collective the failed process never joins.

    Args:
        fn: The work (the data set-up).
        what: What it does, for the message of the processes that did not fail.
    """
    import torch.distributed as dist

    rank, world = _process()
    if world < 2:
        return fn()
    error, result = None, None
    try:
        result = fn()
    except Exception as err:  # agreed on below, then raised
        error = err
    mine = None if error is None else f"{type(error).__name__}: {error}"
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, mine)
    failed = [r for r, m in enumerate(messages) if m is not None]
    if not failed:
        return result
    first = failed[0]
    if error is not None and (rank == first or mine != messages[first]):
        raise error
    raise PeerFailedError(f"process {first} failed while {what}", quiet=error is not None)


def stop_children(trainer: Any, err: BaseException) -> None:
    """In the main process of Lightning's launcher, failing with ``err`` (its own error, not a
    stop signal or the failure of another process): end the processes it started (SIGKILL)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    procs = getattr(launcher, "procs", None)
    if not procs or not isinstance(err, Exception) or peer_failure(err):
        return  # not Exception: Ctrl-C, SystemExit and Lightning's SIGTERMException (a stop)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # not reaped: left as it is
            return
    # Lightning's child-process observer (a thread of this process, polling this very list
    # every 5 s) SIGKILLs this process when a child ended with a non-zero status: the children
    # ended here on purpose, so it must not see them (this process would die with status -9
    # while it reports its error and exits)
    procs.clear()


def peer_failure(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it comes from) is a collective or store operation that
    failed because another process of the run ended, in a process of a DDP run."""
    import torch.distributed as dist

    if _process()[1] < 2:
        return False
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (PeerFailedError, dist.DistNetworkError)) or (
                isinstance(err, RuntimeError) and _raised_in_distributed(err)
                and any(t in str(err) for t in _PEER_GONE)):
            return True
        err = err.__cause__ or err.__context__
    return False


def _raised_in_distributed(err: BaseException) -> bool:
    """Whether ``err`` was raised by torch's communication code (gloo's "Connection closed by
    peer" is a plain ``RuntimeError`` from a collective in ``torch.distributed``, from DDP's
    forward in ``torch.nn.parallel`` or from its gradient hooks under ``torch.autograd``'s
    backward), not, say, re-raised from a DataLoader worker (``torch/_utils.py``) whose own
    error text mentions a broken pipe."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(f"torch{os.sep}{part}{os.sep}" in name
               for part in ("distributed", f"nn{os.sep}parallel", "autograd"))


def report(message: str) -> None:
    """Write ``hug-lightning: error: <message>`` to stderr in one write; under DDP with the
    process's rank (``[rank 1/2]``), so the messages of several processes stay apart."""
    rank, world = _process()
    where = f" [rank {rank}/{world}]" if world > 1 else ""
    text = f"hug-lightning: error{where}: {message}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), text.encode(errors="replace"))
    except (AttributeError, OSError, ValueError):  # a stderr without a file (captured)
        sys.stderr.write(text)


PEER_MESSAGE = ("stopped because another process of this DDP run failed: its error is the "
                "other message here (set HUG_LIGHTNING_TRACEBACK=1 for this process's "
                "traceback).")


def release_process_group() -> None:
    """Destroy the ``torch.distributed`` process group of a finished command, on every rank.

    Lightning destroys it at exit for NCCL only. A gloo group (DDP on CPUs) left to the
    interpreter's teardown can abort the process after its work is done (SIGABRT, ``terminate
    called without an active exception``: gloo's threads still hold work objects; about 1 run
    in 17 of a 2-process ``predict`` here). Destroying is local to each process (no collective):
    it cannot hang when another rank has failed.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["PEER_MESSAGE", "PeerFailedError", "agreed", "peer_failure",
           "release_process_group", "report", "stop_children"]
