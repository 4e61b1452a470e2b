"""Run folders of the CLI: where a command logs, and which checkpoint ``last``/``best`` means.

A run is ``<save_dir>/<name>/<version>/`` (TensorBoard or CSV logger; of a list of loggers,
the first one's, where Lightning writes the checkpoints, the others sharing its version).
``fit --ckpt_path last`` resumes the newest ``last.ckpt`` of the experiment in its own folder;
``validate|test|predict --ckpt_path last|best`` evaluate the newest run's last or best checkpoint
in a new folder, never writing into the training run's. Missing or unreadable checkpoints are
one clear error.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.fabric.loggers import TensorBoardLogger as FabricTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from hug_lightning.checkpointing import find_last_checkpoint
from hug_lightning.cli_errors import ConfigError, LogFolderError, RunNotFoundError
from hug_lightning.recorded_best import (AmbiguousBestError, checkpoint_state_key,
                                         choose_recorded_best)


def loggers_init_args(cfg: Any) -> list[Any]:
    """The ``init_args`` of every configured logger (``trainer.logger``: one logger or a list),
    in the configured order; None for one that writes no ``<save_dir>/<name>/<version>`` folder
    (:func:`_folder_logger`), whose options the run folders leave alone. The first one's folder
    is the run's: Lightning writes the checkpoints into ``trainer.loggers[0]``'s."""
    logger = cfg.get("trainer", {}).get("logger") if hasattr(cfg, "get") else None
    found = []
    for each in logger if isinstance(logger, list) else [logger]:
        init = getattr(each, "init_args", None) if each is not None else None
        if init is None and isinstance(each, dict):
            init = each.get("init_args")
        found.append(init if init is not None and _folder_logger(each, init) else None)
    return found


def _folder_logger(logger: Any, init: Any) -> bool:
    """Whether a configured logger is a TensorBoard or CSV logger (or a subclass): a ``version``
    folder under ``<save_dir>/<name>``. Others with a ``save_dir`` (MLflow's, W&B's, a user's)
    do not count: a ``version`` set on them is an option they reject or a run id. A class that
    cannot be imported here counts when it takes ``save_dir``, ``name`` and ``version``."""
    class_path = getattr(logger, "class_path", None)
    if class_path is None and isinstance(logger, dict):
        class_path = logger.get("class_path")
    module, _, attr = str(class_path or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return all(key in init for key in ("save_dir", "name", "version"))
    return isinstance(cls, type) and issubclass(cls, (FabricCSVLogger, FabricTensorBoardLogger))


def share_version(loggers: list[Any]) -> None:
    """Give the instantiated loggers that write to the first one's experiment (same
    ``save_dir`` and ``name``) and were given no ``version`` the first one's version folder.

    Each took the next free number in turn, so a TensorBoard and a CSV logger of one run wrote
    ``version_0`` and ``version_1``. Set on the loggers, not in the config: the saved
    ``config.yaml`` says ``version: null`` as with one logger, so running it again starts a new
    run rather than writing into this one.
    """
    run, *others = loggers or [None]
    for each in others if _experiment(run) is not None else ():
        if getattr(each, "_version", False) is None and _experiment(each) == _experiment(run):
            each._version = run.version  # TensorBoard's and CSV's own field for it


def _experiment(logger: Any) -> tuple[str, str] | None:
    """``(save_dir, name)`` of an instantiated logger, None without a ``save_dir``."""
    save_dir = getattr(logger, "save_dir", None)
    return None if save_dir is None else (os.path.normpath(str(save_dir)), str(logger.name))


def check_writable(folder: Path) -> None:
    """Fail before any work when the log folder cannot be created or written.

    Every process of a run checks, at the same moment; on a file system shared by several nodes
    two of them can have the same process id (each node's container numbers its own), so the
    probe has a name no other process can pick (``mkstemp``): a probe named by the pid alone
    was deleted under the other node, whose run then failed, "cannot write the log folder".
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".hug_write_test_", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise LogFolderError(
            f"Cannot write the log folder {folder.resolve()} ({err.strerror or err}). Choose "
            "another with --trainer.logger.init_args.save_dir <folder>."
        ) from err


def find_last(logger: Any, flag: str, filename: str = "last.ckpt") -> Path:
    """The newest readable ``last.ckpt`` (or ``filename``, a pattern) of the logger's
    experiment (``--ckpt_path <flag>``)."""
    if logger is None:
        raise ConfigError(f"--ckpt_path {flag} needs a TensorBoard/CSV logger with save_dir "
                          "and name to find the run; pass the checkpoint file instead.")
    save_dir, name = str(logger.get("save_dir") or "."), str(logger.get("name") or "")
    found = find_last_checkpoint(save_dir, name, filename)
    if found is None:
        raise RunNotFoundError(
            f"--ckpt_path {flag}: no {Path(save_dir) / name}/*/checkpoints/{filename} found. "
            "Give the checkpoint file instead (or train first).")
    try:  # a write cut by SIGKILL or a full disk lacks the zip directory at the end
        with zipfile.ZipFile(found):
            pass
    except (zipfile.BadZipFile, OSError) as err:
        raise RunNotFoundError(
            f"--ckpt_path {flag}: {found} cannot be read ({type(err).__name__}: {err}); it is "
            "truncated or corrupt (an interrupted write?). Pass another checkpoint file "
            "(e.g. the best one next to it), or move it away to start over.") from err
    return found


def resolve_last(cfg: Any, loggers: list[Any]) -> None:
    """``fit --ckpt_path last``: the newest last.ckpt of this experiment, resumed in place.

    Every logger keeps writing into its own folder of that run: the run's version (its folder's
    name, ``version_3``) is set on each logger of the list, so one with another ``save_dir`` or
    ``name`` resumes in ``version_3`` of its own experiment, the folder a fit that wrote with the
    same loggers from the start gave it (not its newest one, which may be another run's; a new
    folder where it has none).
    """
    found = find_last(loggers[0] if loggers else None, "last")
    cfg["ckpt_path"] = str(found)
    for each in loggers:  # the configured ones (loggers_init_args), the run's first
        if each is not None:  # keep logging into the same run folder
            each["version"] = found.parent.parent.name


def resolve_evaluated(cfg: Any, logger: Any, which: str) -> None:
    """``validate|test|predict --ckpt_path last|best``: the newest run of this experiment.

    Lightning alone resolves these only inside the process that trained: in a new process
    ``last`` silently evaluates the untrained model and ``best`` fails with a misleading
    message. ``best`` is the best checkpoint recorded in that run's newest checkpoint (its
    ``last.ckpt``, or with ``--last.enabled false`` the newest file ``ModelCheckpoint`` wrote:
    each records the best one so far), that of the ``checkpoint`` group as configured here
    (other ``ModelCheckpoint`` callbacks in ``trainer.callbacks`` do not count; see
    :func:`~hug_lightning.recorded_best.choose_recorded_best` for a run without its file).
    """
    found = find_last(logger, which, "*.ckpt" if which == "best" else "last.ckpt")
    if which == "best":
        key = checkpoint_state_key(cfg.get("checkpoint"))
        try:
            chosen = choose_recorded_best(found, key)
        except AmbiguousBestError as err:
            raise AmbiguousBestError(f"--ckpt_path best: {err}") from None
        if chosen is None:
            raise RunNotFoundError(
                f"--ckpt_path best: {found} records no best checkpoint (or its file is "
                "gone); give the checkpoint file instead.")
        found, chosen_key = chosen
        if chosen_key != key and rank_zero_only.rank == 0:
            print(f"--ckpt_path best: {found} (no best file of the `checkpoint` group's "
                  f"{key}; the only other monitored one: {chosen_key}).", file=sys.stderr)
    cfg["ckpt_path"] = str(found)


CKPT_PATH_HELP = {  # plain text: the terminal shows it as written
    "fit": "Checkpoint to resume from: a file, or 'last': the newest last.ckpt of this "
           "experiment (<save_dir>/<name>/version_*), resumed in its own folder.",
    "validate": "Checkpoint to load: a file, or 'last' / 'best': the last or the best "
                "checkpoint of the newest run of this experiment (<save_dir>/<name>, "
                "trainer.logger.init_args). Without it, the untrained model is used.",
}


def describe_ckpt_path(parsers: dict[str, Any]) -> None:
    """Put what ``--ckpt_path last|best`` means here into the subcommands' help (Lightning's
    own says: the previous ``trainer.fit`` call of the same process)."""
    for subcommand, parser in parsers.items():
        text = CKPT_PATH_HELP["fit" if subcommand == "fit" else "validate"]
        for action in getattr(parser, "_actions", ()):
            if action.dest == "ckpt_path":
                action.help = text


def run_folder(logger: Any) -> Path | None:
    """The version folder a logger with a fixed ``version`` writes to (None: a new one)."""
    version = logger.get("version")
    if version is None:
        return None
    return Path(str(logger.get("save_dir") or "."), str(logger.get("name") or ""),
                version if isinstance(version, str) else f"version_{version}")


def never_into_a_run_folder(logger: Any, subcommand: str, others: list[Any] = ()) -> None:
    """``validate|test|predict`` log into a new version folder, never a training run's: the
    config saved by a resumed fit names its version, and reusing it would overwrite that run's
    ``config.yaml`` with the evaluation's. ``others``, the list's other loggers, leave the run's
    version as well (a CSV logger would replace the run's ``metrics.csv``)."""
    folder = run_folder(logger)
    if folder is not None and (folder / "config.yaml").is_file():
        for each in (logger, *others):
            if each is not None:
                each["version"] = None
        if rank_zero_only.rank == 0:  # once, not once per DDP process
            print(f"{subcommand}: {folder} holds a run; logging into a new version folder.",
                  file=sys.stderr)


@contextlib.contextmanager
def evaluation_warnings(subcommand: str, resumes_in_place: bool = False) -> Iterator[None]:
    """Run ``subcommand`` without two notes of Lightning's that only alarm here: when the
    command is not ``fit``, that a checkpoint's ``ModelCheckpoint`` state is not reloaded
    because its folder changed (an evaluation logs into a new version folder,
    :func:`never_into_a_run_folder`, and saves no checkpoint); and, for a fit resumed into its
    own run folder (``resumes_in_place``: ``--ckpt_path last``, the grid runner's resume), that
    the checkpoint folder "exists and is not empty": it holds the checkpoint being resumed and
    the run's best, as it should. A new fit into a folder with checkpoints still warns."""
    with warnings.catch_warnings():
        if subcommand != "fit":
            warnings.filterwarnings("ignore", message="The dirpath has changed from")
        elif resumes_in_place:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is "
                                                      r"not empty")
        yield
