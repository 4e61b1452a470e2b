"""One download at a time into a data folder, across processes and nodes.

Lightning calls ``prepare_data`` on the first process of every node (``prepare_data_per_node``,
its default: right for node-local data folders). On a folder the nodes share, two of them then
fetched the same archive into the same file at once: the second one's write truncated the
first one's, whose checksum failed, and the run stopped (``download failed``). Under
:func:`download_lock` the second waits, then finds the data in place and downloads nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".hug_download.lock"


@contextmanager
def download_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``root/.hug_download.lock`` (created, and kept: deleting a
    lock file others wait on would let a third process lock a new one) while the body runs.

    It blocks until the holder, another process or node, is done (or killed: the lock goes with
    its process). Where the folder cannot be written, or its file system cannot lock (some
    network mounts), the body runs unlocked, as before.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / LOCK_FILE, "a")
    except OSError:  # the download itself then says what is wrong
        yield
        return
    with handle:
        try:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # no locking on this file system
        yield


__all__ = ["LOCK_FILE", "download_lock"]
