"""One runner per run folder: two runners of one grid (started twice by mistake, or on purpose
to share the runs between GPUs) must not run the same run, where the second would empty the
first's ``fit/`` and both would write its checkpoints and logs.

The lock is also handed to the ``fit`` and ``test`` subprocesses a runner starts (see
:func:`held_fds`): a runner killed with SIGKILL leaves its fit running (orphaned, it trains on
and writes into the run folder), and a rerun must not start a second fit there meanwhile. The
lock file names its holders (``runner <pid>``, ``fit <pid>``, ``test <pid>``) for the message.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_FILE = "run.lock"
_HELD = threading.local()  # the lock file this thread's run holds (runs go one per thread)


@contextmanager
def run_lock(root: Path) -> Iterator[bool]:
    """Hold ``root/run.lock`` while the body runs; yields False when another process holds it.

    The lock (``flock``) goes with the processes that hold it, also when they are killed:
    the runner and the subprocesses it started with :func:`held_fds`. Where the file system
    cannot lock (some network mounts) or be written, the body runs unlocked.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_FILE, "a")
    except OSError:  # e.g. finished runs on a read-only copy: the run says what it can do
        yield True
        return
    with handle:
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:
            pass  # no locking here
        handle.truncate(0)  # "a": every write goes to the end, now the start
        _HELD.handle = handle
        note_holder("runner")
        try:
            yield True
        finally:
            _HELD.handle = None


def held_fds() -> tuple[int, ...]:
    """The descriptor of the run lock this thread holds, for a subprocess to inherit
    (``Popen(pass_fds=...)``): the lock then stays held while that process lives."""
    handle = getattr(_HELD, "handle", None)
    return (handle.fileno(),) if handle is not None and fcntl is not None else ()


def note_holder(what: str, pid: int | None = None) -> None:
    """Add ``<what> <pid>`` to the lock file this thread holds (nothing if none)."""
    handle = getattr(_HELD, "handle", None)
    if handle is not None:
        try:
            handle.write(f"{what} {os.getpid() if pid is None else pid}\n")
            handle.flush()
        except OSError:
            pass


def holders(root: Path) -> str:
    """The holders a lock file names (``runner 12, fit 15``), or ``unknown``."""
    try:
        text = (root / LOCK_FILE).read_text()
    except OSError:
        return "unknown"
    return ", ".join(line.strip() for line in text.splitlines() if line.strip()) or "unknown"


def alone(root: Path, body: Callable[[], str], say: Callable[[str], None], tag: str) -> str:
    """``body()`` under :func:`run_lock`, or ``skipped`` (said) while another runner holds it."""
    with run_lock(root) as free:
        if free:
            return body()
    say(f"{tag} running in another runner: skipped ({root / LOCK_FILE} is held by process(es) "
        f"{holders(root)}: another runner of this grid, or a fit or test left running by a "
        "runner that was killed; rerun this command once they have ended)")
    return "skipped"
