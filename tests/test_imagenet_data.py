"""ImageNet subsets on generated class-folder trees: classes, sampling, DDP shards, errors, CLI."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from conftest import tiny_args
from datagen import write_imagenet_folder
from hug_lightning.cli import ConfigError, main
from hug_lightning.data import DataNotFoundError, ImageNetSubsetDataModule
from hug_lightning.data.folders import CorruptImageError
from hug_lightning.data.imagenet import read_class_list, resolve_classes
from hug_lightning.data.samplers import ShardedEvalSampler

IMAGENETTE = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
              "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]
IMAGEWOOF = ["n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
             "n02096294", "n02099601", "n02105641", "n02111889", "n02115641"]
EXTRA = ["n09999991", "n00000002"]  # class folders outside the subset
TRAIN_COUNTS = [7, 9, 12, 8, 10, 11, 7, 13, 9, 10, 6, 6]


@pytest.fixture(scope="session")
def inet_root(tmp_path_factory) -> Path:
    """Imagenette classes (in shuffled order) plus two others; 6-13 training, 3 val per class."""
    wnids = IMAGENETTE[::-1][:5] + EXTRA + IMAGENETTE[::-1][5:]
    return write_imagenet_folder(tmp_path_factory.mktemp("imagenet"), wnids,
                                 TRAIN_COUNTS[:len(wnids)], val_per_class=3)


def _dm(root: Path, **kwargs) -> ImageNetSubsetDataModule:
    kwargs = {"subset": "imagenette", "image_size": 32, "resize_size": 36, "num_workers": 0,
              "batch_size": 8, "pin_memory": False, **kwargs}
    return ImageNetSubsetDataModule(root=str(root), **kwargs)


def _files(root: Path, split: str, wnid: str) -> list[str]:
    return sorted(str(p) for p in (root / split / wnid).iterdir())


def test_shipped_class_lists():
    inet100 = resolve_classes("imagenet100", Path("nowhere"))
    assert len(inet100) == len(set(inet100)) == 100 and inet100 == sorted(inet100)
    assert all(re.fullmatch(r"n\d{8}", w) for w in inet100)
    assert {"n02869837", "n01749939", "n02090622"} <= set(inet100)
    assert resolve_classes("imagenette", Path("nowhere")) == IMAGENETTE
    assert resolve_classes("imagewoof", Path("nowhere")) == IMAGEWOOF
    dm = ImageNetSubsetDataModule(root="nowhere")  # num_classes known without any data
    assert dm.num_classes == 100


def test_subset_classes_labels_and_items(inet_root):
    dm = _dm(inet_root)
    dm.setup("fit")
    assert dm.classes == IMAGENETTE and dm.num_classes == 10
    assert dm.val_set is dm.test_set  # val_split 0: the official val folder
    for ds, split in ((dm.train_set, "train"), (dm.test_set, "val")):
        for path, label in zip(ds.paths, ds.targets.tolist()):
            assert Path(path).parent.name == IMAGENETTE[label]
            assert Path(path).parent.parent.name == split
        got = torch.bincount(ds.targets, minlength=10).tolist()
        assert got == [len(_files(inet_root, split, w)) for w in IMAGENETTE]
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    x, y = dm.val_set[0]
    assert x.shape == (3, 32, 32)
    # the val folder is read class by class; a fixed shuffle mixes the classes, so limited
    # evaluations (`limit_test_batches`) see more than the first class
    assert next(iter(dm.test_dataloader()))[1].unique().numel() > 3
    batch = next(iter(dm.train_dataloader()))
    assert batch[0].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("kwargs", [{"images_per_class": 8}, {"fraction": 0.5}])
def test_per_class_sampling_is_seeded(inet_root, kwargs):
    def build(seed):
        dm = _dm(inet_root, seed=seed, **kwargs)
        dm.setup("fit")
        return dm

    dm = build(0)
    for c, wnid in enumerate(IMAGENETTE):
        files = _files(inet_root, "train", wnid)
        chosen = [p for p, y in zip(dm.train_set.paths, dm.train_set.targets) if y == c]
        expected = (min(8, len(files)) if "images_per_class" in kwargs
                    else max(1, round(0.5 * len(files))))
        assert len(chosen) == expected and set(chosen) <= set(files)
        assert chosen == sorted(chosen)
    assert build(0).train_set.paths == dm.train_set.paths  # the same on every run and rank
    assert build(1).train_set.paths != dm.train_set.paths
    assert len(dm.test_set) == 30  # evaluation images are never sub-sampled


def test_ddp_shards_identical_disjoint_covering(inet_root):
    ranks = [_dm(inet_root, fraction=0.7, val_split=0.25, seed=5) for _ in range(2)]
    for r, dm in enumerate(ranks):
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=r, training=False)
    assert ranks[0].train_set.paths == ranks[1].train_set.paths
    assert ranks[0].val_set.paths == ranks[1].val_set.paths
    assert not set(ranks[0].train_set.paths) & set(ranks[0].val_set.paths)
    n = len(ranks[0].train_set)
    shards = []
    for dm in ranks:
        sampler = dm.train_dataloader().sampler  # the train loader's DistributedSampler
        assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 2
        sampler.set_epoch(3)
        shards.append([i for i, _key in sampler])
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == n % 2  # only DistributedSampler's padding
    for name in ("val_dataloader", "test_dataloader"):
        loaders = [getattr(dm, name)() for dm in ranks]
        assert all(isinstance(ld.sampler, ShardedEvalSampler) for ld in loaders)
        ev = [list(ld.sampler) for ld in loaders]
        assert sorted(ev[0] + ev[1]) == list(range(len(ranks[0].val_set if name[0] == "v"
                                                         else ranks[0].test_set)))


def test_keyed_augmentation_is_a_function_of_the_key(inet_root):
    dm = _dm(inet_root)
    dm.setup("fit")
    a, b, c = dm.train_set[(3, 1234)], dm.train_set[(3, 1234)], dm.train_set[(3, 99)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == 0
    assert not torch.equal(a[0], c[0])
    x, _ = dm.train_eval_set[3]  # training images with the evaluation transform
    assert torch.equal(x, dm.train_eval_set[3][0]) and x.shape == (3, 32, 32)


def test_a_class_keeps_its_images_in_every_subset(inet_root):
    """The per-class choices are seeded by the WNID, not the label: in ``full`` every
    Imagenette class sits one label later (n00000002 sorts first), and keeps the same training
    and held-out images as in ``imagenette``."""
    def by_wnid(subset):
        dm = _dm(inet_root, subset=subset, fraction=0.6, val_split=0.3)
        dm.setup("fit")
        return {split: {(dm.classes[y], p) for p, y in zip(ds.paths, ds.targets.tolist())}
                for split, ds in (("train", dm.train_set), ("val", dm.val_set))}

    small, full = by_wnid("imagenette"), by_wnid("full")
    assert _dm(inet_root, subset="full").classes.index(IMAGENETTE[0]) == 1
    for split in ("train", "val"):
        assert small[split] and small[split] == {s for s in full[split] if s[0] in IMAGENETTE}


def test_class_list_file_and_full(inet_root, tmp_path):
    listing = tmp_path / "mine.txt"
    listing.write_text(f"# my subset\n{IMAGENETTE[3]}  # chain saw\n\n{EXTRA[0]}\n"
                       f"{IMAGENETTE[0]}\n")
    assert read_class_list(listing) == [IMAGENETTE[3], EXTRA[0], IMAGENETTE[0]]
    dm = _dm(inet_root, subset=str(listing))
    assert dm.classes == sorted([IMAGENETTE[3], EXTRA[0], IMAGENETTE[0]]) and dm.num_classes == 3
    dm.setup("test")
    assert dm.train_set is None and len(dm.test_set) == 9
    assert _dm(inet_root, subset="full").num_classes == 12
    with pytest.raises(DataNotFoundError, match="full"):
        _dm(tmp_path / "absent", subset="full")
    listing.write_text(f"{EXTRA[0]}\n{EXTRA[0]}\n")
    with pytest.raises(ValueError, match="twice"):
        _dm(inet_root, subset=str(listing))


def test_class_list_in_loc_synset_mapping_style(inet_root, tmp_path):
    """ImageNet's LOC_synset_mapping.txt lines: a WNID, then its description."""
    listing = tmp_path / "LOC_synset_mapping.txt"
    listing.write_text(f"{IMAGENETTE[0]} tench, Tinca tinca\n{IMAGENETTE[1]} English springer,"
                       f" English springer spaniel\n{EXTRA[0]} cassette player\n")
    assert read_class_list(listing) == [IMAGENETTE[0], IMAGENETTE[1], EXTRA[0]]
    assert _dm(inet_root, subset=str(listing)).num_classes == 3
    listing.write_text(f"{IMAGENETTE[0]}\n{IMAGENETTE[1]} {IMAGENETTE[2]}, {IMAGENETTE[3]}\n")
    with pytest.raises(ValueError, match=rf"line 2: one class per line, found {IMAGENETTE[1]} "
                                         rf"and {IMAGENETTE[2]}, {IMAGENETTE[3]}"):
        read_class_list(listing)


def test_layout_errors_name_the_likely_cause(inet_root, tmp_path):
    """A root one level too deep (the train folder itself) and per-class tars left unextracted
    get a hint besides the list of missing folders."""
    with pytest.raises(DataNotFoundError, match="it looks like a train/ or val/ folder, point "
                                                "--data.init_args.root at its parent"):
        _dm(inet_root / "train").prepare_data()
    tars = tmp_path / "tars"
    (tars / "train").mkdir(parents=True)
    (tars / "val").mkdir()
    for wnid in IMAGENETTE:
        (tars / "train" / f"{wnid}.tar").write_bytes(b"")
    with pytest.raises(DataNotFoundError, match="train hold .tar files: extract each class"):
        _dm(tars).prepare_data()
    with pytest.raises(DataNotFoundError) as err:  # a plain missing folder: no hint
        _dm(tmp_path / "tars", subset="imagenette").check_layout(("val",))
    assert "looks like" not in str(err.value) and ".tar" not in str(err.value)


def test_val_split_is_per_class_and_keeps_every_class_in_training(inet_root):
    """A random split of 10 classes x 2 images with 30 % held out left some classes without a
    training image; per class, each gives round(0.3 * 2) = 1 and keeps 1."""
    dm = _dm(inet_root, images_per_class=2, val_split=0.3)
    dm.setup("fit")
    train = torch.bincount(dm.train_set.labels, minlength=10)
    val = torch.bincount(dm.val_set.labels, minlength=10)
    assert train.tolist() == [1] * 10 and val.tolist() == [1] * 10
    assert dm.val_set.labels.tolist() != sorted(dm.val_set.labels.tolist())  # classes mixed
    again = _dm(inet_root, images_per_class=2, val_split=0.3)
    again.setup("fit")
    assert again.val_set.labels.tolist() == dm.val_set.labels.tolist()  # seeded
    dm = _dm(inet_root, images_per_class=2, val_split=10)  # an int: about that many
    dm.setup("fit")
    assert len(dm.val_set) == 10 and len(dm.train_set) == 10
    with pytest.raises(ValueError, match="asks for 20 of the 20 training samples"):
        _dm(inet_root, images_per_class=2, val_split=20).setup("fit")


def test_bad_arguments(inet_root):
    with pytest.raises(ValueError, match="not both; got 3 and 0.5"):
        _dm(inet_root, images_per_class=3, fraction=0.5)
    for bad in ({"fraction": 1.5}, {"fraction": 0.0}):  # one option given: no "not both"
        with pytest.raises(ValueError, match=rf"^fraction must be in \(0, 1\].*{bad['fraction']}"):
            _dm(inet_root, **bad)
    with pytest.raises(ValueError, match="^images_per_class must be >= 1.*got 0"):
        _dm(inet_root, images_per_class=0)
    with pytest.raises(ValueError, match="imagenet100, imagenette, imagewoof"):
        _dm(inet_root, subset="imagenet_typo")


def test_missing_root_and_missing_wnids_in_one_message(inet_root, tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(DataNotFoundError) as err:
        _dm(absent).prepare_data()
    assert str(absent.resolve()) in str(err.value) and "val" in str(err.value)
    dm = _dm(inet_root, subset="imagenet100")  # only two of these classes exist there
    with pytest.raises(DataNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(inet_root.resolve()) in msg
    missing = [w for w in dm.classes if w not in IMAGENETTE + EXTRA]
    assert f"{len(missing)} of the 100 class folders are missing" in msg
    assert all(w in msg for w in missing[:20]) and f"({len(missing) - 20} more)" in msg
    assert "train" in msg and "val" in msg  # both splits, one error
    shutil.copytree(inet_root / "train", tmp_path / "only_train" / "train")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        _dm(tmp_path / "only_train").prepare_data()


def test_corrupt_jpeg_names_the_file(inet_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(inet_root, root)
    bad = Path(_files(root, "train", IMAGENETTE[2])[1])
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 3)
    dm = _dm(root, augment=False)
    dm.setup("fit")
    i = dm.train_set.paths.index(str(bad))
    with pytest.raises(CorruptImageError, match=re.escape(str(bad))):
        dm.train_set[i]
    dm = _dm(root, on_corrupt="skip", augment=False)
    dm.setup("fit")
    image, label = dm.train_set[i]  # the next image of the same class stands in
    assert label == 2 and image.shape == (3, 32, 32)
    assert torch.equal(image, dm.train_set[i + 1][0])
    assert len(dm.train_set) == sum(len(_files(root, "train", w)) for w in IMAGENETTE)


def _imagenet_args(root: Path, log_dir: Path, config: str, *extra: str) -> list[str]:
    args = tiny_args(root, log_dir, config=config)
    i = args.index("--data.init_args.download")
    del args[i:i + 2]  # ImageNet is never downloaded: no such option
    return [*args, "--data.init_args.subset", "imagenette", "--data.init_args.image_size", "32",
            "--data.init_args.resize_size", "36", *extra]


@pytest.mark.parametrize("config", ["imagenet100_ce", "imagenet100_hug"])
def test_cli_fit_then_test(inet_root, tmp_path, config):
    args = _imagenet_args(inet_root, tmp_path, config, "--trainer.limit_train_batches", "2")
    cli = main(["fit", *args])
    assert cli.model.num_classes == 10
    assert type(cli.model.head).__name__ == ("HUGHead" if config.endswith("hug") else
                                             "CrossEntropyHead")
    assert {"train/loss", "val/acc"} <= set(cli.trainer.callback_metrics)
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    cli = main(["test", *args, "--ckpt_path", str(last), "--trainer.limit_test_batches", "1.0"])
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    assert len(cli.datamodule.test_set) == 30
    if config.endswith("hug"):  # from a copy of val/ alone: validate, and predict with WNIDs
        shutil.copytree(inet_root / "val", tmp_path / "val_only" / "val")
        only = _imagenet_args(tmp_path / "val_only", tmp_path, config,
                              "--data.init_args.val_split", "0")  # validate on val/
        cli = main(["validate", *only, "--ckpt_path", str(last)])
        assert "val/acc" in cli.trainer.callback_metrics
        cli = main(["predict", *only, "--ckpt_path", str(last)])
        rows = (Path(cli.trainer.log_dir) / "predictions.csv").read_text().splitlines()
        assert rows[0] == "index,pred,label,pred_name,label_name,path" and len(rows) == 31
        for row in rows[1:]:
            _, pred, label, pred_name, label_name, path = row.split(",")
            assert (pred_name, label_name) == (IMAGENETTE[int(pred)], IMAGENETTE[int(label)])
            assert label_name == Path(path).parent.name
    if config.endswith("ce"):  # 10 other classes: the num_classes check passed, labels differ
        listing = tmp_path / "other10.txt"
        listing.write_text("\n".join(IMAGENETTE[:8] + EXTRA))
        with pytest.raises(ConfigError, match=rf"only in the checkpoint: {IMAGENETTE[8]}, "
                                              rf"{IMAGENETTE[9]}.*only in this subset: "
                                              rf"{EXTRA[1]}, {EXTRA[0]}\."):
            main(["test", *args, "--ckpt_path", str(last), "--data.init_args.subset",
                  str(listing)])


@pytest.mark.parametrize("kwargs", [{"images_per_class": 1, "val_split": 0.5},
                                    {"images_per_class": 3, "val_split": 0.1},
                                    {"images_per_class": 6, "val_split": 1}])
def test_val_split_that_holds_out_nothing_is_an_error(inet_root, kwargs):
    """Each class gives round(fraction x n_c) and keeps one for training: when that is 0 for
    every class, validation silently ran on the official val folder (the test set)."""
    from hug_lightning.cli import ConfigError
    with pytest.raises(ConfigError, match="holds out no image.*silently run on the test set"):
        _dm(inet_root, **kwargs).setup("fit")
    dm = _dm(inet_root, images_per_class=2, val_split=0.5)
    dm.setup("fit")  # one of 2 per class: held out
    assert len(dm.val_set) == 10 and dm.val_set is not dm.test_set


def test_class_list_with_a_byte_order_mark(tmp_path, inet_root):
    """A list saved by a Windows editor starts with a BOM, which became part of the first WNID:
    the error then called an existing folder missing."""
    listing = tmp_path / "classes.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(IMAGENETTE[:3]).encode() + b"\r\n")
    assert read_class_list(listing) == IMAGENETTE[:3]
    _dm(inet_root, subset=str(listing)).check_layout()


def test_odd_image_formats_decode_to_rgb(inet_root, tmp_path):
    """ImageNet holds grayscale and CMYK JPEGs and a PNG named .JPEG; other folders hold 16-bit
    PNGs (decoded as uint16 and wrapped into uint8: 32767 became 255) and non-image files."""
    import numpy as np
    from PIL import Image

    from hug_lightning.data.image_files import ImageFileDataset
    root = tmp_path / "copy"
    shutil.copytree(inet_root, root)
    folder, rng = root / "train" / IMAGENETTE[0], np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0], "L").save(folder / "gray.JPEG")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.JPEG")
    Image.fromarray(rgb).save(folder / "png.JPEG", format="PNG")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(folder / "rgba.png")
    deep = rng.integers(0, 2**16, (9, 14)).astype("<u2")
    Image.fromarray(deep).save(folder / "deep.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "Thumbs.db").write_bytes(b"\0" * 8)
    dm = _dm(root, augment=False)
    dm.setup("fit")
    paths = {Path(p).name: p for p, y in zip(dm.train_set.paths, dm.train_set.labels) if y == 0}
    assert set(paths) == {p.name for p in folder.iterdir()} - {"notes.txt", "Thumbs.db"}
    ref16 = np.repeat(np.round(deep / 257.0)[..., None], 3, axis=2)
    for name in ("gray.JPEG", "cmyk.JPEG", "png.JPEG", "rgba.png", "deep.png"):
        got, label = ImageFileDataset([(paths[name], 0)])[0]
        with Image.open(paths[name]) as img:
            ref = ref16 if name == "deep.png" else np.asarray(img.convert("RGB"), dtype=float)
        assert got.dtype == torch.uint8 and got.shape == (3, 9, 14), name
        assert np.abs(got.permute(1, 2, 0).numpy() - ref).max() <= 1, name
        x, y = dm.train_set[dm.train_set.paths.index(paths[name])]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0


@pytest.mark.parametrize("fn", ["test", "predict", "validate"])
def test_evaluation_needs_only_the_val_folder(inet_root, tmp_path, fn):
    """test/predict (and validate with val_split 0, the default) read val/ alone, but they
    required train/ as well: a copy of the validation images could not evaluate a checkpoint."""
    from lightning.pytorch.trainer.states import TrainerFn
    shutil.copytree(inet_root / "val", tmp_path / "val")
    dm = _dm(tmp_path)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn(fn)), world_size=1)
    dm.prepare_data()
    dm.setup(fn)
    official = [f for w in IMAGENETTE for f in _files(tmp_path, "val", w)]
    assert sorted(dm.test_set.paths) == official
    if fn == "validate":
        assert sorted(dm.val_dataloader().dataset.paths) == official
    missing_train = re.escape(str((tmp_path / "train").resolve()))
    dm.trainer.state.fn = TrainerFn.FITTING  # fitting does need train/: named in the error
    with pytest.raises(DataNotFoundError, match=missing_train):
        dm.prepare_data()
    held_out = _dm(tmp_path, val_split=0.2)  # validating on held-out training images does too
    held_out.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING),
                                       world_size=1)
    for call in (held_out.prepare_data, lambda: held_out.setup("validate")):
        with pytest.raises(DataNotFoundError, match=missing_train):
            call()


def test_predictions_name_the_wnid_of_each_label(inet_root, tmp_path):
    """ImageNet's predictions carry WNIDs: each row's label name is its file's class folder."""
    from hug_lightning.predictions import PredictionWriter
    dm = _dm(inet_root)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0)
    dm.setup("predict")
    loader = dm.predict_dataloader()
    labels = torch.cat([y for _, y in loader])
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=0, world_size=1, datamodule=dm,
                              predict_dataloaders=loader)
    out = {"pred": torch.zeros_like(labels), "label": labels}
    PredictionWriter().write_on_epoch_end(trainer, None, [out], [[list(range(len(labels)))]])
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "index,pred,label,pred_name,label_name,path" and len(rows) > 10
    for row in rows[1:]:
        _, pred, _, pred_name, label_name, path = row.split(",")
        assert label_name == Path(path).parent.name and pred_name == IMAGENETTE[0]


def test_checkpoint_of_other_classes_is_refused(inet_root, tmp_path):
    """A checkpoint's label c is the c-th WNID of the subset it was trained on: evaluating it on
    another subset of as many classes (imagenette vs imagewoof, an edited class list) scored
    its predictions against other WNIDs without a word."""
    trained = _dm(inet_root)
    state = trained.state_dict()
    assert state == {"classes": IMAGENETTE}
    _dm(inet_root).load_state_dict(state)  # the same subset: accepted
    listing = tmp_path / "ten.txt"
    listing.write_text("\n".join(IMAGENETTE[1:] + EXTRA[:1]))
    with pytest.raises(ConfigError, match=rf"checkpoint: {IMAGENETTE[0]}; only in this subset: "
                                          rf"{EXTRA[0]}\. .*--data.init_args.subset"):
        _dm(inet_root, subset=str(listing)).load_state_dict(state)
    _dm(inet_root).load_state_dict({})  # a checkpoint saved before the classes were recorded
