"""Fit commands of the grid runner, compared across reruns: same arguments, same config files.

A rerun of a grid must tell whether a run's recorded fit command still describes it. Two
commands are the same when they agree from ``fit`` on, ignoring what legitimately moves (the
interpreter, the output folder, the folder of each config file, ``--ckpt_path`` of a resume)
and the config files have the same content (:func:`config_digests`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from hug_lightning.config_files import packaged_config


def comparable_command(cmd: Sequence[str]) -> list[str]:
    """A fit command from ``fit`` on, without its ``--ckpt_path <last.ckpt>`` (resumes differ
    only there) and with the places that move between machines made neutral: the interpreter,
    the run's own folder (``<run>``: the output folder may have been moved) and the folder of
    each ``--config`` file (packaged configs live in the environment's site-packages)."""
    cmd = list(cmd)
    cmd = cmd[cmd.index("fit"):] if "fit" in cmd else cmd
    value = {a: b for a, b in zip(cmd, cmd[1:])}
    save_dir = value.get("--trainer.logger.init_args.save_dir")
    name = value.get("--trainer.logger.init_args.name")
    root = str(Path(save_dir) / name) if save_dir and name else None
    out, previous = [], ""
    for arg in cmd:
        if arg == "--ckpt_path" or previous == "--ckpt_path":
            pass
        elif previous == "--config":
            out.append(Path(arg).name)
        elif previous == "--trainer.logger.init_args.save_dir":
            out.append("<run>/..")
        elif root and root in arg:  # also inside the marker callback's JSON
            out.append(arg.replace(root, "<run>"))
        else:
            out.append(arg)
        previous = arg
    return out


def config_digests(cmd: Sequence[str]) -> list[list[str]]:
    """``[file name, sha256 of its content]`` of each ``--config`` file of a command, in order
    (``missing`` for a file that is not there): edits inside a config file change it."""
    out = []
    for flag, value in zip(cmd, cmd[1:]):
        if flag in ("--config", "-c") and not value.lstrip().startswith("{"):
            path = Path(value) if Path(value).is_file() else packaged_config(value)
            digest = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if path is not None and path.is_file() else "missing")
            out.append([Path(value).name, digest])
    return out


def what_changed(recorded: tuple[list[str], list[list[str]] | None],
                  now: Sequence[str]) -> str | None:
    """How the fit command ``now`` differs from the recorded one, or None when it is the same:
    other arguments (the grid or ``--extra`` changed), or edits inside its config files."""
    saved, digests = recorded
    if comparable_command(saved) != comparable_command(now):
        return "another fit command"
    if digests is not None:
        edited = [name for (name, before), (_, after) in zip(digests, config_digests(now))
                  if before != after]
        if edited:
            return f"config files edited since ({', '.join(edited)})"
    return None
