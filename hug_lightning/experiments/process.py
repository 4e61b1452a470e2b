"""Subprocesses of the grid runner: launch, and stop them cleanly on Ctrl-C or SIGTERM.

When the runner is interrupted, every running ``hug_lightning`` child gets SIGTERM: Lightning
finishes the batch in progress and :class:`hug_lightning.interrupt.InterruptCheckpoint`
writes ``last.ckpt``, from which the next run of the same grid resumes. A child still running
after :data:`GRACE_S` seconds (or after a second Ctrl-C) is killed, with the processes it
started (a DDP fit's other ranks).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hug_lightning.experiments.locks import held_fds, note_holder

GRACE_S = 120.0
#: Set once the runner is interrupted: runs then stop without marking anything as finished.
STOP = threading.Event()
_LIVE: set[subprocess.Popen] = set()
_LOCK = threading.Lock()


def launch(cmd: list[str], log_file: Path) -> int:
    """Run one subprocess, its output appended to ``log_file``; returns the exit status.

    Raises:
        KeyboardInterrupt: The runner was interrupted (the child was stopped first).
    """
    if STOP.is_set():
        raise KeyboardInterrupt
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_file, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # the run's lock goes along: a fit left running by a killed runner keeps the run
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                pass_fds=held_fds())
        note_holder(Path(log_file).stem, proc.pid)  # "fit 1234" in run.lock
        with _LOCK:
            _LIVE.add(proc)
            late = STOP.is_set()  # interrupted while it started: stop_children missed it
        try:
            if late:
                _terminate([proc], GRACE_S)
            rc = proc.wait()
            log.write(f"\n# {describe_status(rc)}\n")
            return rc
        except BaseException:
            STOP.set()
            stop_children()
            if proc.poll() is not None:  # the log says how the child ended, as below
                log.write(f"\n# {describe_status(proc.returncode)} (runner interrupted)\n")
            raise
        finally:
            with _LOCK:
                _LIVE.discard(proc)


def describe_status(rc: int) -> str:
    """``exit status 1``, or ``killed by SIGKILL`` for a child ended by a signal (``-9``)."""
    if rc >= 0:
        return f"exit status {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (out of memory? the kernel's OOM killer sends it)" if -rc == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


def stop_children(grace_s: float = GRACE_S) -> None:
    """SIGTERM every running child, wait up to ``grace_s`` for them, then kill the rest."""
    with _LOCK:
        procs = [p for p in _LIVE if p.poll() is None]
    _terminate(procs, grace_s)


def _terminate(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM ``procs``, wait up to ``grace_s`` (or a Ctrl-C) for them, kill those left."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    try:
        for proc in procs:
            proc.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                below = descendants(proc.pid)  # before the kill: orphans lose the link
                proc.kill()
                for pid in below:  # e.g. the DDP ranks a fit started: left, they hold the GPUs
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                proc.wait()


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (children, theirs...), read from ``/proc`` (Linux; elsewhere
    none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (name) state ppid ...": the name may hold spaces and parentheses
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        out += below
        todo += below
    return out


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM to the runner into ``KeyboardInterrupt`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
