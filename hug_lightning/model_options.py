"""Model options that a configuration gives but the command does not use: say so.

Two ways a value written in the YAML or on the command line is silently replaced:

* ``model.init_args.num_classes`` is linked from the data module
  (:func:`warn_replaced_num_classes`);
* ``--ckpt_path`` makes Lightning (>= 2.6) rebuild the model from the checkpoint's
  hyperparameters (:func:`warn_replaced_by_checkpoint`).

Used by :class:`~hug_lightning.cli.HUGLightningCLI`.
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from hug_lightning.cli_errors import ConfigError


def warn_replaced_num_classes(config: Any, model: Any, datamodule: Any) -> None:
    """``model.init_args.num_classes`` is linked from the data module, which silently wins
    over a value given in the YAML or on the command line: say so when they differ (a value
    equal to the model's default cannot be told from no value, and is not reported).

    Args:
        config: The CLI's parsed configuration (``cli.config``).
        model: The instantiated model.
        datamodule: The instantiated data module.
    """
    sub = config.get("subcommand")
    cfg = config.get(sub) if sub else config
    init = getattr(cfg.get("model"), "init_args", None) if cfg is not None else None
    given = init.get("num_classes") if init is not None else None
    data_k = getattr(datamodule, "num_classes", None)
    default = None  # the first class up the MRO that names num_classes has the default
    for cls in type(model).__mro__:
        param = inspect.signature(cls.__init__).parameters.get("num_classes")
        if param is not None:
            default = param.default
            break
    if cfg is not None and cfg.get("ckpt_path") and given is not None and data_k is not None \
            and given != data_k:  # the model's options come from the checkpoint here
        raise ConfigError(
            f"--ckpt_path: the checkpoint's model has num_classes={given}, the data module "
            f"{type(datamodule).__name__} has {data_k} classes; use it with the data "
            "it was trained on (or train a new model).")
    if given is not None and data_k is not None and given not in (data_k, default):
        rank_zero_warn(
            f"model.init_args.num_classes={given} is not used: the model takes num_classes="
            f"{data_k} from the data module (linked). Remove it, or change the data.")


def warn_replaced_by_checkpoint(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Name the model options that ``--ckpt_path`` replaced.

    Args:
        before: :func:`flat` model options as configured, before Lightning read the checkpoint.
        after: The same after it rebuilt them from the checkpoint's hyperparameters.
    """
    changed = [k for k in before if k in after and before[k] != after[k]
               and not k.endswith("num_classes")]  # linked from the data: not the user's
    if changed:
        rank_zero_warn(
            "--ckpt_path: the model is rebuilt from the checkpoint's hyperparameters, so "
            "these model options of the config/command line are NOT used: "
            + "; ".join(f"{k}: {before[k]!r} -> {after[k]!r}" for k in changed[:8])
            + ("; ..." if len(changed) > 8 else "")
            + ". Start a new run (no --ckpt_path) to train with other model options.")


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a (nested) config namespace or dict, keyed by dotted paths."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


__all__ = ["flat", "warn_replaced_by_checkpoint", "warn_replaced_num_classes"]
