"""The command line's own errors and the checks that raise them (no Lightning import).

:class:`ConfigError` (exit status 2), :class:`RunNotFoundError` and :class:`LogFolderError` (1)
are what :func:`hug_lightning.cli.console_main` turns into one message without a traceback.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configured value was rejected while building the model, data, trainer or callbacks."""


class RunNotFoundError(FileNotFoundError):
    """``--ckpt_path last|best`` found no run (or no recorded best checkpoint) to use."""


class LogFolderError(PermissionError):
    """The log folder cannot be created or written (checked before any work)."""


def data_num_classes(data: Any) -> int:
    """The data module's ``num_classes``, which the CLI links into the model's: an error when
    it is missing or not a count (a missing attribute made jsonargparse skip the link, and the
    model kept its default of 10 classes without a word)."""
    k = getattr(data, "num_classes", None)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(
            f"the data module {type(data).__name__} must set an integer num_classes (>= 2) in "
            f"its __init__, found {k!r}: the CLI links it into the model's num_classes when "
            "both are built, before setup() runs (count the classes there, or take them as an "
            "argument).")
    return k


def accelerator_hint(err: BaseException) -> str:
    """What to do when the Trainer finds no device of the configured accelerator (``gpu.yaml``
    or ``ddp.yaml`` on a machine without a GPU): Lightning's message says only ``No supported
    gpu backend found!`` (``gpu``) or lists the available ones (``cuda``, ``mps``); empty for
    any other error."""
    text = str(err)
    if "gpu backend found" in text or "can not run on your system" in text:
        return (" Without that device, leave out --config gpu.yaml / ddp.yaml or set "
                "--trainer.accelerator cpu (auto takes what there is).")
    return ""


def _user_frame(err: BaseException) -> str:
    """``file:line`` of the innermost frame outside the installed libraries and this package,
    where a failing constructor is the user's own code (empty when there is none)."""
    skip = (str(Path(__file__).resolve().parent), "site-packages", "dist-packages",
            str(Path(inspect.__file__).resolve().parent))
    found, seen = "", set()
    while err is not None and id(err) not in seen:  # the innermost exception is the last cause
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename  # "<string>": generated code (a
            # dataclass __init__), not a file; resolve() would make it one under the cwd
            name = str(Path(filename).resolve())
            if not filename.startswith("<") and not any(part in name for part in skip):
                found = f"{filename}:{tb.tb_lineno}"
            tb = tb.tb_next
        err = err.__cause__ or err.__context__
    return found


def _reasons(err: BaseException) -> str:
    """The rejection reasons inside jsonargparse's instantiation error, without the dump of
    the whole configuration it appends."""
    text = str(err)
    if text.startswith("Call to compute_fn of link") and err.__cause__ is not None:
        return str(err.__cause__)  # the link's own reason, without the repr of its input (a
        # data module's lists its loaders over several lines)
    lines = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")]
    lines = [ln for ln in lines if not ln.startswith("Expected a <class 'NoneType'>")]
    return "; ".join(lines) if lines else text.split("\nGiven value")[0]


def one_message(err: BaseException) -> str:
    """The message of ``err``; for an exception re-raised from a DataLoader worker (whose text
    is ``Caught <Error> in DataLoader worker process <n>.`` plus the worker's whole traceback)
    the original message only, followed by where it was raised."""
    text = str(err)
    head, _, rest = text.partition("\n")
    if not (head.startswith("Caught ") and rest.startswith("Original Traceback")):
        return text
    cls = type(err)
    for marker in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__name__}: "):
        if marker in rest:
            return f"{rest.rsplit(marker, 1)[1].strip()} ({head[len('Caught '):].rstrip('.')})"
    return text
