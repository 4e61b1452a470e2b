"""The unconstrained-features model (UFM): features as free parameters.

The quickest honest check that a loss drives features to (generalized) neural collapse: each
training sample's feature vector is a learnable parameter, trained together with the head's
class vectors by the same :class:`~hug_lightning.module.ClassifierModule` and heads as real
networks (Liu et al. 2023, section on simulations: K=100 classes, 500 samples each, d=512,
initialised U(-1/sqrt(d), 1/sqrt(d)), full-batch SGD with lr 1, Nesterov momentum 0.9,
weight decay 5e-4).

* :class:`UFMDataModule` yields batches of ``(sample index, label)``;
* :class:`FreeFeatures` is the "backbone": a ``(N, d)`` parameter indexed by the batch. Its
  number of rows is taken from the data module when training starts (``bind_data``, from the
  data module's ``setup``, before the callbacks' own: weight averaging copies the model there)
  or from a checkpoint's state, so the configuration states the sizes once, in ``data``.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterator

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from hug_lightning.data.loading import (EpochShardSampler, ResumableDataLoader, global_seed,
                                        next_train_batch)


def feature_seed(seed: int) -> int:
    """The seed of :class:`FreeFeatures`' own generator for ``seed``: a hash of it, so that the
    features are not drawn from the stream the heads draw their class vectors from after
    ``seed_everything(seed)`` (the same seed gave feature row i a cosine of about -0.35 with
    class vector i for the first K rows).

    Args:
        seed: The run's seed (``FreeFeatures``' ``seed``, or the ``seed_everything`` one).

    Returns:
        A seed in ``[0, 2**63)`` for ``torch.Generator.manual_seed``, the same on every process.
    """
    digest = hashlib.sha256(f"hug_lightning.FreeFeatures:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class FreeFeatures(nn.Module):
    """Free feature vectors, one per training sample, looked up by index.

    Args:
        dim: Feature dimension ``d``.
        num_samples: Number of feature vectors ``N``; ``None`` takes ``num_samples`` from the
            data module at the start of training (or the shape stored in a checkpoint).
        init_scale: Features start uniform in ``[-init_scale, init_scale] / sqrt(d)``.
        seed: Seed of that initialisation (``None``: the ``seed_everything`` seed), drawn from
            its own generator (seeded with :func:`feature_seed`, a hash of it: independent of
            the heads' draws) so 1 and N processes start from the same features.
    """

    def __init__(self, dim: int = 512, num_samples: int | None = None, init_scale: float = 1.0,
                 seed: int | None = None):
        super().__init__()
        if dim < 1:
            raise ValueError(f"FreeFeatures: dim must be positive, got {dim}.")
        self.num_features = int(dim)
        self.init_scale = float(init_scale)
        self.seed = seed
        self.weight = nn.Parameter(torch.empty(0, self.num_features))
        if num_samples is not None:
            self.materialize(num_samples)

    @property
    def num_samples(self) -> int:
        return self.weight.shape[0]

    def materialize(self, num_samples: int) -> None:
        """Create (and initialise) the ``(num_samples, d)`` parameter."""
        if self.num_samples == num_samples:
            return
        if self.num_samples:
            raise ValueError(f"FreeFeatures holds {self.num_samples} vectors; the data has "
                             f"{num_samples}. Use the data module it was trained with.")
        bound = self.init_scale / math.sqrt(self.num_features)
        gen = torch.Generator().manual_seed(feature_seed(
            self.seed if self.seed is not None else global_seed()))
        data = torch.rand(num_samples, self.num_features, generator=gen, dtype=torch.float32,
                          device="cpu")  # also inside Lightning's device/dtype contexts
        data = data * (2 * bound) - bound
        self.weight = nn.Parameter(data.to(self.weight.device))

    def bind_data(self, datamodule: Any) -> None:
        """Size the features from ``datamodule.num_samples`` (called by the module's setup)."""
        n = getattr(datamodule, "num_samples", None)
        if n is None:
            raise TypeError("FreeFeatures needs a data module with `num_samples` "
                            "(hug_lightning.ufm.UFMDataModule).")
        self.materialize(int(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        stored = state_dict.get(prefix + "weight")
        if stored is not None and self.num_samples == 0:
            self.weight = nn.Parameter(torch.empty_like(stored, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, index: Tensor) -> Tensor:
        if self.num_samples == 0:
            raise RuntimeError("FreeFeatures is not sized yet: train it with a UFMDataModule.")
        return self.weight[index]


class _Repeat:
    """A loader that yields the same batch ``steps`` times.

    Not a ``DataLoader``: Lightning injects no ``DistributedSampler`` (which would pad and
    duplicate samples) and does not warn, as it does for an ``IterableDataset`` with a length,
    about worker processes this loader does not have.

    Args:
        batch: The batch, ``(index, label)``.
        steps: Batches per pass.
        dataset_len: Samples of the whole set over all processes (as ``len(loader.dataset)``).
    """

    def __init__(self, batch: tuple[Tensor, Tensor], steps: int, dataset_len: int) -> None:
        self.batch, self.steps, self.dataset_len = batch, steps, dataset_len

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return iter([self.batch] * self.steps)

    def __len__(self) -> int:
        return self.steps


class UFMDataModule(LightningDataModule):
    """Balanced labels for the unconstrained-features model: batches of ``(index, label)``.

    Sample ``i`` has label ``i // samples_per_class``. Validation and test use the same
    samples (the UFM has no unseen data): their accuracy is the nearest-class-vector accuracy
    of the learned features. Under DDP, full batches are split across processes (rank ``r``
    takes samples ``r, r + W, ...``); with ``batch_size`` set, the sampler shards.

    Args:
        num_classes: Number of classes ``K``.
        samples_per_class: Samples per class ``n`` (``N = K n`` free feature vectors).
        batch_size: Training batch size; ``None`` trains full-batch (the paper's setting).
        steps_per_epoch: Full-batch steps per epoch (more steps per epoch means fewer
            epoch-end hooks, which dominate the time of small UFM runs); full-batch only.
        seed: Seed of the training order when ``batch_size`` is set (a permutation per
            ``(seed, epoch)``, sharded under DDP as ``DistributedSampler`` does).
    """

    def __init__(
        self,
        num_classes: int = 10,
        samples_per_class: int = 50,
        batch_size: int | None = None,
        steps_per_epoch: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"UFMDataModule: num_classes must be at least 2, got {num_classes}.")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}.")
        self.num_classes = int(num_classes)
        self.samples_per_class = int(samples_per_class)
        self.num_samples = self.num_classes * self.samples_per_class
        self.batch_size = int(batch_size) if batch_size else self.num_samples
        self.steps_per_epoch = int(steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
        self.seed = int(seed)
        index = torch.arange(self.num_samples)
        self.labels = index // self.samples_per_class
        self.dataset = TensorDataset(index, self.labels)

    def setup(self, stage: str) -> None:
        """Size the module's free features (``bind_data``) now: Lightning runs this hook before
        the callbacks' ``setup``, where ``StochasticWeightAveraging`` copies the model without
        calling ``configure_model`` (which sizes them too, idempotently)."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        bind = getattr(getattr(model, "backbone", None), "bind_data", None)
        if callable(bind):
            bind(self)

    def _full_batches(self, steps: int) -> _Repeat:
        """``steps`` whole-shard batches: this rank's samples ``rank, rank + W, ...`` (no
        per-sample collation of N items per step)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        index = torch.arange(rank, self.num_samples, world)
        return _Repeat((index, self.labels[index]), steps, self.num_samples)

    def train_dataloader(self) -> DataLoader | _Repeat:
        if self.batch_size >= self.num_samples:
            return self._full_batches(self.steps_per_epoch)
        # an order per (seed, epoch), resumable mid-epoch: a generator advanced epoch by epoch
        # restarted at epoch 0's order in a resumed fit
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = EpochShardSampler(self.dataset, world, rank, shuffle=True, seed=self.seed)
        loader = ResumableDataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                                     next_batch_fn=lambda: next_train_batch(self.trainer))
        loader.seed_option = "--data.init_args.seed"
        return loader

    def val_dataloader(self) -> _Repeat:
        return self._full_batches(1)

    def test_dataloader(self) -> _Repeat:
        return self._full_batches(1)

    def train_eval_dataloader(self) -> _Repeat:
        return self._full_batches(1)

    def predict_dataloader(self) -> DataLoader:
        # map-style and in order: Lightning shards it under DDP without padding and tracks
        # each sample's index, which `predict` writes (the iterable loader hid them)
        return DataLoader(self.dataset, batch_size=min(self.batch_size, self.num_samples))
