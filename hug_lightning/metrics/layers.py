"""LayerNCMonitor: neural-collapse metrics of intermediate layers ("layer NC"), per epoch.

How within-class variability shrinks with depth (He & Su's law of data separation, Rangamani
et al.'s intermediate collapse, Galanti et al.'s per-layer NCC) needs the NC metrics of every
chosen module's output, not only of the penultimate features. This callback puts a forward
hook on each named module (``pl_module.named_modules()`` names, e.g. ``backbone.layer3``) and
feeds one :class:`~hug_lightning.metrics.collapse.NCFeatureStats` per layer and stage:

* the hooks are registered at the start of a stage and removed at its end (also in
  ``teardown`` and ``on_exception``); they record only while a batch of that stage runs, and
  only the **first** call of each module in that batch (an extra forward in the same batch,
  e.g. ``RobustnessEvaluation``'s attacks, is not counted; a module called twice in one
  forward counts its first call). The pooled features of ``buffer_batches`` batches are
  concatenated into one collector update per layer (the update is about 20 small kernels
  whatever the batch size), the rest before each stage's results;
* outputs ``(B, C, H, W)`` are averaged over ``H, W`` (global average pooling), ``(B, T, C)``
  over ``T`` (tokens), ``(B, C)`` are taken as they are; half-precision outputs (autocast) are
  cast to float32 before pooling; the sums are float64. A tuple, dict or other shape is an
  error naming the layer;
* labels come from the batch through the module's ``unpack_batch`` (as its steps read them);
* under ``--model.init_args.compile true`` a hooked module ends a compiled graph while its
  hooks are on (they run eagerly: :func:`torch.compiler.disable`), so the backbone runs as a few
  graphs during those stages (checked on a CPU: the same values, no recompilation per epoch);
* stages: ``val`` (validation batches: eval-mode features of the forward the validation step
  runs anyway, no extra forward) and ``train`` (training batches: train-mode features,
  BatchNorm batch statistics, augmented images; under DDP it also counts the duplicates the
  training sampler pads an epoch with) and ``train_eval``: the NC monitor's eval pass
  (``--nc.eval_pass true``, every ``--nc.eval_pass_every`` epochs: training images, evaluation
  transform, eval mode, float32 under ``--nc.eval_pass_fp32 true``), recorded during that pass's
  own forwards through the :mod:`~hug_lightning.metrics.eval_pass_listeners` protocol (no second
  pass; logged when the pass ends). Asked for in a fit without the pass, it is a ConfigError;
* only metrics that need no classifier (NC1 family, class-mean geometry): the NCC accuracy
  needs the model's logits in the collector, which an intermediate layer has none of.

Values go straight to the loggers and ``trainer.callback_metrics``
(:func:`~hug_lightning.metrics.direct_log.log_direct`) as
``nc_layers/<stage>/<layer>/<metric>``; they are computed after one all-reduce per state, so
under DDP every rank logs the single-process numbers (validation and eval-pass shards are
unpadded). Nothing is checkpointed: the sums restart every epoch, so a fit resumed in the
middle of an epoch logs ``train`` values over the batches after the resume only for that epoch.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.cli_errors import ConfigError
from hug_lightning.loop import unpack_batch_of
from hug_lightning.metrics.collapse import NCFeatureStats
from hug_lightning.metrics.direct_log import log_direct
from hug_lightning.metrics.eval_pass_listeners import runs_eval_pass
from hug_lightning.metrics.functional import MEANS_NAMES, NC1_NAMES, SPH_NAMES
from hug_lightning.metrics.layer_hooks import pool_output, resolve_layers

#: metrics of the features alone (no classifier, no logits), which this callback can log
FEATURE_ONLY_NAMES = ("k_eff",) + NC1_NAMES + SPH_NAMES + MEANS_NAMES
DEFAULT_LAYER_METRICS = ("nc1_pinv", "nc1_trace_ratio", "nc1_cdnv")
LAYER_STAGES = ("val", "train", "train_eval")


def drop_idle_layer_nc(callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` without the :class:`LayerNCMonitor` instances that have no layers: a
    registered callback costs Lightning's hook dispatch on every step even when it does
    nothing (about 17 us, bench/RESULTS.md)."""
    return [c for c in callbacks if not (isinstance(c, LayerNCMonitor) and not c.layers)]


class LayerNCMonitor(Callback):
    """Log feature-only neural-collapse metrics of intermediate layers every epoch.

    Args:
        layers: Module names as in ``pl_module.named_modules()`` (e.g.
            ``[backbone.layer1, backbone.layer4]``); empty: off (the CLI then leaves the
            callback out of the trainer: no cost per step).
        stages: Among ``val`` (validation batches, eval-mode features, no extra forward),
            ``train`` (training batches, train-mode features) and ``train_eval`` (the NC
            monitor's eval pass: training images, evaluation transform, eval mode; needs
            ``--nc.eval_pass true``).
        metrics: Names to log per layer, among ``FEATURE_ONLY_NAMES`` (NC1: ``nc1_pinv``,
            ``nc1_trace_ratio``, ``nc1_cdnv``... and the class-mean geometry ``*_means``).
        buffer_batches: Batches whose pooled features are concatenated before one collector
            update per layer (fewer, larger kernels; flushed before each stage's results).
    """

    def __init__(self, layers: Sequence[str] = (), stages: Sequence[str] = ("val",),
                 metrics: Sequence[str] = DEFAULT_LAYER_METRICS, buffer_batches: int = 8) -> None:
        super().__init__()
        self.layers, self.stages, self.metrics = list(layers), list(stages), list(metrics)
        bad = [s for s in self.stages if s not in LAYER_STAGES]
        if bad or not self.stages or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"--layer_nc.stages {self.stages}: choose among {list(LAYER_STAGES)}, "
                             "each once.")
        if buffer_batches < 1:
            raise ValueError(f"--layer_nc.buffer_batches {buffer_batches}: must be >= 1.")
        self.buffer_batches = buffer_batches
        bad = [m for m in self.metrics if m not in FEATURE_ONLY_NAMES]
        if bad or not self.metrics:
            raise ValueError(f"--layer_nc.metrics {bad or self.metrics}: choose among the "
                             f"feature-only metrics {list(FEATURE_ONLY_NAMES)}.")
        if len(set(self.layers)) != len(self.layers) or not all(self.layers):
            raise ValueError(f"--layer_nc.layers {self.layers}: give each name once, non-empty.")
        self._modules: dict[str, Any] = {}
        self._num_classes = 0
        self.collectors: dict[str, dict[str, NCFeatureStats]] = {s: {} for s in self.stages}
        self._handles: dict[str, list[Any]] = {s: [] for s in self.stages}
        self._labels: dict[str, Tensor | None] = {s: None for s in self.stages}
        self._seen: dict[str, set[str]] = {s: set() for s in self.stages}
        self._buffers: dict[str, dict[str, list[tuple[Tensor, Tensor]]]] = \
            {s: {} for s in self.stages}

    # ------------------------------------------------------------------ hooks on the model
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.layers:
            return
        self._modules = resolve_layers(pl_module, self.layers)
        k = getattr(pl_module, "num_classes", None)
        if not isinstance(k, int) or k < 2:
            raise ConfigError(f"--layer_nc needs a module with an integer num_classes (>= 2), "
                              f"{type(pl_module).__name__} has {k!r}.")
        self._num_classes = k
        self.collectors = {s: {} for s in self.stages}  # a new fit's model: new widths
        if stage == "fit" and "train_eval" in self.stages and not runs_eval_pass(trainer):
            raise ConfigError("--layer_nc.stages train_eval records the NC monitor's eval pass, "
                              "which is off: set --nc.eval_pass true (and --nc.enabled true), "
                              "or leave train_eval out of --layer_nc.stages.")

    @torch.compiler.disable  # a compiled backbone runs it eagerly, untraced (a graph break)
    def _record(self, stage: str, layer: str, module: Any, args: Any, output: Any) -> None:
        labels = self._labels[stage]
        if labels is None or layer in self._seen[stage]:
            return
        self._seen[stage].add(layer)
        buffer = self._buffers[stage].setdefault(layer, [])
        buffer.append((pool_output(layer, output), labels))
        if len(buffer) >= self.buffer_batches:
            self._flush(stage, layer)

    def _flush(self, stage: str, layer: str) -> None:
        """Apply ``layer``'s buffered batches of ``stage`` to its collector in one update."""
        buffer = self._buffers[stage].pop(layer, [])
        if not buffer:
            return
        features, labels = (torch.cat(t) for t in zip(*buffer))
        col = self.collectors[stage].get(layer)
        if col is None:
            col = self._new_collector(stage, layer, features.shape[-1], features.device)
        col.update(features, labels)

    def _new_collector(self, stage: str, layer: str, dim: int, device: Any) -> NCFeatureStats:
        col = NCFeatureStats(self._num_classes, dim, ncc=False, metrics=self.metrics).to(device)
        self.collectors[stage][layer] = col
        return col

    def _attach(self, stage: str) -> None:
        if not self.layers or stage not in self._handles:
            return
        self._detach(stage)
        for layer, module in self._modules.items():
            hook = functools.partial(self._record, stage, layer)
            self._handles[stage].append(module.register_forward_hook(hook))
        for col in self.collectors[stage].values():
            col.reset()
        self._buffers[stage] = {}  # left by a stage that failed

    def _detach(self, stage: str) -> None:
        for handle in self._handles.get(stage, []):
            handle.remove()
        if stage in self._handles:
            self._handles[stage] = []
            self._labels[stage] = None

    def _arm(self, stage: str, labels: Tensor) -> None:
        """The stage's next forward is a batch with these labels (its first call counts)."""
        self._labels[stage], self._seen[stage] = labels, set()

    def _arm_batch(self, stage: str, pl_module: LightningModule, batch: Any) -> None:
        if self._handles.get(stage):  # the batch is unpacked only for a hooked stage
            self._arm(stage, unpack_batch_of(pl_module, batch, "--layer_nc")[1])

    def _end(self, trainer: Trainer, stage: str) -> None:
        """The stage is over (on every process): unhook, log its values."""
        if self._handles.get(stage):
            self._detach(stage)
            self._finish(trainer, stage)

    def _disarm(self, stage: str) -> None:
        if stage in self._labels:
            self._labels[stage] = None

    # ------------------------------------------------------------------ Lightning's hooks
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._attach("train")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._arm_batch("train", pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch,  # noqa: ANN001
                           batch_idx) -> None:
        self._disarm("train")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, "train")

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._attach("val")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,  # noqa: ANN001
                                  dataloader_idx: int = 0) -> None:
        self._arm_batch("val", pl_module, batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx: int = 0) -> None:
        self._disarm("val")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, "val")

    # ------------------------------------------------------------------ the NC eval pass
    def eval_pass_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The NC monitor's eval pass starts (:mod:`.eval_pass_listeners`): hook ``train_eval``."""
        self._attach("train_eval")

    def eval_pass_batch(self, labels: Tensor) -> None:
        """The eval pass's next forward is a batch with these labels."""
        if self._handles.get("train_eval"):
            self._arm("train_eval", labels)

    def eval_pass_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The eval pass is over (on every process): unhook, log ``train_eval``."""
        self._end(trainer, "train_eval")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule,
                     exception: BaseException) -> None:
        for stage in self.stages:
            self._detach(stage)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for s in self.stages:
            self._detach(s)

    # ------------------------------------------------------------------ results
    def _dims(self, stage: str) -> list[int]:
        """Each layer's feature width, the same on every rank (one all-reduce under DDP: a
        rank without batches this stage has not seen the outputs)."""
        cols = self.collectors[stage]
        dims = torch.tensor([cols[n].dim if n in cols else 0 for n in self.layers])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            dims = dims.to(device)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX)
        return [int(d) for d in dims.cpu()]

    def _finish(self, trainer: Trainer, stage: str) -> None:
        values: dict[str, Tensor] = {}
        device = trainer.lightning_module.device
        for layer in list(self._buffers[stage]):
            self._flush(stage, layer)
        for layer, dim in zip(self.layers, self._dims(stage)):
            if dim == 0:
                rank_zero_warn(f"--layer_nc: layer {layer!r} never ran during the {stage} "
                               "batches (not on forward()'s path?): nothing logged for it.")
                continue
            col = self.collectors[stage].get(layer)
            if col is None:  # this rank saw no batch: zero sums, still in the all-reduce
                col = self._new_collector(stage, layer, dim, device)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*before the ``update`` method.*")
                computed = col.compute()
            values.update({f"nc_layers/{stage}/{layer}/{k}": v for k, v in computed.items()})
            col.reset()
            col.set_reference(col.means(), pivot=True, ncc=False)  # next epoch's pivots
        if values:
            log_direct(trainer, values)


__all__ = ["DEFAULT_LAYER_METRICS", "FEATURE_ONLY_NAMES", "LAYER_STAGES", "LayerNCMonitor",
           "drop_idle_layer_nc", "pool_output", "resolve_layers"]  # the last two: re-exported
