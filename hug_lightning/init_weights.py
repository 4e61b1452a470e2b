"""Start a fit from another run's weights: the ``init`` group (transfer, fine-tuning).

``hug-lightning fit --config configs/cifar10_hug.yaml --init.path
logs/cifar10_ce/version_0/checkpoints/last.ckpt --init.skip '[head, embedding]'`` trains a HUG
head (and the BN-linear embedding ``cifar10_ce`` lacks) on the backbone a cross-entropy run
learned. Unlike ``--ckpt_path`` (a resume: optimizer, schedule,
epoch and loops restored), only the model's tensors are copied: the optimizer, the schedule, the
epoch and the step counters start afresh, and so do the metric states (``val_acc_best``).

When: Lightning 2.6 decides in ``Trainer._fit_impl`` which checkpoint a fit restores (its
``ckpt_path`` argument, or by itself the newest ``hpc_ckpt_<n>.ckpt`` under SLURM:
``_CheckpointConnector._parse_ckpt_path``) and hands it to ``Trainer._run``, which calls the
callbacks' ``setup``, then ``configure_model``, then ``_restore_modules_and_callbacks(ckpt_path)``
(whose ``resume_start`` records it as ``trainer.ckpt_path``), then ``strategy.setup`` (the
optimizers, the DDP wrapper). ``setup`` cannot see that decision (``trainer.ckpt_path`` is still
None, or a previous fit's), so :class:`InitWeights` hooks the connector's ``resume_start`` for
that one call: with no checkpoint to restore it loads the file there (after ``configure_model``:
the UFM's free features are sized; before the optimizers and DDP), with one it reads nothing
(the checkpoint holds the weights the run started from, so the file may be gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import Metric

from hug_lightning.cli_errors import ConfigError

__all__ = ["InitFileError", "InitWeights", "read_state_dict"]

SHOWN = 5  # keys named per kind in the messages


class InitFileError(FileNotFoundError):
    """The ``--init.path`` file is missing, unreadable or holds no state dict."""


def read_state_dict(path: str) -> dict[str, Any]:
    """Read the tensors of a checkpoint or a bare state dict, on the CPU (``weights_only``).

    Args:
        path: A Lightning checkpoint (its ``state_dict`` is returned) or a file written by
            ``torch.save(model.state_dict(), path)`` (a whole-model ``module.`` prefix, from a
            DDP wrapper, is removed).

    Returns:
        The tensors by key.

    Raises:
        InitFileError: The file is missing, unreadable or holds neither.
    """
    fs = get_filesystem(path)
    if not fs.isfile(path):
        raise InitFileError(
            f"--init.path {path}: no such file. Give a Lightning checkpoint (.ckpt) or a file "
            "written by torch.save(model.state_dict()), or --init.path null to start from a "
            "fresh initialisation.")
    try:
        with fs.open(path, "rb") as f:
            loaded = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (any unpickling error: say which file and option)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InitFileError(
            f"--init.path {path}: cannot be read by torch.load(weights_only=True): {reason}. "
            "Give a checkpoint or state dict file; one holding other pickled objects: save its "
            "tensors alone, torch.save(torch.load(path, weights_only=False)['state_dict'], "
            "'weights.pt'), and give that file.") from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        return dict(loaded["state_dict"])  # a Lightning checkpoint
    if isinstance(loaded, Mapping) and loaded and all(isinstance(k, str) for k in loaded) \
            and all(isinstance(v, Tensor) for v in loaded.values()):
        state = dict(loaded)
        if all(k.startswith("module.") for k in state):  # torch.save(ddp_model.state_dict())
            state = {k[len("module."):]: v for k, v in state.items()}
        return state
    raise InitFileError(
        f"--init.path {path}: holds a {type(loaded).__name__}, neither a Lightning checkpoint "
        "(a dict with 'state_dict') nor a state dict (names to tensors).")


def _plain(key: str) -> str:
    """``key`` without ``torch.compile``'s ``_orig_mod`` components (a compiled module's)."""
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def _under(key: str, prefixes: Any) -> bool:
    """``key`` is one of ``prefixes`` or inside one, by whole dotted components."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, Tensor) else None


def _named(keys: list[str], shapes: Mapping[str, Any] | None = None) -> str:
    shown = [f"{k} {shapes[k]}" if shapes is not None else k for k in keys[:SHOWN]]
    more = f", ... ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(shown) + more


def _into_averages(trainer: Trainer, loaded: Mapping[str, Tensor]) -> None:
    """Load ``loaded`` into the model copies of the ``WeightAveraging`` callbacks too.

    ``WeightAveraging`` (``EMAWeightAveraging``) copies the model in its ``setup``, before the
    file is read, swaps the copy in for every validation and copies it into the model at the
    end of ``fit``, updated or not: before its first update it must hold the weights the fit
    starts from, as in a fit whose fresh initialisation were the file's.
    """
    for callback in trainer.callbacks:  # (StochasticWeightAveraging's first update copies)
        if isinstance(callback, WeightAveraging) and callback._average_model is not None:
            callback._average_model.module.load_state_dict(loaded, strict=False)


class InitWeights(Callback):
    """Initialise the model of a new ``fit`` from a checkpoint's or a state dict's weights.

    Only a fit that restores no checkpoint loads the file (not one given ``--ckpt_path``, nor
    one Lightning restores by itself from SLURM's ``hpc_ckpt_<n>.ckpt``: those checkpoints hold
    the weights the run started from, and the file is not read). The optimizer, the schedule,
    the epoch and step counters and the metric states start afresh: this is not a resume.
    ``validate``, ``test`` and ``predict`` ignore the group (their saved configs repeat it).
    Every DDP process reads the same file, before the model is wrapped; the file's metric
    states (``val_acc_best``) are never copied. In Python, every such ``trainer.fit`` with this
    callback loads the file again (set ``path = None`` to continue from the trained weights).

    Args:
        path: A Lightning checkpoint (its ``state_dict``) or a file written by
            ``torch.save(model.state_dict())``; ``null`` (default): no initialisation.
        skip: Prefixes of the model's keys left at their fresh initialisation, by whole dotted
            components (``head`` is ``head.*``, not ``head_x``); the file's keys under them are
            ignored: ``[head]`` puts a HUG head on a CE run's backbone (and embedding).
        strict: Every other model tensor must be in the file with the same shape, and every
            other file tensor in the model (an error lists the differences). ``false`` loads
            what matches and warns with the counts of what was left out.
    """

    def __init__(self, path: str | None = None, skip: list[str] = [],  # noqa: B006
                 strict: bool = True) -> None:
        self.path = path
        self.skip = [_plain(str(p).strip().rstrip(".")) for p in skip]
        self.strict = strict

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.path is None:
            return
        strategy = trainer.strategy
        if strategy.restore_checkpoint_after_setup:  # FSDP, DeepSpeed: sharded by then
            raise ConfigError(
                f"--init.path: the {type(strategy).__name__} strategy shards the model before "
                "it restores checkpoints; the init group loads into an unsharded model (single "
                "device, DDP). Load the weights in the model's configure_model instead.")
        connector = trainer._checkpoint_connector
        method = connector.resume_start

        def resume_start(checkpoint_path: Any = None, weights_only: Any = None) -> None:
            connector.__dict__.pop("resume_start", None)  # once: this fit's restore
            if checkpoint_path:
                rank_zero_info(f"--init.path {self.path} not read: this fit resumes from "
                               f"{checkpoint_path}, which holds the weights it started from.")
            else:
                _into_averages(trainer, self.load_into(trainer.lightning_module))
            method(checkpoint_path, weights_only=weights_only)

        connector.resume_start = resume_start

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        connector = getattr(trainer, "_checkpoint_connector", None)
        if connector is not None:
            connector.__dict__.pop("resume_start", None)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        # a fit that failed between setup and its restore (Lightning calls no teardown then):
        # a later validate/test/predict of this trainer would otherwise load the file
        self.teardown(trainer, pl_module, "fit")

    def load_into(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """Copy the file's tensors into ``model`` (``skip`` and ``strict`` as configured).

        Returns:
            The tensors loaded, by the model's keys.
        """
        assert self.path is not None
        stored = {_plain(k): v for k, v in read_state_dict(self.path).items()}
        metrics = [name for name, m in model.named_modules() if isinstance(m, Metric) and name]
        shapes = {k: _shape(v) for k, v in model.state_dict().items()}
        own = {_plain(k): k for k in shapes if not _under(k, metrics)}
        unknown = [p for p in self.skip if not any(_under(k, [p]) for k in [*own, *stored])]
        if unknown:
            tops = sorted({k.split(".")[0] for k in own})
            raise ConfigError(f"--init.skip {unknown}: no key of the model or of {self.path} "
                              f"starts with it; the model's modules: {', '.join(tops)}.")
        kept = {k: own[k] for k in own if not _under(k, self.skip)}
        used = {k: v for k, v in stored.items() if not _under(k, [*self.skip, *metrics])}
        missing = [k for k in kept if k not in used]
        unexpected = [k for k in used if k not in kept]
        other = [k for k in kept if k in used and _shape(used[k]) != shapes[kept[k]]]
        if self.strict and (missing or unexpected or other):
            raise ConfigError(self._mismatch(missing, unexpected, other, used, kept, shapes))
        load = {kept[k]: used[k] for k in kept if k in used and k not in other}
        model.load_state_dict(load, strict=False)
        left = len(own) - len(kept)
        skipped = f", {left} left at their initialisation by --init.skip {self._skip}" \
            if self.skip else ""
        rank_zero_info(f"--init.path {self.path}: {len(load)} tensors loaded{skipped}; the "
                       "optimizer, schedule and epochs start afresh (not a resume).")
        if missing or unexpected or other:
            rank_zero_warn(
                f"--init.strict false: of {self.path}, {len(missing)} model tensors missing "
                f"from the file and {len(other)} of other shapes left at their initialisation"
                f" ({_named(missing + other)}); {len(unexpected)} file tensors not in the "
                f"model ignored ({_named(unexpected)}).")
        return load

    def _mismatch(self, missing: list[str], unexpected: list[str], other: list[str],
                  used: Mapping[str, Any], kept: Mapping[str, str],
                  shapes: Mapping[str, Any]) -> str:
        """The strict error: what differs, a few keys each, and what to do."""
        lines = [f"--init.path {self.path} does not fit the model (--init.strict true):"]
        if missing:
            lines.append(f"  model tensors not in the file ({len(missing)}): "
                         + _named(missing, {k: shapes[kept[k]] for k in missing}))
        if unexpected:
            lines.append(f"  file tensors not in the model ({len(unexpected)}): "
                         + _named(unexpected, {k: _shape(used[k]) for k in unexpected}))
        if other:
            lines.append(f"  other shapes ({len(other)}): " + _named(
                other, {k: f"file {_shape(used[k])} model {shapes[kept[k]]}" for k in other}))
        tops = sorted({k.split(".")[0] for k in [*missing, *unexpected, *other]} | {*self.skip})
        lines.append(f"Leave them at their initialisation with --init.skip '[{', '.join(tops)}]'"
                     " (whole dotted prefixes of the model's keys, e.g. head or backbone.fc), "
                     "or load what fits with --init.strict false"
                     + ("; other shapes: or build the model as the file's was (num_classes, "
                        "widths)." if other else "."))
        return "\n".join(lines)

    @property
    def _skip(self) -> str:
        return f"'[{', '.join(self.skip)}]'"
