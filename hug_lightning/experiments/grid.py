"""Grid files: named entries (config files + CLI overrides) run over several seeds.

A grid is a YAML file::

    description: CIFAR-10, CE vs HUG          # optional, copied into results.md
    seeds: [0, 1, 2]                          # default seeds ([0]; ``--seeds`` overrides)
    common:                                   # optional, applied to every entry
      configs: []                             # appended after each entry's configs
      args: {trainer.enable_progress_bar: false}
      test_args: {}                           # only for the ``test`` command
      test_checkpoint: best                   # or last (val_split 0: validation = test set)
    entries:
      - name: ce                              # folder name: letters, digits, ``_.-``
        configs: [cifar10_ce.yaml]            # as ``--config``: a path or a packaged name
        args:                                 # ``--key value`` overrides (mapping or list)
          trainer.max_epochs: 30

``args`` is either a mapping (``key: value`` becomes ``--key value``; booleans are written
``true``/``false``, lists and mappings as JSON) or a list of command-line strings; what the
runner sets for each run (``seed_everything``, the logger's folder, ``checkpoint.dirpath``,
``ckpt_path``: :data:`RUNNER_FLAGS`) is refused there and after ``--extra``. Config names
are resolved like ``hug-lightning --config`` does: an existing path (relative to the current
folder, then to the grid file's folder), else a YAML shipped in ``hug_lightning.configs``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hug_lightning.config_files import packaged_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
GRID_KEYS = {"name", "description", "seeds", "common", "entries"}
ENTRY_KEYS = {"name", "configs", "args", "test_args", "test_checkpoint", "description"}
COMMON_KEYS = {"configs", "args", "test_args", "test_checkpoint"}


@dataclass(frozen=True)
class Entry:
    """One row group of the table: the fit command's configs and overrides.

    Attributes:
        name: Folder and row name.
        configs: Absolute paths of the config files, in ``--config`` order.
        args: Overrides after the configs (``--key value`` strings).
        test_args: Extra arguments of the ``test`` command only.
        test_checkpoint: ``best`` (on the validation metric, default) or ``last``: the choice
            for fits whose validation set is the test set (``val_split: 0``), where the best
            checkpoint would be selected on test data.
    """

    name: str
    configs: tuple[Path, ...]
    args: tuple[str, ...] = ()
    test_args: tuple[str, ...] = ()
    test_checkpoint: str = "best"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file.

    Attributes:
        name: Grid name (``name`` key, else the file's stem): the results folder.
        path: The YAML file.
        description: Free text for the results table.
        seeds: Default seeds.
        entries: Entries in file order.
    """

    name: str
    path: Path
    description: str
    seeds: tuple[int, ...]
    entries: tuple[Entry, ...]


def shipped_grids() -> dict[str, Path]:
    """Grids shipped in ``hug_lightning.configs/grids``: ``{name: path}``."""
    try:
        folder = resources.files("hug_lightning.configs") / "grids"
    except ModuleNotFoundError:
        return {}
    if not folder.is_dir():
        return {}
    files = [Path(str(f)) for f in folder.iterdir() if f.name.endswith((".yaml", ".yml"))]
    return {p.stem: p for p in sorted(files)}


def find_grid(name_or_path: str | Path) -> Path:
    """The grid file of a path or of a shipped grid's name (``paper_cifar10``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    shipped = shipped_grids()
    if path.stem in shipped and path.suffix in ("", ".yaml", ".yml"):
        return shipped[path.stem]
    raise FileNotFoundError(f"No grid file {str(name_or_path)!r}; shipped grids: "
                            f"{', '.join(shipped) or 'none'}.")


def resolve_config(name: str, base: Path) -> Path:
    """Absolute path of a config named in a grid (path, path next to the grid, packaged name)."""
    for candidate in (Path(name), base / name):
        if candidate.is_file():
            return candidate.resolve()
    found = packaged_config(name)
    if found is None:
        raise FileNotFoundError(f"Config {name!r} is neither a file (here or in {base}) nor a "
                                "config shipped in hug_lightning.configs.")
    return found.resolve()


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def to_cli_args(args: Any, where: str = "args") -> list[str]:
    """Command-line strings of an ``args`` field (mapping, list of strings, or empty)."""
    if not args:
        return []
    if isinstance(args, dict):
        out: list[str] = []
        for key, value in args.items():
            out += [f"--{str(key).lstrip('-')}", _value(value)]
        return out
    if isinstance(args, (list, tuple)):
        return [_value(a) for a in args]
    raise TypeError(f"{where} must be a mapping or a list of strings, got {type(args).__name__}.")


#: Flags each run's fit command sets itself, last: given in a grid or ``--extra`` they lose.
RUNNER_FLAGS = {
    "--seed_everything": "the seeds come from the grid's `seeds` or --seeds",
    "--trainer.logger.init_args.save_dir": "each run logs into <out>/<grid>/<entry>/seed<k>/",
    "--trainer.logger.init_args.name": "each run logs into <out>/<grid>/<entry>/seed<k>/",
    "--trainer.logger.init_args.version": "each run logs into <out>/<grid>/<entry>/seed<k>/",
    "--checkpoint.dirpath": "each run keeps its checkpoints in its fit/checkpoints/",
    "--ckpt_path": "the runner passes it to resume an unfinished run from its own last.ckpt",
}


def runner_flags(args: list[str] | tuple[str, ...], where: str,
                 test: bool = False) -> str | None:
    """Why ``args`` (of the fit, or of the ``test`` command) may not hold a flag the runner
    sets itself (:data:`RUNNER_FLAGS`), or None."""
    own = set(RUNNER_FLAGS) - ({"--seed_everything", "--checkpoint.dirpath"} if test else set())
    found = list(dict.fromkeys(a.split("=")[0] for a in args if a.split("=")[0] in own))
    if not found:
        return None
    return (f"{where}: the runner sets {', '.join(found)} for each run ("
            + "; ".join(dict.fromkeys(RUNNER_FLAGS[f] for f in found)) + "): leave it out.")


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}.")


def _configs(value: Any, base: Path, where: str) -> list[Path]:
    if value is not None and not isinstance(value, (str, list, tuple)):
        raise ValueError(f"{where}: configs must be a file name or a list of them, got "
                         f"{value!r}.")
    names = [value] if isinstance(value, str) else list(value or [])
    return [resolve_config(str(n), base) for n in names]


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    """The ``seeds`` list: integers (a float, a string or a bare number is an error)."""
    values = value if isinstance(value, (list, tuple)) else [None]  # `seeds: 3`: 3 or 0-2?
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{where}: seeds must be a list of integers, e.g. [0, 1, 2]; got "
                         f"{value!r}.")
    return tuple(values) or (0,)


def load_grid(name_or_path: str | Path) -> Grid:
    """Read and check a grid file; every config must resolve (nothing is run here).

    Raises:
        FileNotFoundError: The grid or one of its configs is missing.
        ValueError: Not YAML, unknown keys, a value of the wrong type, bad or duplicate entry
            names, no entries.
        TypeError: An ``args`` field is neither a mapping nor a list.
    """
    path = find_grid(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a grid is a mapping with an `entries` list.")
    _check_keys(data, GRID_KEYS, str(path))
    common = data.get("common") or {}
    if not isinstance(common, dict) or not isinstance(data.get("entries") or [], list):
        raise ValueError(f"{path}: `common` must be a mapping and `entries` a list of mappings "
                         "(see hug_lightning/experiments/grid.py).")
    _check_keys(common, COMMON_KEYS, f"{path}: common")
    base = path.parent
    common_configs = _configs(common.get("configs"), base, "common")
    common_args = to_cli_args(common.get("args"), "common.args")
    common_test = to_cli_args(common.get("test_args"), "common.test_args")
    entries: list[Entry] = []
    for i, raw in enumerate(data.get("entries") or []):
        where = f"{path}: entry {i}"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be a mapping with name, configs, args.")
        _check_keys(raw, ENTRY_KEYS, where)
        name = str(raw.get("name", ""))
        if not NAME_RE.match(name):
            raise ValueError(f"{where}: name {name!r} must match {NAME_RE.pattern}.")
        if name.lower() in {e.name.lower() for e in entries}:  # one folder on macOS, Windows
            raise ValueError(f"{where}: duplicate entry name {name!r} (names that differ only "
                             "in case share a folder where file names ignore case).")
        configs = _configs(raw.get("configs"), base, where) + common_configs
        if not configs:
            raise ValueError(f"{where}: no config files.")
        args = common_args + to_cli_args(raw.get("args"), f"{where}: args")
        test_args = common_test + to_cli_args(raw.get("test_args"), f"{where}: test_args")
        why = (runner_flags(args, f"{where}: args")
               or runner_flags(test_args, f"{where}: test_args", test=True))
        if why is not None:
            raise ValueError(why)
        which = str(raw.get("test_checkpoint", common.get("test_checkpoint", "best")))
        if which not in ("best", "last"):
            raise ValueError(f"{where}: test_checkpoint must be 'best' or 'last', got {which!r}.")
        entries.append(Entry(name, tuple(configs), tuple(args), tuple(test_args), which))
    if not entries:
        raise ValueError(f"{path}: the grid has no entries.")
    name = str(data.get("name") or path.stem)
    if not NAME_RE.match(name):
        raise ValueError(f"{path}: grid name {name!r} must match {NAME_RE.pattern}.")
    seeds = _seeds([0] if data.get("seeds") is None else data["seeds"], f"{path}")
    return Grid(name, path, str(data.get("description") or "").strip(), seeds, tuple(entries))
