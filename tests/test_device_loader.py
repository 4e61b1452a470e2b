"""The device-resident CIFAR path gives the CPU path's batches, order and shards."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback

from conftest import tiny_args
from hug_lightning.cli import main
from hug_lightning.data import CIFAR10DataModule
from hug_lightning.data.augment import crop_flip_params, pad_crop_flip, sample_keys
from hug_lightning.data.device_loader import DeviceBatchLoader
from hug_lightning.data.loading import ORDER_SEED_STRIDE, EpochShardSampler


def _reference_crop_flip(img: torch.Tensor, dx: int, dy: int, flip: bool) -> torch.Tensor:
    """torchvision-style zero-padded crop then flip, written out by hand."""
    padded = torch.zeros(img.shape[0], 40, 40, dtype=img.dtype)
    padded[:, 4:36, 4:36] = img
    out = padded[:, dy:dy + 32, dx:dx + 32]
    return out.flip(-1) if flip else out


def test_pad_crop_flip_matches_reference():
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    dx, dy, flip = crop_flip_params(torch.arange(64), pad=4)
    out = pad_crop_flip(imgs, dx, dy, flip, pad=4)
    for i in range(64):
        ref = _reference_crop_flip(imgs[i], int(dx[i]), int(dy[i]), bool(flip[i]))
        assert torch.equal(out[i], ref)


def test_augmentation_distribution():
    """Offsets uniform on 0..8, fair flips, independent of each other (chi-square bounds)."""
    keys = sample_keys(seed=0, epoch=3, index=torch.arange(90_000))
    dx, dy, flip = crop_flip_params(keys, pad=4)
    expected = 90_000 / 81
    joint = torch.bincount(dx * 9 + dy, minlength=81).double()
    chi2 = ((joint - expected) ** 2 / expected).sum()
    assert chi2 < 130  # 80 degrees of freedom: p < 1e-3 above ~124
    assert abs(flip.double().mean() - 0.5) < 0.01
    for value in range(9):  # flip independent of the offset
        assert abs(flip[dx == value].double().mean() - 0.5) < 0.03
    epoch4 = crop_flip_params(sample_keys(0, 4, torch.arange(90_000)), pad=4)[0]
    assert (epoch4 == dx).double().mean() < 0.15  # a new draw each epoch (1/9 agree by chance)


def test_folder_layout_evaluation_batches_mix_classes(cifar10_folder_root):
    """Image folders are read class by class: validation (random split order) and test (a
    fixed shuffle) must not give `limit_*_batches` runs a single class."""
    def first_labels(split: str, seed: int = 0):
        dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                               batch_size=16, num_workers=0, seed=seed)
        dm.setup("fit" if split == "val" else "test")
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        return next(iter(loader))[1]
    for split in ("val", "test"):
        labels = first_labels(split)
        assert labels.unique().numel() > 3, (split, labels)
        assert torch.equal(labels, first_labels(split))  # the same order in every run
    assert torch.equal(first_labels("test"), first_labels("test", seed=5))  # seed-independent


def test_device_path_equals_cpu_path(cifar10_folder_root):
    dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                           batch_size=16, num_workers=0)
    dm.setup("fit")
    cpu_loader = dm.train_dataloader()
    cpu_loader.sampler.set_epoch(2)
    dm_dev = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                               batch_size=16, num_workers=0, device_resident=True)
    dm_dev.setup("fit")
    dev_loader = dm_dev.train_dataloader()
    assert isinstance(dev_loader, DeviceBatchLoader) and len(dev_loader) == len(cpu_loader)
    dev_loader.sampler.set_epoch(2)
    for (xc, yc), (xd, yd) in zip(cpu_loader, dev_loader, strict=True):
        assert torch.equal(yc, yd.cpu())
        assert torch.allclose(xc, xd.cpu(), atol=1e-6)
    val_cpu = torch.cat([x for x, _ in dm.val_dataloader()])
    val_dev = torch.cat([x for x, _ in dm_dev.val_dataloader()]).cpu()
    assert torch.allclose(val_cpu, val_dev, atol=1e-6)


@pytest.mark.parametrize("n", [50, 51])
def test_shards_cover_the_epoch_like_distributed_sampler(n):
    """DistributedSampler's permutation (seed ``ORDER_SEED_STRIDE * seed``), padding and
    interleaving; the device loader yields exactly its shard, in that order."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, 32, 32)
    labels = torch.arange(n)  # the label is the sample index
    shards = []
    for rank in range(2):
        sampler = EpochShardSampler(labels, num_replicas=2, rank=rank, seed=5)
        sampler.set_epoch(1)
        ref = torch.utils.data.DistributedSampler(labels, num_replicas=2, rank=rank,
                                                  seed=5 * ORDER_SEED_STRIDE)
        ref.set_epoch(1)
        assert sampler.shard_indices().tolist() == list(ref)
        loader = DeviceBatchLoader(images.contiguous(), labels, 8, (0, 0, 0), (1, 1, 1), "cpu",
                                   sampler=sampler)
        shards.append(torch.cat([y for _, y in loader]))
        assert shards[-1].tolist() == list(ref)
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(n))
    assert len(set(shards[0].tolist()) & set(shards[1].tolist())) == n % 2  # the padding only


def test_seeds_do_not_share_shifted_orders():
    """With ``seed + epoch`` (DistributedSampler), seed 1 would replay seed 0's orders one epoch
    later; repeats with consecutive seeds must not."""
    labels = torch.arange(100)

    def order(seed, epoch):
        sampler = EpochShardSampler(labels, seed=seed)
        sampler.set_epoch(epoch)
        return sampler.shard_indices().tolist()
    orders = {(s, e): order(s, e) for s in range(3) for e in range(4)}
    assert len({tuple(o) for o in orders.values()}) == len(orders)


def test_fit_with_device_resident_data(cifar10_folder_root, tmp_path):
    cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path,
                                  "--data.init_args.device_resident", "true")])
    assert cli.trainer.global_step == 5 and "val/acc" in cli.trainer.callback_metrics


def test_resume_with_another_seed_is_refused():
    images, labels = torch.zeros(16, 3, 32, 32, dtype=torch.uint8), torch.arange(16) % 4

    def loader(seed):
        return DeviceBatchLoader(images, labels, 4, (0, 0, 0), (1, 1, 1), "cpu",
                                 sampler=EpochShardSampler(labels, seed=seed))
    state = loader(3).state_dict()
    assert state["seed"] == 3
    loader(3).load_state_dict(state)  # same seed: fine
    with pytest.raises(ValueError, match="seed 3, this run uses 4"):
        loader(4).load_state_dict(state)


def test_keys_of_large_seeds_do_not_repeat_small_ones():
    idx = torch.arange(1000)
    keys = {s: sample_keys(s, 3, idx) for s in (0, 1, 2**31, 2**31 + 1, 2**31 - 1, -1, 2**62)}
    for a in keys:
        for b in keys:
            if a != b:  # 1000 31-bit keys: equal ones only by chance (~1000 / 2**31)
                assert (keys[a] == keys[b]).float().mean() < 0.01, (a, b)


def test_device_resident_refuses_overridden_transform_hooks(cifar10_folder_root):
    """The device path never calls the transform hooks: a subclass's own transforms must not
    be dropped without a word (here they blank the images, so a dropped one is visible)."""
    class Blank(CIFAR10DataModule):
        def train_transform(self):
            return lambda img, *key: torch.zeros(3, 32, 32)

    args = dict(root=str(cifar10_folder_root), download=False, val_split=0.2, batch_size=8,
                num_workers=0)
    x, _ = next(iter(_setup(Blank(**args)).train_dataloader()))
    assert x.abs().sum() == 0  # the CPU path uses the override
    with pytest.raises(ValueError, match="train_transform"):
        Blank(**args, device_resident=True)
    CIFAR10DataModule(**args, device_resident=True)  # the library's own hooks: fine


def _setup(dm):
    dm.setup("fit")
    return dm


def test_eval_pass_scores_ncc_exactly_with_device_resident_data(cifar10_folder_root, tmp_path):
    """Found by an audit: the NC eval pass sized its feature buffer by ``len(loader.dataset)``,
    which the device loader lacks, so with device-resident data it warned of "an unknown size"
    and scored NC4 / NCC against the previous pass's means (none at epoch 0, lagged after).
    Reference: the trained model's features over the classic CPU path's training-eval set,
    class means and nearest-mean predictions computed here."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--nc.eval_pass", "true",
                                      "--data.init_args.device_resident", "true")])
    assert not [w for w in caught if "NC eval pass" in str(w.message)]
    dm = CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                           batch_size=32, num_workers=0)
    dm.setup("fit")
    model = cli.model.eval()
    with torch.no_grad():
        out = [(model.forward_features(x), y) for x, y in dm.train_eval_dataloader()]
    feats, labels = torch.cat([f for f, _ in out]).double(), torch.cat([y for _, y in out])
    with torch.no_grad():
        linear = model.head.logits(feats.float()).argmax(1)
    means = torch.stack([feats[labels == c].mean(0) for c in range(10)])
    ncc = torch.cdist(feats, means).argmin(1)
    logged = cli.trainer.callback_metrics
    assert float(logged["nc/train_eval/ncc_accuracy"]) == pytest.approx(
        float((ncc == labels).double().mean()), abs=1e-6)
    assert float(logged["nc/train_eval/nc4_ncc_mismatch"]) == pytest.approx(
        float((ncc != linear).double().mean()), abs=1e-6)


def test_training_images_are_copied_to_the_device_once(cifar10_folder_root):
    """Found by an audit: every loader gathered and copied its set to the device, and the NC
    eval pass asks for a new training-eval loader every epoch: a second copy of the training
    images on the GPU during each pass, made anew each epoch. The training loader and every
    training-eval loader now share one copy; the batches stay the CPU path's."""
    args = dict(root=str(cifar10_folder_root), download=False, val_split=0.2, batch_size=16,
                num_workers=0)
    dev = _setup(CIFAR10DataModule(**args, device_resident=True))
    train = dev.train_dataloader()
    evals = [dev.train_eval_dataloader() for _ in range(3)]  # three epochs' eval passes
    assert {loader.images.data_ptr() for loader in evals} == {train.images.data_ptr()}
    assert {loader.labels.data_ptr() for loader in evals} == {train.labels.data_ptr()}
    cpu = _setup(CIFAR10DataModule(**args))
    for get in ("train_eval_dataloader", "val_dataloader", "test_dataloader"):
        want = [b for b in getattr(cpu, get)()]
        got = [b for b in getattr(dev, get)()]
        assert len(want) == len(got)
        for (xc, yc), (xd, yd) in zip(want, got):
            assert torch.equal(yc, yd) and torch.allclose(xc, xd, atol=1e-6)



class TrainLabels(Callback):
    """Records the labels of every training batch by (epoch, batch index)."""

    seen: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        TrainLabels.seen[(trainer.current_epoch, batch_idx)] = batch[1].cpu()


@pytest.mark.parametrize("device_resident", ["false", "true"])
def test_overfit_batches_trains_on_the_same_first_batches(cifar10_folder_root, tmp_path,
                                                         device_resident):
    """Found by an audit: Lightning's ``overfit_batches`` turns a DataLoader's shuffling off
    (and says so), but cannot rebuild the device-resident loader, which drew a new shuffled
    order every epoch: nothing was overfitted. Both paths must train on the training set's
    first samples, in order, every epoch."""
    TrainLabels.seen = {}
    cli = main(["fit", *tiny_args(cifar10_folder_root, tmp_path, "--trainer.overfit_batches",
                                  "2", "--trainer.max_epochs", "2", "--trainer.callbacks+",
                                  f"{__name__}.TrainLabels",
                                  "--data.init_args.device_resident", device_resident)])
    first = cli.datamodule.train_set.targets[:64]  # 2 batches of 32, the set's own order
    assert sorted(TrainLabels.seen) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for epoch in range(2):
        assert torch.equal(torch.cat([TrainLabels.seen[(epoch, b)] for b in range(2)]), first)


def test_device_resident_on_the_cpu_says_so_once(cifar10_folder_root, caplog):
    """Found by an audit: on a machine without an accelerator the option silently kept the
    data in host memory (its README row speaks of the GPU only)."""
    dm = _setup(CIFAR10DataModule(root=str(cifar10_folder_root), download=False, val_split=0.2,
                                  batch_size=16, num_workers=0, device_resident=True))
    with caplog.at_level("INFO"):
        assert dm.train_dataloader().images.device.type == "cpu"
        dm.val_dataloader(), dm.train_eval_dataloader()
    assert caplog.text.count("device_resident: the trainer runs on the CPU") == 1
