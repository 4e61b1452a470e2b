"""What TensorBoard's HPARAMS tab shows besides the model's own hyperparameters.

The model saves its init arguments (``save_hyperparameters``); the data modules do not, so the
tab had no batch size, dataset or split to compare runs by. :func:`data_hparams` adds the data
module's class and the plain-valued init options it keeps as attributes, under ``data``
(``data/batch_size``, ``data/seed``, ... in the tab). The NC monitor's last training
``nc1_pinv`` is declared as the metric ``hp/nc1_pinv`` next to the accuracies, once per log
folder: not again in a fit resumed into its run's folder (:func:`resumed_in_place`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule

#: declared for TensorBoard's HPARAMS tab; NaN until a stage logs the real value (a 0 would read
#: as a measured accuracy in runs that never ran that stage)
HP_METRICS = {"hp/val_acc_best": float("nan"), "hp/test_acc": float("nan"),
              "hp/nc1_pinv": float("nan")}


_PLAIN = (str, int, float, bool, type(None))


def is_plain(value: Any) -> bool:
    """Whether a hyperparameter is plain data (kept in checkpoints, which then load with
    ``weights_only=True``): None, str, int, float, bool, or lists/dicts of them."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def data_hparams(datamodule: Any) -> dict[str, Any]:
    """``{"data": {"class_path": ..., <option>: <value>, ...}}`` for a data module, ``{}``
    for none.

    Args:
        datamodule: The trainer's data module (``None`` when loaders were passed directly).

    Returns:
        Every ``__init__`` parameter (of the class and its bases) that the instance keeps as an
        attribute of the same name holding a bool, int, float or str.
    """
    if datamodule is None:
        return {}
    cls = type(datamodule)
    out: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    for klass in cls.__mro__:
        if klass in (LightningDataModule, object) or "__init__" not in vars(klass):
            continue
        for name in inspect.signature(klass.__init__).parameters:
            value = getattr(datamodule, name, None) if name != "self" else None
            if name not in out and isinstance(value, (bool, int, float, str)):
                out[name] = value
    return {"data": out}


def resumed_in_place(trainer: Any, logger: Any = None) -> bool:
    """Whether ``trainer`` resumes a checkpoint of its own log folder (``--ckpt_path last``),
    the first logger's (where Lightning writes the checkpoints); with ``logger``, one of a list,
    also whether that logger logs into a folder of the run it logged into before: on a resume
    the CLI gives every logger the run's version, a folder that is new to a logger added since
    (or of another ``save_dir``/``name`` whose numbers went their own way). Its TensorBoard
    events from before tell (this fit's writer has one file, an earlier one another)."""
    loggers = getattr(trainer, "loggers", None) or []
    ckpt, first = getattr(trainer, "ckpt_path", None), loggers[0] if loggers else None
    log_dir = getattr(first, "log_dir", None) if first is not None else None
    if not ckpt or not log_dir \
            or Path(log_dir).resolve() not in Path(str(ckpt)).resolve().parents:
        return False
    if logger is None or logger is first:
        return True
    own = getattr(logger, "log_dir", None)
    return own is not None and len(list(Path(own).glob("events.out.tfevents.*"))) > 1


__all__ = ["HP_METRICS", "data_hparams", "is_plain", "resumed_in_place"]
