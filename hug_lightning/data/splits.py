"""Seeded index splits and label checks shared by the DataModules."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from hug_lightning.cli_errors import ConfigError
from hug_lightning.data.base import BadDataError

#: The end of the error for a positive ``val_split`` that holds out nothing: data modules then
#: validate on the test set, which is what ``val_split`` 0 asks for, not a positive value.
_NOTHING_HELD_OUT = ("validation would silently run on the test set instead. Use {hint}, or "
                     "val_split 0 to validate on the test set on purpose.")


def check_val_split(val_split: int | float) -> int | float:
    """``val_split`` itself, or the error a DataModule's constructor raises for a value no data
    set can take (a bool, a negative count, ``1.0``, a fraction outside ``[0, 1)``); whether a
    count fits the data is known at setup (:func:`val_count`)."""
    if isinstance(val_split, bool) or not isinstance(val_split, (int, float)):
        raise TypeError(f"val_split must be an int count or a float fraction, got {val_split!r}.")
    if isinstance(val_split, float) and val_split == 1.0:
        raise ValueError("val_split=1.0 would hold out the whole training set; use a fraction "
                         "in [0, 1) or an int count.")
    if isinstance(val_split, float) and not val_split.is_integer() and not 0 < val_split < 1:
        raise ValueError(
            f"val_split must be an int count or a fraction in [0, 1), got {val_split}.")
    if val_split < 0:
        raise ValueError(f"val_split must not be negative, got {val_split}.")
    return val_split


def val_count(n: int, val_split: int | float) -> int:
    """The number of validation samples ``val_split`` asks for out of ``n`` (see
    :func:`split_indices`), or an error that says what to give instead: a :class:`ConfigError`
    (the command line's one-line message) when a count does not fit the ``n`` samples."""
    check_val_split(val_split)
    if isinstance(val_split, float) and not val_split.is_integer():
        n_val = int(round(n * val_split))
    else:
        n_val = int(val_split)
    if n_val == 0 and val_split > 0:
        raise ConfigError(f"val_split={val_split} holds out 0 of {n} samples (it rounds to 0): "
                          + _NOTHING_HELD_OUT.format(hint=f"a fraction above {0.5 / n:.3g}"))
    if not n_val < n:
        raise ConfigError(f"val_split={val_split} asks for {n_val} of the {n} training samples "
                          f"(--data.init_args.val_split); use a count in [0, {n}) or a "
                          "fraction in [0, 1).")
    return n_val


def split_indices(n: int, val_split: int | float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(n)`` into ``(train, val)`` index tensors (train sorted,
    validation in the permutation's order, mixing the classes of class-ordered data).

    Args:
        n: Number of samples.
        val_split: Validation size: an int count, or a float fraction in ``[0, 1)``. 0 gives
            an empty validation part; a whole-number float above 1 (``5000.0``) is a count,
            and ``1.0`` is an error (it would hold out everything), as is a positive fraction
            that rounds to 0 samples.
        seed: Seed of the permutation (the same split on every rank and every run).
    """
    n_val = val_count(n, val_split)
    if n_val == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # validation keeps the random order: data stored class by class (image folders) would
    # otherwise give `limit_val_batches` runs a single class
    return perm[n_val:].sort().values, perm[:n_val]


def seeded_choice(n: int, k: int, seed: int, class_index: int, stream: int = 0) -> list[int]:
    """``k`` sorted indices of ``range(n)``: the first ``k`` of a ``torch.randperm`` whose seed
    mixes ``(seed, class_index, stream)`` by NumPy's ``SeedSequence`` (never Python's ``hash``):
    the same on every rank and every run."""
    state = np.random.SeedSequence([seed % 2**63, class_index, stream]).generate_state(1, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0]) % 2**63)
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def stratified_split(labels: Tensor, val_split: int | float, seed: int,
                     class_keys: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Per-class seeded split into ``(train, val)`` index tensors.

    Args:
        labels: Labels of the samples.
        val_split: Validation fraction (float in ``[0, 1)``) or about this many samples (int,
            turned into a fraction); each class gives ``round(fraction * n_c)`` samples to
            validation but keeps at least one for training. A positive value that holds out
            no sample at all is a :class:`~hug_lightning.cli_errors.ConfigError`.
        seed: Seed of the per-class choice.
        class_keys: Per label, the integer that seeds its class's choice with ``seed``
            (default: the label itself); a key that names the class, not its position, holds
            out the same samples of a class in every subset of classes that holds it.
    """
    n = len(labels)
    val_count(n, val_split)  # the checks
    if isinstance(val_split, float) and val_split.is_integer():
        val_split = int(val_split)  # a count written as a float (5000.0), as val_count reads it
    frac = val_split / n if isinstance(val_split, int) else float(val_split)
    if frac == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    train, val = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        k = min(round(frac * len(idx)), len(idx) - 1)
        chosen = torch.zeros(len(idx), dtype=torch.bool)
        key = c if class_keys is None else class_keys[c]
        chosen[seeded_choice(len(idx), k, seed, key, stream=1)] = True
        train.append(idx[~chosen])
        val.append(idx[chosen])
    if not sum(len(v) for v in val):  # a positive val_split that rounds to 0 in every class
        largest = int(torch.bincount(labels).max()) if n else 0
        hint = (f"a val_split above {0.5 / largest:.3g}" if largest > 1 else
                "more than one training image per class (each class keeps one for training)")
        raise ConfigError(
            f"val_split holds out no image: each class gives round({frac:.3g} x its size) to "
            f"validation and keeps one for training, 0 for every class here (the largest has "
            f"{largest}), so " + _NOTHING_HELD_OUT.format(hint=hint))
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def out_of_range_label(labels: Tensor, num_classes: int) -> int | None:
    """A label outside ``[0, num_classes)`` (the lowest if negative, else the highest), or None."""
    if labels.numel() == 0:
        return None
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        return low
    return high if high >= num_classes else None


def check_label_range(labels: Tensor, num_classes: int, source: str) -> None:
    """Raise a :class:`~hug_lightning.data.base.BadDataError` (a ``ValueError``) naming
    ``source`` when a label is outside ``[0, num_classes)``."""
    bad = out_of_range_label(labels, num_classes)
    if bad is not None:
        where = int((labels == bad).nonzero()[0])  # the first sample with the reported label
        raise BadDataError(
            f"Label {bad} (sample {where}) in {source} is outside [0, {num_classes}); "
            f"this data set has {num_classes} classes. The data files are inconsistent: "
            "regenerate or re-download them."
        )
