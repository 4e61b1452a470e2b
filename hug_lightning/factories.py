"""Optimizer and scheduler factories without the CLI behind them.

LightningCLI gives :class:`~hug_lightning.module.ClassifierModule` its ``optimizer`` and
``scheduler`` as jsonargparse partials (jsonargparse 4.53)::

    functools.partial(call_without_instantiate_context, ClassInstantiator(...), torch.optim.SGD,
                      lr=..., momentum=..., ...)

The ``ClassInstantiator`` holds the CLI's instantiators, which hold the CLI itself: its parser
and config, the trainer, the data module (its data) and the loggers. A module keeping such a
partial took all of them along when it was pickled (``torch.save(model)``, a ``ddp_spawn``
fit) or deep-copied, or failed when one of them could not be pickled.

:func:`plain_factory` turns such a partial into ``functools.partial(torch.optim.SGD, lr=...,
...)``: the same call, since the instantiator only calls the class as is when none of its
registered instantiators (LightningCLI registers one for the LightningModule and one for the
LightningDataModule) claims the class. Anything else, including a partial of a layout it does
not recognise (another jsonargparse version), is returned unchanged.

:func:`check_optimizer` builds the optimizer once, over a dummy parameter, when the model is
constructed: a value it rejects (``lr: -1``) is a configuration error before any work.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

try:  # private names: without them (another jsonargparse layout) factories stay as they are
    from jsonargparse._instantiation import (ClassInstantiator, call_without_instantiate_context,
                                             default_class_instantiator)
except ImportError:  # pragma: no cover - depends on the installed jsonargparse
    ClassInstantiator = call_without_instantiate_context = default_class_instantiator = None


def _flattened(factory: functools.partial) -> tuple[Callable, tuple, dict[str, Any]]:
    """``(func, args, keywords)`` of a partial, nested plain partials merged into one."""
    func, args, keywords = factory.func, factory.args, dict(factory.keywords)
    while type(func) is functools.partial and not func.__dict__:
        args = func.args + args
        keywords = {**func.keywords, **keywords}
        func = func.func
    return func, args, keywords


def _calls_class_as_is(instantiator: Any, cls: type) -> bool:
    """Whether jsonargparse's ``instantiator`` builds ``cls`` by calling ``cls(*args, **kw)``."""
    if instantiator is default_class_instantiator:
        return True
    if type(instantiator) is not ClassInstantiator:
        return False
    registered = getattr(instantiator, "instantiators", None)
    if not isinstance(registered, dict):
        return False
    for key in registered:  # ClassInstantiator.__call__'s rule: (class, subclasses too)
        if not (isinstance(key, tuple) and len(key) == 2 and inspect.isclass(key[0])):
            return False
        claimed, subclasses = key
        if cls is claimed or (subclasses and issubclass(cls, claimed)):
            return False
    return True


def plain_factory(factory: Any) -> Any:
    """``factory`` without jsonargparse's instantiator when it is a jsonargparse partial
    that calls its class as is; ``factory`` itself otherwise.

    Args:
        factory: An optimizer or scheduler factory (any callable, or ``None``).

    Returns:
        ``functools.partial(cls, *args, **keywords)`` for
        ``partial(call_without_instantiate_context, instantiator, cls, *args, **keywords)``
        whose instantiator builds ``cls`` by calling it; ``factory`` unchanged for anything
        else.
    """
    if call_without_instantiate_context is None or type(factory) is not functools.partial \
            or factory.__dict__:
        return factory
    func, args, keywords = _flattened(factory)
    if func is not call_without_instantiate_context or len(args) < 2:
        return factory
    instantiator, cls, rest = args[0], args[1], args[2:]
    if not inspect.isclass(cls) or not _calls_class_as_is(instantiator, cls):
        return factory
    return functools.partial(cls, *rest, **keywords)


def _factory_name(factory: Any) -> str:
    """The class (or function) a factory builds, for messages: ``SGD`` for
    ``partial(torch.optim.SGD, lr=...)``, also behind jsonargparse's instantiator."""
    func, args = factory, ()
    if type(factory) is functools.partial:
        func, args, _ = _flattened(factory)
        if func is call_without_instantiate_context and len(args) >= 2:
            func = args[1]
    return getattr(func, "__qualname__", type(func).__name__)


def check_optimizer(factory: Any) -> None:
    """Build the optimizer ``factory`` once over a dummy 2 x 2 parameter, so that a value it rejects
    (``lr: -1``, ``momentum: -0.5``, ``betas: [1.5, 0.9]``) is a ``ValueError`` of the model's
    constructor (the command's one-line ``invalid configuration`` error, exit status 2, before
    any data are read) instead of a traceback from ``configure_optimizers`` once the fit has
    started. Only the optimizer's own ``ValueError`` is turned into that message; anything
    else a dummy parameter on the CPU may cause (a ``fused`` or device-only option) is left
    for the real build in ``configure_optimizers``.

    Args:
        factory: The optimizer factory, called with a list of parameter groups.

    Raises:
        ValueError: The optimizer rejected one of its arguments; names the class and the
            flag prefix to fix it with.
    """
    if factory is None:
        return
    try:  # a matrix: torch.optim.Muon rejects any other shape (a ValueError of its own)
        factory([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}])
    except ValueError as err:
        raise ValueError(f"optimizer {_factory_name(factory)}: {err} (set its arguments with "
                         "--model.init_args.optimizer.init_args.<name>)") from err
    except Exception:  # noqa: BLE001 - not a rejected value: the real build will say
        return
