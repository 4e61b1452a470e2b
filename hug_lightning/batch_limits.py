"""``--trainer.limit_train_batches 1`` means one batch, as written.

Lightning types its batch limits ``Optional[Union[int, float]]``: an int is a number of batches,
a float a fraction (``1.0`` = all). Python's typing cache can hand that annotation out as
``Union[float, int]`` (``Union[int, float] == Union[float, int]``, so whichever was built first
in the process is reused), and jsonargparse then reads ``1`` as ``1.0``: a "one batch" debug
run trained on every batch, with no way to ask for one batch from YAML or the command line.
Only the value 1 is affected: every integer is read as a float, but Lightning turns a whole
float above 1 back into a count (``2.0`` -> 2 batches), and ``0`` and ``0.0`` agree.

:func:`restore_integer_ones` looks at how each limit was *written* (the ``--config`` files and
the command-line flags, in order, the last one winning as in jsonargparse) and turns a parsed
``1.0`` back into ``1`` where it was written as the integer ``1``. Dumping serializes the value
through the same float-first type, so :class:`IntegerOnesParser` writes such a ``1`` back as
``1`` in ``--print_config`` and the saved ``config.yaml`` (as ``1.0`` the file, used again,
ran on all batches).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import yaml
from lightning.pytorch.cli import LightningArgumentParser

#: Trainer arguments where an int counts batches and a float is a fraction (or an interval)
INT_OR_FRACTION = ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                   "limit_predict_batches", "overfit_batches", "val_check_interval")
_INTEGER = re.compile(r"\s*[+]?\d+\s*")


def _written_in_file(path: str) -> dict[str, Any]:
    """The trainer limits a config file sets, as YAML reads them (int 1 vs float 1.0)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    trainer = data.get("trainer") if isinstance(data, dict) else None
    if not isinstance(trainer, dict):
        return {}
    return {k: trainer[k] for k in INT_OR_FRACTION if k in trainer}


def written_values(args: Sequence[str]) -> dict[str, Any]:
    """The last written value of each limit in ``args`` (config files and flags, in order):
    an ``int``/``float`` from YAML, or the flag's string."""
    written: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = str(args[i])
        key, value, step = arg, None, 1
        if "=" in arg and arg.startswith("--"):
            key, value = arg.split("=", 1)
        elif i + 1 < len(args):
            value, step = str(args[i + 1]), 2
        if key in ("--config", "-c") and value is not None:
            written.update(_written_in_file(value))
            i += step
            continue
        name = key[len("--trainer."):] if key.startswith("--trainer.") else None
        if name in INT_OR_FRACTION and value is not None:
            written[name] = value
            i += step
            continue
        i += 1
    return written


def written_ones(args: Sequence[str], trainer_cfg: Any) -> list[str]:
    """The limits parsed as ``1.0`` in ``trainer_cfg`` (a jsonargparse Namespace or dict) but
    written in ``args`` as the integer ``1``."""
    found = []
    for key, value in written_values(args).items():
        is_int = (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and _INTEGER.fullmatch(value) is not None)
        if not is_int or int(value) != 1:
            continue
        parsed = trainer_cfg.get(key) if hasattr(trainer_cfg, "get") else None
        if isinstance(parsed, float) and parsed == 1.0:
            found.append(key)
    return found


def restore_integer_ones(args: Sequence[str], trainer_cfg: Any) -> list[str]:
    """Set each limit that was parsed as ``1.0`` but written as the integer ``1`` back to ``1``
    in ``trainer_cfg`` (a jsonargparse Namespace or dict); returns the keys it changed."""
    changed = written_ones(args, trainer_cfg)
    for key in changed:
        trainer_cfg[key] = 1
    return changed


def keep_integer_ones(text: str, keys: Sequence[str] | set[str]) -> str:
    """``<key>: 1.0`` -> ``<key>: 1`` for ``keys`` in the top-level ``trainer:`` mapping of a
    YAML dump (jsonargparse's layout: two-space indentation); other text is left as it is."""
    out, section = [], None
    for line in text.splitlines(keepends=True):
        if line[:1].isalpha():
            section = line.split(":", 1)[0]
        key, sep, value = line.strip().partition(": ")
        if section == "trainer" and line.startswith("  ") and not line.startswith("   ") \
                and sep and key in keys and value == "1.0":
            line = line.replace(": 1.0", ": 1", 1)
        out.append(line)
    return "".join(out)


class IntegerOnesParser(LightningArgumentParser):
    """The CLI's parser: its dumps (``--print_config``, the saved ``config.yaml``) write a batch
    limit that means one batch as ``1``, not ``1.0`` (all batches when the file is used again).

    ``written_args`` (set by the CLI before parsing) are the command's arguments, for
    ``--print_config``, which dumps before :func:`restore_integer_ones` has run.
    """

    written_args: Sequence[str] = ()

    def dump(self, cfg: Any, *args: Any, **kwargs: Any) -> str:  # noqa: D102
        text = super().dump(cfg, *args, **kwargs)
        trainer = cfg.get("trainer") if hasattr(cfg, "get") else None
        if not isinstance(text, str) or not hasattr(trainer, "get"):
            return text
        ones = {key for key in INT_OR_FRACTION
                if type(trainer.get(key)) is int and trainer.get(key) == 1}  # noqa: E721
        ones.update(written_ones(self.written_args, trainer))
        return keep_integer_ones(text, ones) if ones else text
