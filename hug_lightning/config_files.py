"""Config files of the command line: the packaged YAMLs, and the names a run saves its own
resolved config under (never replacing one that is there)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from hug_lightning.batch_limits import IntegerOnesParser


def _configs_folder() -> Any:
    """The package folder of the shipped configs (``hug_lightning.configs``), or None."""
    try:
        return resources.files("hug_lightning.configs")
    except ModuleNotFoundError:
        return None


def packaged_config(name: str) -> Path | None:
    """Path of a YAML shipped in ``hug_lightning.configs`` (``cifar10_ce``,
    ``configs/debug.yaml``)."""
    stem = Path(name).name
    if not stem.endswith((".yaml", ".yml")):
        stem += ".yaml"
    folder = _configs_folder()
    candidate = folder / stem if folder is not None else None
    return Path(str(candidate)) if candidate is not None and candidate.is_file() else None


def shipped_configs() -> list[str]:
    """Names of the configs shipped in ``hug_lightning.configs`` (``--config <name>``)."""
    folder = _configs_folder()
    return sorted(Path(f.name).stem for f in folder.iterdir()
                  if f.name.endswith(".yaml")) if folder is not None else []


def with_config_hint(message: str) -> str:
    """``message`` of a parser error, and when it says that no model or data was given (a
    command without ``--config``), how to give them. Not for a required argument of a given
    class (``Parser key "data": ... required: root``): a config was given there."""
    missing = re.match(r"the following arguments are required: ([^\n]*)", message)
    keys = [key.strip() for key in missing.group(1).split(",")] if missing else []
    if not any(re.fullmatch(r"(\w+\.)?(model|data)", key) for key in keys):
        return message
    return (f"{message}\n  a model and data come from a config: --config <file.yaml>, or a "
            f"shipped one by name, e.g. --config ufm_hug (offline, a CPU minute) or --config "
            f"cifar10_hug (presets such as debug, gpu, ddp go after one); shipped: "
            f"{', '.join(shipped_configs())}")


def resolve_config_args(args: list[str]) -> list[str]:
    """Replace ``--config X`` (or ``-c X``) values that are not files by the packaged config of
    that name (bare names and ``configs/<name>`` only: a mistyped path elsewhere stays an
    error)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        if value.lstrip().startswith("{") or Path(value).is_file():
            continue
        if Path(value).parent.as_posix() not in (".", "configs"):
            continue  # a path elsewhere that does not exist: jsonargparse says so
        found = packaged_config(value)
        if found is not None:
            out[j] = str(found) if j != i else f"--config={found}"
    return out


def _first_free(folder: Path, pattern: str) -> str:
    """``config.yaml`` if ``folder`` has none, else ``pattern`` with the first free ``n``."""
    if not (folder / "config.yaml").exists():
        return "config.yaml"
    n = 1
    while (folder / pattern.format(n=n)).exists():
        n += 1
    return pattern.format(n=n)


def free_config_name(folder: Path) -> str:
    """``config.yaml``, or ``config-<n>.yaml`` (the first free ``n``) when ``folder`` holds one
    already: a run without a logger saves its config in the working folder, where a
    ``config.yaml`` is likely the user's own (``--config config.yaml``), never to be replaced."""
    return _first_free(folder, "config-{n}.yaml")


def resumed_config_name(folder: Path) -> str:
    """``config.yaml``, or ``config.resume-<n>.yaml`` (the first free ``n``) when the run
    folder already holds the config of the fit being resumed: each resume keeps its own."""
    return _first_free(folder, "config.resume-{n}.yaml")


class CommandParser(IntegerOnesParser):
    """The parser of ``hug-lightning`` and its subcommands: an error for a missing model or
    data (no ``--config`` given) also says how to give them (:func:`with_config_hint`), after
    a one-line usage (:meth:`print_usage`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # noqa: D102
        super().error(with_config_hint(message), ex)

    def print_usage(self, file: Any = None) -> None:
        """One line: argparse's usage lists every option (about 110 lines for ``fit``), which
        buried the error line under it; ``--help`` still prints them all."""
        action = getattr(self, "_subcommands_action", None)  # the top-level parser's
        names = "{" + ",".join(action.choices) + "} " if action is not None else ""
        self._print_message(f"usage: {self.prog} {names}[--config CONFIG] [--<key> VALUE ...]\n",
                            file)
