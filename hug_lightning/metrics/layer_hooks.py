"""The layer-NC monitor's view of a module's layers: names resolved, outputs pooled.

:func:`resolve_layers` maps ``pl_module.named_modules()`` names to modules (a wrong name is a
:class:`~hug_lightning.cli_errors.ConfigError` naming the close matches); :func:`pool_output`
turns a hooked module's output into the ``(B, C)`` features
:class:`~hug_lightning.metrics.layers.LayerNCMonitor` collects.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from hug_lightning.cli_errors import ConfigError

_LIST_HINT = ("list them in Python: `[n for n, _ in main(ARGS, run=False).model.named_modules()]` "
              "(`from hug_lightning.cli import main`, ARGS: the command's arguments after the "
              "subcommand)")


def pool_output(layer: str, output: Any) -> Tensor:
    """A hooked module's output as ``(B, C)`` detached features (see :mod:`.layers`), in new
    memory: never a view of the output, which a later in-place op (``ReLU(inplace=True)``)
    would change while the features wait in the monitor's buffer.

    Raises:
        TypeError: The output is not a floating-point tensor.
        ValueError: The output is not 2-, 3- or 4-dimensional.
    """
    if not isinstance(output, Tensor) or not output.is_floating_point():
        kind = type(output).__name__ if not isinstance(output, Tensor) else f"{output.dtype}"
        raise TypeError(f"--layer_nc: the output of layer {layer!r} is a {kind}, not a "
                        "floating-point tensor: choose a module that returns one tensor (a "
                        f"submodule of it, or the next one); {_LIST_HINT}.")
    x = output.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.dim() == 4:  # (B, C, H, W): global average pooling
        return x.mean(dim=(2, 3))
    if x.dim() == 3:  # (B, T, C): mean over the tokens
        return x.mean(dim=1)
    if x.dim() == 2:
        return x.clone() if x.dtype == output.dtype else x  # (a cast made a copy already)
    raise ValueError(f"--layer_nc: the output of layer {layer!r} has shape {tuple(x.shape)}; "
                     "expected (B, C), (B, T, C) or (B, C, H, W): choose another module.")


def resolve_layers(pl_module: LightningModule, layers: Sequence[str]) -> dict[str, Any]:
    """``{name: module}`` for ``layers``; a :class:`ConfigError` naming the close matches for a
    name that is not one of ``pl_module.named_modules()``."""
    modules = dict(pl_module.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        names = [n for n in modules if n]
        hints = []
        for name in missing:
            close = [n for n in names if n.endswith("." + name)]
            close += difflib.get_close_matches(name, names, n=5, cutoff=0.6)
            close = list(dict.fromkeys(close))[:5]
            hints.append(f"{name!r} (close: {', '.join(close)})" if close else repr(name))
        raise ConfigError(f"--layer_nc.layers: not modules of {type(pl_module).__name__}: "
                          f"{'; '.join(hints)}. {_LIST_HINT[0].upper()}{_LIST_HINT[1:]}.")
    return {name: modules[name] for name in layers}


__all__ = ["pool_output", "resolve_layers"]
