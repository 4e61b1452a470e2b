"""ClassifierModule: backbone -> optional embedding -> pluggable head.

The training loop is written once (in the base class :class:`~hug_lightning.loop.ClassifierLoop`);
everything a study changes is a constructor argument chosen in YAML (``class_path``) or one small
hook of this class to override in a subclass:

* :meth:`configure_backbone`, :meth:`configure_embedding`, :meth:`configure_head` build the
  three stages;
* :meth:`parameter_groups` decides which parameters get weight decay;
* :meth:`step` is the shared train/val/test step (features -> head -> loss, logits);
* :meth:`configure_metrics` creates the per-stage metrics and :meth:`update_metrics` feeds and
  logs them at validation and test (override both to add a metric).

:meth:`step` returns a dict with ``loss``, ``features`` (``(B, feature_dim)``), ``logits``
(``(B, K)``), ``labels`` and optionally ``terms`` (named loss terms to log); ``features`` still
carry their graph, so an override can add a feature term to the loss (``out = super().step(
batch, stage); out["loss"] = out["loss"] + ...``). Every ``*_step`` detaches them and passes the
dict on, so callbacks such as the neural-collapse monitor read what they need from ``outputs``
without touching the module. The NC eval pass and ``predict`` call :meth:`forward_features`
and the head's ``logits`` directly (not :meth:`step`); every stage reads batches through
:meth:`unpack_batch` (``(images, labels)`` tuples by default: override it for dicts).

The ``configure_*`` hooks run inside ``__init__``: a subclass sets the attributes they read
before calling ``super().__init__()``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal, Sequence

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from hug_lightning.backbones import CifarResNet
from hug_lightning.classifier_metrics import ClassifierMetrics
from hug_lightning.compiling import HeadStep, check_compile_options
from hug_lightning.factories import check_optimizer, plain_factory
from hug_lightning.guards import (FiniteLossGuard, RunningStatsSnapshot, check_backbone_width,
                                  check_features, check_labels, check_logits,
                                  check_policy_for_processes)
from hug_lightning.heads import CrossEntropyHead, Head, HeadCallable
from hug_lightning.hp_tab import is_plain
from hug_lightning.loop import unpack_batch_of
from hug_lightning.losses.hug import CountSync
from hug_lightning.metrics.collapse import all_reduce_sync
from hug_lightning.optim import build_optimizers, run_length
from hug_lightning.param_groups import check_kinds, parameter_groups
from hug_lightning.plateau_steps import PlateauSteps
from hug_lightning.step_log import StepLog


def global_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over the DDP processes (a bare ``all_reduce`` on a copy)."""
    return all_reduce_sync(tensor)[0]


def global_max(tensor: Tensor) -> Tensor:
    """``tensor``'s maximum over the DDP processes (an ``all_reduce`` on a copy)."""
    out = tensor.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return out


class ClassifierModule(ClassifierMetrics):
    """Image classifier: ``backbone(x) -> [embedding] -> head``, trained by the head's loss.

    Args:
        backbone: Any ``nn.Module`` mapping a batch to ``(B, d)`` features and exposing their
            width as ``num_features`` (see ``hug_lightning.backbones``).
        head: Head factory, called as ``head(num_classes, in_features)``: cross-entropy
            (``hug_lightning.heads.CrossEntropyHead``) or HUG (``hug_lightning.heads.HUGHead``).
        num_classes: Number of classes; LightningCLI links it from ``data.num_classes``.
        embedding_dim: Width of a linear embedding between backbone and head (no ReLU, so
            features can take negative coordinates); ``None`` feeds the backbone's features
            to the head directly.
        embedding_norm: Follow the embedding's Linear by BatchNorm1d ("BN-linear").
        optimizer: Optimizer factory called with the parameter groups.
        scheduler: Learning-rate scheduler factory called with the optimizer, or ``None``.
            ``hug_lightning.optim.OneCycleLR`` and ``WarmupCosineLR`` learn the run length.
        scheduler_interval: Step the scheduler every ``step`` (batch) or every ``epoch``.
        scheduler_monitor: The logged metric a ``ReduceLROnPlateau`` scheduler follows (it is
            then stepped once per epoch, after validation, before the epoch's checkpoints:
            :mod:`hug_lightning.plateau_steps`); ignored by other schedulers.
        no_weight_decay: Parameter kinds exempt from weight decay: ``norm`` (normalization
            layers), ``bias``, ``head`` (class vectors / proxies), ``embedding``.
        head_lr_scale: Multiplier of the learning rate of the head's parameters (class
            vectors / proxies) relative to the optimizer's ``lr``.
        nonfinite_loss: What a NaN or Inf loss does: ``raise`` (stop with the epoch, step and
            loss terms; on GPUs read asynchronously, a few steps late, to avoid a host sync) or
            ``skip`` (skip that batch's update and count it in ``train/skipped_batches``; one
            process only: under DDP Lightning cannot skip a step, so it is an error there).
        channels_last: Use the channels-last memory format for images and the backbone's
            convolution weights (faster convolutions on GPUs under mixed precision).
        compile: Compile the backbone with ``torch.compile`` (in place: checkpoints load with
            or without it; the first steps are slower while it compiles).
        compile_loss: Compile the head's training step (loss, terms and logits) with
            ``torch.compile``: fuses the HUG losses' small kernels (see
            :mod:`hug_lightning.compiling`).
        compile_options: Keyword arguments of ``torch.compile`` for both, e.g.
            ``{mode: max-autotune}`` or ``{dynamic: false}`` (one static graph per batch size).
    """

    def __init__(
        self,
        backbone: nn.Module = lazy_instance(CifarResNet, depth=18),
        head: HeadCallable = CrossEntropyHead,
        num_classes: int = 10,
        embedding_dim: int | None = None,
        embedding_norm: bool = False,
        optimizer: OptimizerCallable = torch.optim.SGD,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        scheduler_monitor: str = "val/loss",
        no_weight_decay: Sequence[Literal["norm", "bias", "head", "embedding"]] = (),
        head_lr_scale: float = 1.0,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        channels_last: bool = False,
        compile: bool = False,
        compile_loss: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():  # modules/factories are dropped just below
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        for key in [k for k, v in self.hparams.items() if not is_plain(v)]:
            del self.hparams[key]  # keep checkpoints loadable with weights_only=True
        if embedding_dim is not None and embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive or null, got {embedding_dim}.")
        if embedding_norm and embedding_dim is None:
            raise ValueError("embedding_norm=true needs an embedding: set embedding_dim (the "
                             "width of the Linear that BatchNorm1d follows).")
        self.num_classes = int(num_classes)
        # the CLI's factories hold the CLI (trainer, data module): kept as plain partials, so
        # that pickling the module (torch.save, ddp_spawn) does not take them along
        self.optimizer_factory = plain_factory(optimizer)
        check_optimizer(self.optimizer_factory)  # lr: -1 is a configuration error, now
        self.scheduler_factory = plain_factory(scheduler)
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.no_weight_decay = check_kinds(no_weight_decay)
        if head_lr_scale <= 0:
            raise ValueError(f"head_lr_scale must be positive, got {head_lr_scale}.")
        self.head_lr_scale = float(head_lr_scale)
        self.channels_last = channels_last
        self.backbone = self.configure_backbone(backbone)
        width = check_backbone_width(self.backbone, backbone)
        self.embedding, self.feature_dim = self.configure_embedding(
            width, embedding_dim, embedding_norm
        )
        self.head = self.configure_head(head, self.num_classes, self.feature_dim)
        if channels_last:  # weights too: a channels-last input with NCHW weights makes every
            # convolution convert its weight (forward) and its gradient (backward) each step
            self.backbone.to(memory_format=torch.channels_last)
        options = check_compile_options(compile_options, compile, compile_loss)
        if compile:  # in place: state_dict keys (and checkpoints) stay the same as without
            self.backbone.compile(**options)
        self.head_step = HeadStep(options if compile_loss else None)
        self.loss_guard = FiniteLossGuard(policy=nonfinite_loss)
        self._norm_snapshot = RunningStatsSnapshot(self)
        self.step_log = StepLog()
        self.plateau_steps = PlateauSteps()
        self._labels_checked: set[str] = set()
        self.configure_metrics()

    # ----------------------------------------------------------------- hooks to override
    def configure_backbone(self, backbone: nn.Module) -> nn.Module:
        """Return the backbone to use (override to wrap, freeze or replace it)."""
        return backbone

    def configure_embedding(
        self, in_features: int, embedding_dim: int | None, norm: bool
    ) -> tuple[nn.Module, int]:
        """Return ``(embedding module, output width)``; Identity when ``embedding_dim`` is None."""
        if embedding_dim is None:
            return nn.Identity(), in_features
        layers: list[nn.Module] = [nn.Linear(in_features, embedding_dim, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm1d(embedding_dim))
        return nn.Sequential(*layers), embedding_dim

    def configure_head(self, head: HeadCallable, num_classes: int, in_features: int) -> Head:
        """Build the head from its factory."""
        built = head(num_classes, in_features)
        if not isinstance(built, Head):
            raise TypeError(f"head must build a hug_lightning.heads.Head, got {type(built)}.")
        got = getattr(built, "num_classes", num_classes)  # (in_features may be a projection's)
        if got != num_classes:
            raise TypeError(
                f"{type(built).__name__} was built with num_classes={got} for num_classes="
                f"{num_classes} (in_features={in_features}): the module calls "
                "head(num_classes, in_features) positionally, so keep them the first two "
                "constructor arguments, in that order.")
        return built

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups: weight decay or not (``no_weight_decay``), head or not (see
        :func:`hug_lightning.param_groups.parameter_groups`).

        The head's groups carry ``lr_scale = head_lr_scale``; :meth:`configure_optimizers`
        multiplies their learning rate by it once the optimizer is built.
        """
        return parameter_groups(self, self.no_weight_decay, self.head_lr_scale)

    # ----------------------------------------------------------------- forward
    def forward_features(self, x: Tensor) -> Tensor:
        """Features fed to the head: ``embedding(backbone(x))``."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.embedding(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (for HUG: cosines to the proxies); argmax is the prediction."""
        return self.head.logits(self.forward_features(x))

    def step(self, batch: Any, stage: str) -> dict[str, Any]:
        """Shared step: images and labels (:meth:`unpack_batch`), labels check, features, head
        loss and logits."""
        x, y = unpack_batch_of(self, batch, f"the {stage} step")
        first = stage not in self._labels_checked
        # a head asking for every batch (HUGHead's check_labels) cannot check inside a compiled
        # step (a graph break): checked here instead
        every = self.head_step.compiled and getattr(self.head, "check_labels", False) is True
        check_labels(y, self.num_classes, stage, always=first or every)
        self._labels_checked.add(stage)
        features = self.forward_features(x)
        check_features(features, self.feature_dim, stage)
        out = self.head_step(self.head, features, y)  # head.forward_train, maybe compiled
        check_logits(out.logits, features.shape[0], self.num_classes, stage,
                     type(self.head).__name__)
        return {
            "loss": out.loss,
            "terms": out.terms,
            "logits": out.logits,
            "features": features,  # with its graph: a subclass may add a term on it to the loss
            "labels": y,
        }

    def __deepcopy__(self, memo: dict[int, Any]) -> ClassifierModule:
        """A copy of the module that shares its optimizer and scheduler factories (and, as any
        LightningModule's copy, has no trainer).

        Weight averaging copies the module (``StochasticWeightAveraging`` in its ``setup``,
        ``WeightAveraging`` through ``AveragedModel``). A plain deep copy also copied what the
        factories reach: the CLI's factories hold the CLI, hence the trainer, the data module
        (its data), the loggers and the launcher. On rank 0 of a DDP fit started by Lightning's
        own launcher that launcher holds the other ranks' processes, which cannot be copied: the
        fit failed with ``TypeError: cannot pickle '_thread.lock' object``. The module now keeps
        the CLI's factories as plain partials (:func:`~hug_lightning.factories.plain_factory`);
        the sharing still covers factories given otherwise (a partial of another layout, a
        callable object holding state).
        """
        for factory in (self.optimizer_factory, self.scheduler_factory):
            memo.setdefault(id(factory), factory)  # stateless callables: shared
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    # ----------------------------------------------------------------- Lightning, the loop's hooks
    def configure_model(self) -> None:
        # sized here (not in setup): WeightAveraging calls this before copying the model (and
        # UFMDataModule.setup, before the callbacks' setup, where SWA copies it without this)
        bind = getattr(self.backbone, "bind_data", None)  # e.g. the UFM's free features
        if callable(bind) and self._trainer is not None and self.trainer.datamodule is not None:
            bind(self.trainer.datamodule)

    def setup(self, stage: str) -> None:
        self.plateau_steps.reset()  # a new fit (a resume restores its state after this hook)
        if self.trainer.world_size > 1:
            if stage == "fit":
                check_policy_for_processes(self.loss_guard.policy, self.trainer.world_size)
            # module-level functions, not lambdas: the module still pickles after the fit
            self.loss_guard.reduce_max = global_max
            if hasattr(self.head, "count_sync"):  # HUG: class balancing over the global batch;
                # a bare all_reduce: Lightning's strategy.reduce adds a barrier, which blocks
                # the host every step on GPUs
                self.head.count_sync = CountSync(global_sum, self.trainer.world_size)

    def configure_optimizers(self) -> Any:
        return build_optimizers(
            self.parameter_groups(), self.optimizer_factory, self.scheduler_factory,
            self.scheduler_interval, self.scheduler_monitor,
            lambda: run_length(self.trainer, self.scheduler_interval))
