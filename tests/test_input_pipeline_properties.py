"""Tests closing gaps found by mutation testing of the CIFAR input path and the training order.

Every expected value comes from an independent reference written here (torchvision's CPU
transforms, torch's DataLoader / DistributedSampler, hand-written index lists), not from the
code under test.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from hug_lightning.data import CIFAR10DataModule
from hug_lightning.data.arrays import TensorImageDataset
from hug_lightning.data.augment import KeyedCropFlip
from hug_lightning.data.base import ClassificationDataModule
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import EpochShardSampler
from hug_lightning.data.samplers import ShardedEvalSampler
from hug_lightning.data.splits import check_label_range, split_indices

PAD = 4


def _position_image() -> torch.Tensor:
    """A (3, 32, 32) uint8 image whose pixels name their source: channel 0 = column + 1,
    channel 1 = row + 1, channel 2 = 7 (0 only in zero padding)."""
    ar = torch.arange(1, 33, dtype=torch.uint8)
    return torch.stack([ar.view(1, 32).expand(32, 32), ar.view(32, 1).expand(32, 32),
                        torch.full((32, 32), 7, dtype=torch.uint8)])


def _recover(out: torch.Tensor) -> tuple[int, int, int]:
    """``(dx, dy, hflip)`` of a padded crop of :func:`_position_image` (uint8 (3, 32, 32)).

    Fails on anything that is not a zero-padded translation + optional horizontal flip."""
    col, row = out[0].long(), out[1].long()
    inside = out[2] == 7
    assert bool(((out[2] == 0) | inside).all())
    assert bool((out[:, ~inside] == 0).all()), "padding must be zeros (torchvision's fill=0)"
    r, c = inside.nonzero()[0].tolist()  # one image pixel: its source gives the offsets
    hflip = int(inside[r].sum() > 1 and col[r, inside[r]].diff()[0] < 0)
    dy = int(row[r, c]) - 1 - r + PAD
    src_c = int(col[r, c]) - 1
    dx = src_c - (31 - c) + PAD if hflip else src_c - c + PAD
    # rebuild the whole crop by hand and compare: no other change is allowed
    padded = torch.zeros(3, 40, 40, dtype=torch.uint8)
    padded[:, PAD:PAD + 32, PAD:PAD + 32] = _position_image()
    ref = padded[:, dy:dy + 32, dx:dx + 32]
    assert torch.equal(out, ref.flip(-1) if hflip else ref), (dx, dy, hflip)
    return dx, dy, hflip


def _fast_params(out: torch.Tensor) -> torch.Tensor:
    """Histogram cell ``dx * 18 + dy * 2 + hflip`` of a batch of crops of :func:`_position_image`
    read from two central pixels (always inside the image for offsets 0..8)."""
    out = out.long()
    hflip = (out[:, 0, 16, 16] < out[:, 0, 16, 15]).long()
    dy = out[:, 1, 16, 16] - 1 - 16 + PAD
    dx = torch.where(hflip.bool(), out[:, 0, 16, 16] - 1 - 15 + PAD,
                     out[:, 0, 16, 16] - 1 - 16 + PAD)
    assert bool(((dx >= 0) & (dx <= 2 * PAD) & (dy >= 0) & (dy <= 2 * PAD)).all())
    return dx * 18 + dy * 2 + hflip


def _two_sample_chi2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square statistic of two histograms with equal totals (df = used cells - 1)."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    return float(((a - b) ** 2 / (a + b)).sum())


def test_device_augmentation_distribution_matches_torchvision():
    """Device path's crop/flip distribution == torchvision's RandomCrop(32, padding=4) +
    RandomHorizontalFlip() on the CPU (two-sample chi-square on 9 x 9 x 2 cells).

    With n = 6000 per side (~37 per cell), the statistic under equal distributions is ~chi2(161)
    (mean 161, sd ~18); 260 is ~5.5 sd above (p < 1e-9). Off-by-one offset ranges, biased
    flips or dx == dy give several hundred or more; vertical flips / wrong fills fail
    `_recover` outright."""
    n = 6000
    img = _position_image()
    images = img.expand(n, 3, 32, 32).contiguous()
    sampler = EpochShardSampler(torch.arange(n), seed=11)
    sampler.set_epoch(2)
    loader = DeviceBatchLoader(images, torch.zeros(n, dtype=torch.long), 1000, (0, 0, 0),
                               (1 / 255, 1 / 255, 1 / 255), "cpu", sampler=sampler, augment=True)
    ours = torch.cat([xb.round().to(torch.uint8) for xb, _ in loader])
    assert len(ours) == n
    for x in ours[:150]:  # the whole image: a zero-padded translation (+ mirror), nothing else
        _recover(x)

    torch.manual_seed(0)
    tv = v2.Compose([v2.RandomCrop(32, padding=PAD), v2.RandomHorizontalFlip()])
    theirs = torch.stack([tv(img) for _ in range(n)])
    for x in theirs[:150]:  # sanity of the reference and of _recover
        _recover(x)
    a = torch.bincount(_fast_params(ours), minlength=162).double()
    b = torch.bincount(_fast_params(theirs), minlength=162).double()
    assert int((b > 0).sum()) == 162  # torchvision covers every cell (sanity of the reference)
    assert _two_sample_chi2(a, b) < 260
    assert abs(a.view(81, 2)[:, 1].sum() / n - 0.5) < 0.03  # fair coin (sd 0.0065)


def test_keyed_crop_flip_without_flip_never_flips():
    """KeyedCropFlip(flip=False) must still crop (all 81 offsets) but never mirror."""
    t_noflip = KeyedCropFlip((0, 0, 0), (1 / 255,) * 3, pad=PAD, flip=False)
    t_flip = KeyedCropFlip((0, 0, 0), (1 / 255,) * 3, pad=PAD, flip=True)
    img = _position_image()
    no = [_recover(t_noflip(img, k).round().to(torch.uint8)) for k in range(400)]
    yes = [_recover(t_flip(img, k).round().to(torch.uint8)) for k in range(400)]
    assert sum(f for _, _, f in no) == 0
    assert len({(dx, dy) for dx, dy, _ in no}) > 60  # still a random crop
    assert 150 < sum(f for _, _, f in yes) < 250  # and flip=True does flip (~200 +- 10)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n, world", [(50, 2), (53, 3), (2, 5)])  # (2, 5): padding > n
def test_device_batches_equal_a_dataloader_over_distributed_sampler(n, world, drop_last):
    """Batch boundaries (incl. drop_last / the partial last batch) are DataLoader's over
    DistributedSampler's shard (seed ``1000003 * seed``; the constant is the documented rule)."""
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(n)
    for rank in range(world):
        sampler = EpochShardSampler(labels, world, rank, seed=2)
        sampler.set_epoch(3)
        loader = DeviceBatchLoader(images, labels, 8, (0, 0, 0), (1, 1, 1), "cpu",
                                   sampler=sampler, drop_last=drop_last)
        ref_sampler = DistributedSampler(labels, world, rank, shuffle=True, seed=2 * 1_000_003)
        ref_sampler.set_epoch(3)
        ref = [b.tolist() for b in DataLoader(labels, batch_size=8, sampler=ref_sampler,
                                              drop_last=drop_last)]
        got = [y.tolist() for _, y in loader]
        assert len(loader) == len(ref)
        assert got == ref


def test_device_evaluation_shards_are_rank_strided():
    """Evaluation (no sampler) on rank r of W: samples r, r + W, ... each exactly once."""
    n, world = 23, 3
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(n)
    seen = []
    for rank in range(world):
        loader = DeviceBatchLoader(images, labels, 4, (0, 0, 0), (1, 1, 1), "cpu",
                                   world_size=world, rank=rank)
        got = torch.cat([y for _, y in loader]).tolist()
        assert got == list(range(rank, n, world))
        assert len(loader) == -(-len(got) // 4)
        seen += got
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (7, 2)])
def test_sharded_eval_sampler_covers_each_sample_once(n, world):
    shards = [list(ShardedEvalSampler(range(n), world, r)) for r in range(world)]
    for r, shard in enumerate(shards):
        assert shard == list(range(r, n, world))
        assert len(ShardedEvalSampler(range(n), world, r)) == len(shard)
    assert sorted(sum(shards, [])) == list(range(n))


class _Tiny(ClassificationDataModule):
    num_classes = 2

    def build_datasets(self, stage: str) -> None:
        images = torch.zeros(21, 3, 4, 4, dtype=torch.uint8)
        self.train_set = TensorImageDataset(images, torch.arange(21) % 2)


@pytest.mark.parametrize("drop_last", [False, True])
def test_cpu_train_loader_honours_drop_last(drop_last):
    dm = _Tiny(batch_size=8, num_workers=0, pin_memory=False, drop_last=drop_last)
    dm.setup("fit")
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sizes == ([8, 8] if drop_last else [8, 8, 5])


def test_device_resident_train_loader_honours_drop_last(cifar10_folder_root):
    """160 training images (200 - 20 % validation), batches of 48: 3 full ones, 16 left."""
    for drop_last, sizes in ((True, [48, 48, 48]), (False, [48, 48, 48, 16])):
        dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                               batch_size=48, num_workers=0, device_resident=True,
                               drop_last=drop_last)
        dm.setup("fit")
        assert [len(y) for _, y in dm.train_dataloader()] == sizes


def test_device_resident_eval_loaders_keep_the_last_batch(cifar10_folder_root):
    """``drop_last`` is a training option: with it, the device path's validation and test
    loaders still yield every sample, in the CPU path's batches."""
    def eval_labels(device_resident: bool) -> list[list[list[int]]]:
        dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                               batch_size=48, eval_batch_size=16, num_workers=0,
                               drop_last=True, device_resident=device_resident)
        dm.setup("fit")
        dm.setup("test")
        return [[y.tolist() for _, y in loader]
                for loader in (dm.val_dataloader(), dm.test_dataloader())]
    cpu, device = eval_labels(False), eval_labels(True)
    assert [len(b) for b in cpu[0]] == [16, 16, 8]  # 40 validation images, 8 in the last batch
    assert device == cpu


@pytest.mark.parametrize("bad", [-1, -5, 10, 11])
def test_label_range_rejects_negative_and_too_large(bad):
    check_label_range(torch.tensor([0, 9, 3]), 10, "ok")  # the full valid range passes
    with pytest.raises(ValueError, match=rf"Label {bad} .*outside \[0, 10\)"):
        check_label_range(torch.tensor([0, bad, 3]), 10, "somewhere")


@pytest.mark.parametrize("n, val_split, n_val", [(100, 20, 20), (100, 0.25, 25), (7, 1, 1),
                                                 (50, 0, 0)])
def test_split_is_a_partition(n, val_split, n_val):
    train, val = split_indices(n, val_split, seed=3)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(train.tolist() + val.tolist()) == list(range(n))  # disjoint and complete
    assert train.tolist() == sorted(train.tolist())
    again = split_indices(n, val_split, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])


def test_subset_of_a_subset_indexes_the_original_images():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10) * 10
    ds = TensorImageDataset(images.contiguous(), labels).subset([5, 6, 7, 8]).subset([3, 0])
    assert len(ds) == 2
    assert [int(ds[i][0][0, 0, 0]) for i in range(2)] == [8, 5]
    assert [ds[i][1] for i in range(2)] == [80, 50]
    assert ds.targets.tolist() == [80, 50]


def test_device_loader_without_augment_only_normalizes():
    """augment=False (e.g. CIFAR with augment: false) with a training sampler: the shuffled
    images, normalized by hand, no crop or flip."""
    n = 24
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    sampler = EpochShardSampler(labels, seed=4)
    loader = DeviceBatchLoader(images, labels, 10, mean, std, "cpu", sampler=sampler,
                               augment=False)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for x, y in loader:
        ref = (images[y].float() / 255 - m) / s
        assert torch.allclose(x, ref, atol=1e-5)


def test_sampler_start_applies_to_one_iteration_only():
    """``start`` skips samples of the (resumed) epoch once; the next iteration is whole."""
    labels = torch.arange(20)
    sampler = EpochShardSampler(labels, seed=1)
    full = list(sampler)
    sampler.start = 6
    assert list(sampler) == full[6:]
    assert list(sampler) == full
