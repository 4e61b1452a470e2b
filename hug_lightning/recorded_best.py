"""Which checkpoint "best" means: the one the CLI's ``checkpoint`` group keeps.

Every checkpoint holds the state of every ``ModelCheckpoint`` of the run, under its state key
(``ModelCheckpoint{'monitor': 'val/acc', 'mode': 'max', ...}``), with the best file it kept.
A run can have several: the ``checkpoint`` group's (best on ``val/acc`` unless configured
otherwise), ``LastCheckpoint``'s (``last.ckpt``), and any the user adds to
``trainer.callbacks`` (best on ``val/loss``, every N steps, ...). The CLI adds its groups after
those, so "the first ``ModelCheckpoint``" was the user's: ``--ckpt_path best`` evaluated its
file, not the best on ``val/acc``. :func:`choose_recorded_best` picks, in this order:

1. the state under the ``checkpoint`` group's key (:func:`checkpoint_state_key`; its
   configuration: the shipped one unless told), when its file exists;
2. else the only *monitored* one with an existing file (a group reconfigured or left
   without a file, one monitored callback of the user's);
3. else, with several monitored ones, none: :class:`AmbiguousBestError` lists them (with
   their files) and says to pass the file; with none, nothing is recorded (None).

States without a monitor keep their newest file as "best" and are never chosen by rule 2.

In process (``cli = main(["fit", ...])``, then ``cli.trainer.test(ckpt_path="best")``),
Lightning takes the best file of ``trainer.checkpoint_callback``, its first ``ModelCheckpoint``:
the CLI's trainer has the group's first (:func:`hug_lightning.model_callbacks.checkpoint_order`;
not when it keeps no file), so both ways mean the same file.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from hug_lightning.cli_errors import RunNotFoundError

#: the ``checkpoint`` group's options that make up a ``ModelCheckpoint`` state key
KEY_OPTIONS = ("monitor", "mode", "every_n_train_steps", "every_n_epochs", "train_time_interval")
#: what the CLI ships (``CHECKPOINT_DEFAULTS``): the best on ``val/acc``, checked every epoch
SHIPPED_OPTIONS: dict[str, Any] = {"monitor": "val/acc", "mode": "max"}


class AmbiguousBestError(RunNotFoundError):
    """A checkpoint records several monitored ``ModelCheckpoint`` states, none of them the
    ``checkpoint`` group's, so "best" names no single file."""


def checkpoint_state_key(options: Mapping[str, Any] | None = None) -> str:
    """The state key of a ``ModelCheckpoint`` built with ``options`` (the CLI's ``checkpoint``
    group; only :data:`KEY_OPTIONS` count), or of the shipped one when they are None or cannot
    build one."""
    given = {k: options.get(k) for k in KEY_OPTIONS} if options is not None else {}
    try:
        return ModelCheckpoint(**{**SHIPPED_OPTIONS, **given}).state_key
    except Exception:  # an option the evaluation never needs to be valid: the shipped key
        return ModelCheckpoint(**SHIPPED_OPTIONS).state_key


def _existing(path: str | None, last: Path) -> Path | None:
    """The recorded file, as recorded or next to ``last`` (a moved run), if it exists."""
    for candidate in (Path(path), last.parent / Path(path).name) if path else ():
        if candidate.is_file():
            return candidate
    return None


def _monitor(key: str, state: Mapping[str, Any]) -> Any:
    """The monitored metric of a ``ModelCheckpoint`` state: its own entry, else the one its
    key names (``ModelCheckpoint{'monitor': 'val/acc', ...}``), else None."""
    if "monitor" in state:
        return state["monitor"]
    try:
        options = ast.literal_eval(key[key.index("{"):])
    except (ValueError, SyntaxError):  # no dict, or one with a timedelta in it
        return None
    return options.get("monitor") if isinstance(options, dict) else None


def choose_recorded_best(last: Path, key: str | None = None) -> tuple[Path, str] | None:
    """The best file recorded in the checkpoint ``last`` and the state key it came from.

    Args:
        last: A checkpoint of the run (``last.ckpt``, or any file ``ModelCheckpoint`` wrote).
        key: The ``checkpoint`` group's state key (default: the shipped group's).

    Returns:
        ``(file, state key)`` chosen as the module docstring says; None when ``last`` cannot be
        read weights-only or records no existing best file.

    Raises:
        AmbiguousBestError: Several monitored states have a file and none is under ``key``.
    """
    try:
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, or not loadable weights-only
        return None
    key = key or checkpoint_state_key()
    found: dict[str, tuple[Path, bool]] = {}  # state key: (best file, monitored)
    for name, value in (state.get("callbacks") or {}).items():
        if isinstance(value, dict) and "best_model_path" in value:
            path = _existing(value.get("best_model_path"), last)
            if path is not None:
                found[name] = (path, _monitor(name, value) is not None)
    if key in found:
        return found[key][0], key
    monitored = [(path, name) for name, (path, watched) in found.items() if watched]
    if len(monitored) > 1:
        listed = "; ".join(f"{name}: {path}" for path, name in monitored)
        raise AmbiguousBestError(
            f"{last} records {len(monitored)} monitored ModelCheckpoints and none is the "
            f"`checkpoint` group's ({key}), so 'best' names no single file: {listed}. Pass the "
            "file to use instead: --ckpt_path <file>.")
    return monitored[0] if monitored else None


def recorded_best_checkpoint(last: Path, key: str | None = None) -> Path | None:
    """The best file :func:`choose_recorded_best` picks in ``last`` (None: none recorded)."""
    chosen = choose_recorded_best(last, key)
    return chosen[0] if chosen is not None else None


__all__ = ["AmbiguousBestError", "checkpoint_state_key", "choose_recorded_best",
           "recorded_best_checkpoint"]
