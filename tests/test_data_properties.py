"""Tests closing gaps found by mutation testing of the data modules (long tail, ImageNet subsets,
CIFAR layouts, folders, splits, evaluation sharding).

Every expectation is computed independently of the code under test: closed-form LDAM counts,
hand-built folder trees whose pixel values encode the class, plain index arithmetic.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from datagen import write_imagenet_folder
from test_long_tail import closed_form
from hug_lightning.data import (CIFAR10DataModule, CIFAR10LTDataModule, DataNotFoundError,
                                ImageNetSubsetDataModule)
from hug_lightning.data.long_tail import long_tail_counts, stratified_split
from hug_lightning.data.samplers import ShardedEvalSampler
from hug_lightning.data.splits import split_indices

IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
              "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
# class folder names, written in an order that is not the sorted one
NAMES = ["truck", "bird", "ship", "airplane", "horse", "cat", "frog", "deer", "dog", "automobile"]
SORTED = sorted(NAMES)
TRAIN_COUNTS = {name: (3 if name == "cat" else 4) for name in SORTED}  # "cat" is the smallest


def code(label: int) -> int:
    """Pixel value of every image of the class with sorted index ``label``."""
    return 10 + 20 * label


def write_coded_folder(root: Path, extra_dirs: tuple[str, ...] = ()) -> Path:
    """``root/{train,test}/<name>/*.png``: every pixel of a class-``c`` image is ``code(c)``."""
    for split in ("train", "test"):
        for name in NAMES:
            folder = root / split / name
            folder.mkdir(parents=True)
            c = SORTED.index(name)
            n = TRAIN_COUNTS[name] if split == "train" else 1
            for i in range(n):
                img = np.full((32, 32, 3), code(c), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
        for d in extra_dirs:
            (root / split / d).mkdir()
    return root


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory) -> Path:
    return write_coded_folder(tmp_path_factory.mktemp("coded"))


@pytest.fixture(scope="module")
def inet_root(tmp_path_factory) -> Path:
    return write_imagenet_folder(tmp_path_factory.mktemp("inet"), IMAGENETTE, 6, val_per_class=2)


def _inet(root: Path, **kwargs) -> ImageNetSubsetDataModule:
    kwargs = {"subset": "imagenette", "image_size": 16, "resize_size": 18, "num_workers": 0,
              "batch_size": 4, "pin_memory": False, "augment": False, **kwargs}
    return ImageNetSubsetDataModule(root=str(root), **kwargs)


# ------------------------------------------------------------------------ long-tailed CIFAR
def test_step_profile_floors_the_tail():  # kills LT5 (floor -> round in the step profile)
    assert long_tail_counts(100, 4, 6, "step") == [100, 100, 16, 16]  # 100 / 6 = 16.67
    assert long_tail_counts(20, 10, 3, "step") == [20] * 5 + [6] * 5


def test_step_profile_reaches_the_datamodule(cifar10_tv_root, no_checksum):  # kills LT14 (and LT5)
    dm = CIFAR10LTDataModule(root=str(cifar10_tv_root), download=False, imbalance_ratio=3,
                             imbalance_type="step", num_workers=0)
    dm.setup("fit")
    expected = [20] * 5 + [20 // 3] * 5
    assert torch.bincount(dm.train_set.targets, minlength=10).tolist() == expected
    assert dm.class_counts["imbalance_type"] == "step" and dm.class_counts["train"] == expected


@pytest.mark.parametrize("ratio, n_max", [(1, 3), (3, 4)])
def test_n_max_is_the_most_every_class_can_fill(coded_root, ratio, n_max):  # kills LT7
    """LT7: n_max = the largest class size (ratio 1 asks "cat" for 4 of its 3 images). At ratio
    3, "cat" (sorted index 3) needs floor(4 * 3 ** (-3 / 9)) = 2 of them: n_max stays 4."""
    dm = CIFAR10LTDataModule(root=str(coded_root), download=False, imbalance_ratio=ratio,
                             num_workers=0)
    dm.setup("fit")
    assert dm.class_counts["n_max"] == n_max
    assert (torch.bincount(dm.train_set.targets, minlength=10).tolist()
            == closed_form(n_max, 10, ratio))


def test_class_counts_train_excludes_the_held_out_part(cifar10_tv_root, no_checksum):  # kills LT12
    dm = CIFAR10LTDataModule(root=str(cifar10_tv_root), download=False, imbalance_ratio=4,
                             val_split=0.2, num_workers=0)
    dm.setup("fit")
    train = torch.bincount(dm.train_set.targets, minlength=10).tolist()
    val = torch.bincount(dm.val_set.targets, minlength=10).tolist()
    assert dm.class_counts["train"] == train and dm.class_counts["val"] == val
    assert [t + v for t, v in zip(train, val)] == closed_form(20, 10, 4)
    assert sum(val) > 0


def test_stratified_split_keeps_a_training_image_per_class():  # kills LT8
    labels = torch.tensor([0] * 10 + [1] * 2 + [2])
    train, val = stratified_split(labels, 0.8, seed=0)  # class 1: round(1.6) = 2 of 2
    assert torch.bincount(labels[train], minlength=3).tolist() == [2, 1, 1]
    assert torch.bincount(labels[val], minlength=3).tolist() == [8, 1, 0]
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))


def test_stratified_split_follows_the_seed():  # kills LT9 (seed ignored)
    labels = torch.arange(3).repeat_interleave(100)
    splits = [stratified_split(labels, 0.2, seed=s) for s in (0, 0, 7)]
    assert torch.equal(splits[0][1], splits[1][1])
    assert not torch.equal(splits[0][1], splits[2][1])
    for _, val in splits:
        assert torch.bincount(labels[val], minlength=3).tolist() == [20, 20, 20]


def test_stratified_split_reads_a_whole_float_as_a_count():
    """`val_split: 60.0` is a count for every data module (val_count reads it so), not an
    out-of-range fraction; and a count means the same as that fraction."""
    labels = torch.arange(3).repeat_interleave(100)
    for count in (60.0, 60):
        for got, want in zip(stratified_split(labels, count, seed=3),
                             stratified_split(labels, 0.2, seed=3)):
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\)"):
        stratified_split(labels, 1.5, seed=0)


def test_stratified_split_rounds_half_to_even():  # kills LT-half (round half up)
    """The long-tail docstring's rule: ``round(val_split * n_c)`` rounding half to even. At 0.5
    the products are exact: 5 -> 2.5 -> 2, 9 -> 4.5 -> 4, 7 -> 3.5 -> 4 (half up: 3, 5, 4)."""
    labels = torch.tensor([0] * 5 + [1] * 9 + [2] * 7)
    train, val = stratified_split(labels, 0.5, seed=0)
    assert torch.bincount(labels[val], minlength=3).tolist() == [2, 4, 4]
    assert torch.bincount(labels[train], minlength=3).tolist() == [3, 5, 3]


# ------------------------------------------------------------------------ ImageNet subsets
def test_fraction_keeps_at_least_one_image_per_class(inet_root):  # kills IN6
    dm = _inet(inet_root, fraction=0.05)  # round(0.05 * 6) = 0 -> at least 1
    dm.setup("fit")
    assert torch.bincount(dm.train_set.targets, minlength=10).tolist() == [1] * 10


def test_val_split_is_drawn_from_the_subsampled_training_set(inet_root):  # kills IN9b
    dm = _inet(inet_root, images_per_class=4, val_split=0.25, seed=3)
    dm.setup("fit")
    per_class = {c: 0 for c in range(10)}
    for ds in (dm.train_set, dm.val_set):
        for path, y in zip(ds.paths, ds.targets.tolist()):
            assert Path(path).parent.name == IMAGENETTE[y] and Path(path).parent.parent.name == "train"
            per_class[y] += 1
    assert list(per_class.values()) == [4] * 10  # 4 kept per class, then 10 of 40 held out
    assert len(dm.val_set) == 10 and not set(dm.train_set.paths) & set(dm.val_set.paths)


def test_missing_train_folder_and_missing_val_classes_in_one_message(inet_root, tmp_path):
    root = tmp_path / "only_val"  # kills IN10 (stop at the first missing split folder)
    shutil.copytree(inet_root / "val", root / "val")
    shutil.rmtree(root / "val" / IMAGENETTE[4])
    with pytest.raises(DataNotFoundError) as err:
        _inet(root).prepare_data()
    msg = str(err.value)
    assert f"{(root / 'train').resolve()} does not exist" in msg
    assert f"1 of the 10 class folders are missing in {(root / 'val').resolve()}" in msg
    assert IMAGENETTE[4] in msg


def test_missing_classes_of_both_splits_in_one_message(inet_root, tmp_path):  # kills IN11
    root = tmp_path / "copy"
    shutil.copytree(inet_root, root)
    shutil.rmtree(root / "train" / IMAGENETTE[1])
    shutil.rmtree(root / "val" / IMAGENETTE[7])
    with pytest.raises(DataNotFoundError) as err:
        _inet(root).setup("fit")
    msg = str(err.value)
    assert f"missing in {(root / 'train').resolve()}: {IMAGENETTE[1]}" in msg
    assert f"missing in {(root / 'val').resolve()}: {IMAGENETTE[7]}" in msg


def test_empty_class_folder_is_an_error(inet_root, tmp_path):  # kills IN12
    root = tmp_path / "copy"
    shutil.copytree(inet_root, root)
    for f in (root / "train" / IMAGENETTE[6]).iterdir():
        f.unlink()
    with pytest.raises(DataNotFoundError, match=f"hold no image files: {IMAGENETTE[6]}"):
        _inet(root).setup("fit")


def test_skipped_image_is_replaced_by_one_of_its_class(inet_root, tmp_path):  # kills IN14
    root = tmp_path / "copy"
    shutil.copytree(inet_root, root)
    files = sorted((root / "train" / IMAGENETTE[0]).iterdir())
    files[-1].write_bytes(b"not a JPEG at all")  # the last image of class 0
    dm = _inet(root, on_corrupt="skip")
    dm.setup("fit")
    paths = dm.train_set.paths
    bad, first = paths.index(str(files[-1])), paths.index(str(files[0]))
    image, label = dm.train_set[bad]
    assert label == 0  # wraps around to the first image of class 0, not the next class
    assert torch.equal(image, dm.train_set[first][0])


# ------------------------------------------------------------------------ CIFAR layouts
def test_folder_labels_are_sorted_names_and_skip_keeps_them_aligned(coded_root, tmp_path):
    # kills FO4 (unsorted class folders) and FO1 (labels misaligned after a skipped file)
    dm = CIFAR10DataModule(root=str(coded_root), download=False, val_split=0, num_workers=0)
    images, labels = dm.load_split(train=True)
    assert (images[:, 0, 0, 0] == torch.tensor([code(int(y)) for y in labels])).all()
    assert torch.bincount(labels, minlength=10).tolist() == [TRAIN_COUNTS[n] for n in SORTED]
    root = tmp_path / "copy"
    shutil.copytree(coded_root, root)
    (root / "train" / "automobile" / "000.png").write_bytes(b"broken")  # sorted label 1
    dm = CIFAR10DataModule(root=str(root), download=False, on_corrupt="skip", num_workers=0)
    images, labels = dm.load_split(train=True)
    assert (images[:, 0, 0, 0] == torch.tensor([code(int(y)) for y in labels])).all()
    expected = [TRAIN_COUNTS[n] - (n == "automobile") for n in SORTED]
    assert torch.bincount(labels, minlength=10).tolist() == expected


def test_imagenet_full_subset_labels_sorted_folders(coded_root):  # kills FO4 (ImageNet "full")
    dm = ImageNetSubsetDataModule(root=str(coded_root), subset="full")
    assert dm.classes == SORTED


def test_hidden_folders_are_not_classes(tmp_path):  # kills FO2
    root = write_coded_folder(tmp_path / "c10", extra_dirs=(".ipynb_checkpoints",))
    dm = CIFAR10DataModule(root=str(root), download=False, val_split=0, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_set) == sum(TRAIN_COUNTS.values())


def test_extra_class_folder_is_rejected(coded_root, tmp_path):  # kills CF2 (only "<" checked)
    root = tmp_path / "c11"
    shutil.copytree(coded_root, root)
    for split in ("train", "test"):
        shutil.copytree(root / split / "cat", root / split / "zebra")
    with pytest.raises(DataNotFoundError, match="holds 11 class folders"):
        CIFAR10DataModule(root=str(root), download=False).prepare_data()


def test_empty_torchvision_folder_is_not_a_download(tmp_path, monkeypatch):  # kills CF4
    from torchvision.datasets import CIFAR10

    def offline(self):
        raise URLError("offline")

    monkeypatch.setattr(CIFAR10, "download", offline)
    (tmp_path / "cifar-10-batches-py").mkdir()  # left over by an interrupted download
    with pytest.raises(DataNotFoundError, match="download failed"):
        CIFAR10DataModule(root=str(tmp_path), download=True).prepare_data()


# ------------------------------------------------------------------------ splits, sharding
def test_split_indices_follow_the_seed():  # kills SP1 (seed ignored)
    a, b, c = (split_indices(100, 0.2, s) for s in (0, 0, 1))
    assert torch.equal(a[1], b[1])
    assert not torch.equal(a[1].sort().values, c[1].sort().values)
    for train, val in (a, c):
        assert len(val) == 20 and sorted(train.tolist() + val.tolist()) == list(range(100))


def test_split_fraction_is_rounded():  # kills SP2 (floor); round() as stratified_split documents
    assert len(split_indices(10, 0.27, 0)[1]) == 3
    assert len(split_indices(10, 0.33, 0)[1]) == 3


@pytest.mark.parametrize("n, world", [(7, 2), (7, 3), (10, 4), (2, 3)])
def test_sharded_eval_sampler_is_strided_and_exact(n, world):  # kills SA1
    shards = [list(ShardedEvalSampler(range(n), world, r)) for r in range(world)]
    assert shards == [list(range(r, n, world)) for r in range(world)]
    assert [len(ShardedEvalSampler(range(n), world, r)) for r in range(world)] == \
        [len(s) for s in shards]
    assert sorted(sum(shards, [])) == list(range(n))


# ------------------------------------------------------------ defects found by that audit
def test_exponential_tail_is_exactly_n_max_over_ratio():
    """n_max * r ** -1 rounds to 1.9999999999999998 for n_max = 98, r = 49: the floor used to
    give a tail of 1 (and a data module then refused imbalance_ratio = n_max / 2)."""
    assert long_tail_counts(98, 10, 49)[-1] == 2
    for r in range(1, 2001):
        for n_max in (r, 2 * r, 3 * r):
            assert long_tail_counts(n_max, 10, r)[-1] == n_max // r, (n_max, r)
    # the canonical LDAM counts (int(n_max * (1 / r) ** (i / (K - 1)))) are unchanged
    for n_max, k, r in ((5000, 10, 100), (500, 100, 100), (5000, 10, 10), (500, 100, 50)):
        ldam = [int(n_max * ((1 / r) ** (i / (k - 1.0)))) for i in range(k)]
        assert long_tail_counts(n_max, k, r) == ldam
    assert sum(long_tail_counts(5000, 10, 100)) == 12406
    assert sum(long_tail_counts(500, 100, 100)) == 10847


def test_val_split_one_is_an_error_not_a_count():
    with pytest.raises(ValueError, match="whole training set"):
        split_indices(100, 1.0, 0)
    assert len(split_indices(100, 5.0, 0)[1]) == 5  # a whole-number float above 1: a count


def test_label_error_names_the_sample_holding_the_reported_label():
    from hug_lightning.data.splits import check_label_range
    with pytest.raises(ValueError, match=r"Label 12 \(sample 2\)"):
        check_label_range(torch.tensor([3, 10, 12]), 10, "f")
    with pytest.raises(ValueError, match=r"Label -2 \(sample 1\)"):
        check_label_range(torch.tensor([3, -2, 11, -1]), 10, "f")


def test_positive_val_split_that_rounds_to_nothing_is_an_error():
    """`val_split` 0.001 of 80 samples (or a fraction too small for every class of a stratified
    split) held out nothing, and the data modules then validated on the test set silently."""
    from hug_lightning.cli import ConfigError
    with pytest.raises(ConfigError, match="holds out 0 of 80 samples.*above 0.00625"):
        split_indices(80, 0.001, 0)
    labels = torch.tensor([0] * 4 + [1] * 3 + [2] * 1)
    with pytest.raises(ConfigError, match=r"largest has 4\), so validation would silently"):
        stratified_split(labels, 0.1, seed=0)
    with pytest.raises(ConfigError, match="more than one training image per class"):
        stratified_split(torch.arange(5), 0.4, seed=0)
    assert len(stratified_split(labels, 0.2, seed=0)[1]) == 2  # round(0.8), round(0.6), 0
    assert len(split_indices(80, 0.01, 0)[1]) == 1 and len(split_indices(80, 0, 0)[1]) == 0
