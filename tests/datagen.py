"""Generate small data sets in the real on-disk formats (no network needed).

* torchvision's CIFAR pickles: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
  and ``cifar-100-python/{train,test,meta}``, written with the same keys and dtypes as the
  official files (only their md5 sums differ, so tests bypass torchvision's checksum only);
* class-folder trees of PNG/JPEG files.

Images are learnable: class ``c`` has its own mean colour and a bright stripe at row ``c``,
plus noise, so a small network separates the classes in a few steps.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]


def make_images(labels: np.ndarray, num_classes: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 images whose content depends on the label."""
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng(1234).integers(30, 226, size=(num_classes, 3))
    images = rng.normal(0, 25, size=(len(labels), size, size, 3))
    images += palette[labels][:, None, None, :]
    rows = (labels * size) // num_classes
    images[np.arange(len(labels)), rows] += 90
    return np.clip(images, 0, 255).astype(np.uint8)


def _labels(per_class: int, num_classes: int, seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def write_cifar10_torchvision(root: Path, train_per_class: int = 20, test_per_class: int = 10,
                              seed: int = 0, label_offset: int = 0) -> Path:
    """Write torchvision's CIFAR-10 format under ``root/cifar-10-batches-py``."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = _labels(train_per_class, 10, seed)
    chunks = np.array_split(np.arange(len(train_labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        _dump_batch(folder / f"data_batch_{i}", train_labels[idx], 10, seed + i, "labels",
                    label_offset)
    _dump_batch(folder / "test_batch", _labels(test_per_class, 10, seed + 99), 10, seed + 99,
                "labels", label_offset)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000,
                     "num_vis": 3072}, f)
    return Path(root)


def write_cifar100_torchvision(root: Path, train_per_class: int = 3, test_per_class: int = 2,
                               seed: int = 0) -> Path:
    """Write torchvision's CIFAR-100 format under ``root/cifar-100-python``."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _dump_batch(folder / "train", _labels(train_per_class, 100, seed), 100, seed, "fine_labels")
    _dump_batch(folder / "test", _labels(test_per_class, 100, seed + 1), 100, seed + 1,
                "fine_labels")
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:03d}" for c in range(100)],
                     "coarse_label_names": [f"super{c:02d}" for c in range(20)]}, f)
    return Path(root)


def _dump_batch(path: Path, labels: np.ndarray, num_classes: int, seed: int, key: str,
                label_offset: int = 0) -> None:
    images = make_images(labels, num_classes, seed=seed)
    data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # row-major CHW, as CIFAR
    entry = {"batch_label": "generated", key: (labels + label_offset).tolist(), "data": data,
             "filenames": [f"img{i}.png" for i in range(len(labels))]}
    if key == "fine_labels":
        entry["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def write_image_folder(root: Path, classes: list[str], train_per_class: int = 20,
                       test_per_class: int = 10, size: int = 32, ext: str = "png",
                       seed: int = 0, splits: tuple[str, ...] = ("train", "test")) -> Path:
    """Write ``root/<split>/<class>/NNNN.<ext>`` images."""
    counts = {"train": train_per_class, "test": test_per_class, "val": test_per_class}
    for s_i, split in enumerate(splits):
        labels = np.repeat(np.arange(len(classes)), counts[split])
        images = make_images(labels, len(classes), size=size, seed=seed + s_i)
        for i, (img, lab) in enumerate(zip(images, labels)):
            folder = Path(root) / split / classes[lab]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.{ext}")
    return Path(root)


def write_imagenet_folder(root: Path, wnids: list[str], train_per_class: int | list[int] = 6,
                          val_per_class: int = 2, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<wnid>/<wnid>_NNNN.JPEG``: small JPEGs of varied sizes (8-40 px).

    ``train_per_class`` is one count for every class or a list with one count per class.
    Images are learnable (see :func:`make_images`), cropped to non-square shapes.
    """
    per_class = ([train_per_class] * len(wnids) if isinstance(train_per_class, int)
                 else list(train_per_class))
    for s_i, (split, counts) in enumerate((("train", per_class),
                                           ("val", [val_per_class] * len(wnids)))):
        labels = np.repeat(np.arange(len(wnids)), counts)
        images = make_images(labels, len(wnids), size=40, seed=seed + s_i)
        for i, (img, lab) in enumerate(zip(images, labels)):
            h, w = 8 + (7 * i) % 33, 8 + (11 * i + 5) % 33
            folder = Path(root) / split / wnids[lab]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[:h, :w]).save(folder / f"{wnids[lab]}_{i:04d}.JPEG", quality=90)
    return Path(root)
