"""One runner per run folder: two runners of one grid (started twice by mistake, or on purpose
to share the runs between GPUs) must not run the same run, where the second would empty the
first's ``fit/`` and both would write its checkpoints and logs."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

LOCK_FILE = "run.lock"


@contextmanager
def run_lock(root: Path) -> Iterator[bool]:
    """Hold ``root/run.lock`` while the body runs; yields False when another process holds it.

    The lock (``flock``) goes with the process that holds it, also when it is killed. Where
    the file system cannot lock (some network mounts) or be written, the body runs unlocked.
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
        yield True


def alone(root: Path, body: Callable[[], str], say: Callable[[str], None], tag: str) -> str:
    """``body()`` under :func:`run_lock`, or ``skipped`` (said) while another runner holds it."""
    with run_lock(root) as free:
        if free:
            return body()
    say(f"{tag} running in another runner: skipped")
    return "skipped"
