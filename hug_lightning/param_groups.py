"""Optimizer parameter groups: which parameters get weight decay, and the head's learning rate.

Pure PyTorch (no Lightning import). :class:`~hug_lightning.module.ClassifierModule` calls
:func:`parameter_groups` from its ``parameter_groups`` hook and :func:`apply_lr_scale` once the
optimizer is built; a subclass that wants other groups overrides that hook.
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn
from torch.optim import Optimizer

#: layer types whose parameters the ``norm`` exemption covers (``_NormBase``: batch and instance
#: norms, SyncBatchNorm included)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
              *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
#: the parameter kinds ``no_weight_decay`` may name
KINDS = ("norm", "bias", "head", "embedding")


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_bias(name: str) -> bool:
    """Whether a parameter's own name (no module prefix) names a bias vector: ``bias``, or
    ``<something>_bias`` as ``nn.MultiheadAttention``'s ``in_proj_bias`` (torchvision's ViTs)."""
    return name == "bias" or name.endswith("_bias")


def check_kinds(no_weight_decay: Iterable[str]) -> tuple[str, ...]:
    """``no_weight_decay`` as a tuple, or a ``ValueError`` naming an unknown kind."""
    kinds = tuple(no_weight_decay)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"no_weight_decay: unknown kinds {unknown}; choose from {list(KINDS)}.")
    return kinds


def parameter_groups(
    model: nn.Module,
    no_weight_decay: Iterable[str] = (),
    head_lr_scale: float = 1.0,
    head: str = "head",
    embedding: str = "embedding",
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into up to four groups: head or body, with or
    without weight decay.

    Args:
        model: The module whose parameters to group (each parameter appears once, even when
            shared between submodules).
        no_weight_decay: Parameter kinds exempt from weight decay: ``norm`` (parameters of
            normalization layers, :data:`NORM_TYPES`), ``bias`` (see :func:`is_bias`),
            ``head`` (everything under the ``head`` submodule), ``embedding`` (everything
            under the ``embedding`` submodule).
        head_lr_scale: Learning-rate multiplier of the head's groups, stored as ``lr_scale``
            (see :func:`apply_lr_scale`); omitted when 1.
        head: Name of the head submodule.
        embedding: Name of the embedding submodule.

    Returns:
        Groups named ``body``, ``body_no_decay``, ``head``, ``head_no_decay`` (only the
        non-empty ones, in that order); exempt groups carry ``weight_decay = 0``.
    """
    exempt_kinds = check_kinds(no_weight_decay)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            in_head = _under(mod_name, head)
            kinds = {
                "norm": isinstance(module, NORM_TYPES),
                "bias": is_bias(p_name),
                "head": in_head,
                "embedding": _under(mod_name, embedding),
            }
            exempt = any(kinds[k] for k in exempt_kinds)
            groups.setdefault((in_head, exempt), []).append(param)
    out = []
    for (in_head, exempt), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "name": ("head" if in_head else "body")
                                 + ("_no_decay" if exempt else "")}
        if exempt:
            group["weight_decay"] = 0.0
        if in_head and head_lr_scale != 1.0:
            group["lr_scale"] = float(head_lr_scale)
        out.append(group)
    return out


def apply_lr_scale(optimizer: Optimizer) -> Optimizer:
    """Multiply each group's ``lr`` by its ``lr_scale`` (then drop the key); returns ``optimizer``.

    Done after the optimizer is built, because an optimizer factory sets the base ``lr`` of
    every group.
    """
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.pop("lr_scale", 1.0)
    return optimizer
