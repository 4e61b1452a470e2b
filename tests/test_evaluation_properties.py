"""Tests closing gaps found by mutation testing of calibration, robustness, evaluation,
predictions and ufm. Every expected value is computed here by a plain reference (loops over
bins, closed-form gradients of a linear model, hand-written padding), not by the code under test.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from torch import nn

from test_calibration import manual_ece
from hug_lightning.calibration import (expected_calibration_error, fit_temperature,
                                       negative_log_likelihood)
from hug_lightning.evaluation import RobustnessEvaluation
from hug_lightning.predictions import PredictionWriter
from hug_lightning.robustness import (NOISE_CORRUPTIONS, corrupt, fgsm, image_generators, pgd,
                                      to_pixels)
from hug_lightning.ufm import FreeFeatures, UFMDataModule

EPS = 8 / 255


# --------------------------------------------------------------------------- calibration
def test_nll_is_the_mean_negative_log_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    labels = torch.tensor([0, 1, 2])
    for t in (1.0, 0.5):
        ref = 0.0
        for row, y in zip(logits.tolist(), labels.tolist()):
            lse = math.log(sum(math.exp(v / t) for v in row))
            ref += lse - row[y] / t
        ref /= len(labels)
        assert negative_log_likelihood(logits, labels, t).item() == pytest.approx(ref, rel=1e-6)


def _max_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    """The largest |acc - conf| over non-empty equal-width bins (lo, hi], by a plain loop."""
    conf, pred = probs.max(-1)
    mx = 0.0
    for b in range(n_bins):
        mask = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if mask.any():
            mx = max(mx, abs((pred[mask] == labels[mask]).double().mean().item()
                             - conf[mask].double().mean().item()))
    return mx


def test_ece_norm_argument_is_honoured():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(400, 4, generator=g)
    labels = torch.randint(0, 4, (400,), generator=g)
    probs = torch.softmax(logits, -1)
    l1, mx = manual_ece(probs, labels, 10), _max_calibration_error(probs, labels, 10)
    assert l1 != pytest.approx(mx, abs=1e-3)  # the two norms differ on this data
    assert expected_calibration_error(logits, labels, n_bins=10).item() == pytest.approx(l1, abs=1e-5)
    assert expected_calibration_error(logits, labels, n_bins=10, norm="max").item() == \
        pytest.approx(mx, abs=1e-5)


def test_fit_temperature_checks_the_bracket_ends():
    logits = torch.eye(4).repeat(10, 1)  # separable: the NLL decreases as T -> 0
    labels = torch.arange(4).repeat(10)
    # with no golden-section iteration only the end check can return the bound itself
    assert fit_temperature(logits, labels, bounds=(0.01, 10.0), max_iter=0) == pytest.approx(0.01,
                                                                                            rel=1e-12)


# --------------------------------------------------------------------------- attacks (linear model)
class Linear(nn.Module):
    """scores = W flatten(x): the input gradient of CE is W^T (softmax(s / T) - e_y) / T."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T


def _grad_sign(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.softmax((x.flatten(1) @ w.T) / t, -1)
    p[torch.arange(len(y)), y] -= 1
    return (p @ w).sign().view_as(x)


def _setup(seed: int = 0, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    w = 0.1 * torch.randn(3, 12, generator=g, dtype=torch.float64)  # scores / 0.05 stay O(1)
    x = (0.1 + 0.8 * torch.rand(n, 3, 2, 2, generator=g, dtype=torch.float64))
    y = torch.randint(0, 3, (n,), generator=g)
    return Linear(w), w, x, y


def test_fgsm_matches_closed_form_on_linear_model_with_temperature():
    net, w, x, y = _setup()
    x[0, 0, 0, 0] = 0.0  # a pixel at the box edge: clamped
    for t in (1.0, 0.05):
        ref = (x + EPS * _grad_sign(w, x, y, t)).clamp(0, 1)
        assert torch.allclose(fgsm(net, x, y, EPS, temperature=t), ref, atol=1e-12)
    # the test is sensitive to T: the two directions differ
    assert not torch.equal(_grad_sign(w, x, y, 1.0), _grad_sign(w, x, y, 0.05))


def _reference_pgd(w, x, y, eps, steps, alpha, t=1.0, start=None, early_stop=False):
    xa = x.clone() if start is None else start.clone()
    first = [None] * len(x)
    for _ in range(steps):
        pred = (xa.flatten(1) @ w.T).argmax(-1)
        for i in range(len(x)):
            if early_stop and first[i] is None and pred[i] != y[i]:
                first[i] = xa[i].clone()
        xa = xa + alpha * _grad_sign(w, xa, y, t)
        xa = torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(0, 1)
    if early_stop:
        for i, f in enumerate(first):
            if f is not None:
                xa[i] = f
    return xa


def test_pgd_matches_reference_iteration():
    net, w, x, y = _setup()
    eps = 0.2  # large enough for the model to flip several samples mid-way
    # step counts that stop short of the ball's corners, so one step more or less shows
    for steps, step_size in ((1, eps / 3), (3, eps / 5), (2, None)):
        alpha = eps / 4 if step_size is None else step_size
        got = pgd(net, x, y, eps, steps=steps, step_size=step_size, random_start=False,
                  early_stop=False)
        ref = _reference_pgd(w, x, y, eps, steps, alpha)
        assert torch.allclose(got, ref, atol=1e-12), (steps, step_size)
    # one full step without random start is FGSM
    assert torch.allclose(pgd(net, x, y, eps, steps=1, step_size=eps, random_start=False,
                              early_stop=False), fgsm(net, x, y, eps), atol=1e-12)


def test_pgd_early_stop_keeps_first_misclassified_iterate():
    net, w, x, y = _setup(seed=2, n=64)
    eps, steps, alpha = 0.3, 6, 0.05
    ref = _reference_pgd(w, x, y, eps, steps, alpha, early_stop=True)
    last = _reference_pgd(w, x, y, eps, steps, alpha, early_stop=False)
    assert not torch.equal(ref, last)  # early stopping matters on this data
    got = pgd(net, x, y, eps, steps=steps, step_size=alpha, random_start=False, early_stop=True)
    assert torch.allclose(got, ref, atol=1e-12)


def test_pgd_random_start_is_uniform_in_the_ball():
    net, _, _, _ = _setup()
    x = torch.full((64, 3, 4, 4), 0.5)
    y = torch.zeros(64, dtype=torch.long)
    net = Linear(torch.randn(3, 48, generator=torch.Generator().manual_seed(0)))
    start = pgd(net, x, y, EPS, steps=0, generator=torch.Generator().manual_seed(0))
    d = start - x
    assert d.abs().max() <= EPS + 1e-7
    assert d.min() < -0.95 * EPS and d.max() > 0.95 * EPS  # both sides of the ball
    assert abs(d.mean().item()) < 0.05 * EPS


# --------------------------------------------------------------------------- callback
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _norm(p: torch.Tensor) -> torch.Tensor:
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (p - m) / s


def test_callback_attack_equals_pixel_space_attack_of_the_normalized_model():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    pix = torch.rand(8, 3, 4, 4, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    x = _norm(pix)
    cb = RobustnessEvaluation(mean=MEAN, std=STD, attack_temperature=0.05, pgd_steps=3)
    cb.setup(SimpleNamespace(datamodule=None), None, "test")

    def model_fn(p):  # the reference: normalize by hand, then the model
        return net(_norm(p))

    adv = cb.adversarial(net, x, y, "fgsm", EPS)
    assert torch.allclose(adv, _norm(fgsm(model_fn, pix, y, EPS, temperature=0.05)), atol=1e-5)
    adv = cb.adversarial(net, x, y, "pgd", EPS, torch.Generator().manual_seed(3))
    ref = pgd(model_fn, pix, y, EPS, steps=3, generator=torch.Generator().manual_seed(3),
              temperature=0.05)
    assert torch.allclose(adv, _norm(ref), atol=1e-5)


class Recorder(nn.Module):
    """A model that records every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(48, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.lin(x.flatten(1))


def _trainer():
    return SimpleNamespace(global_rank=0, precision_plugin=SimpleNamespace(
        forward_context=nullcontext))


def test_callback_corrupts_pixels_not_normalized_inputs():
    pix = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pix = (pix * 255).round() / 255
    x, y = _norm(pix), torch.zeros(4, dtype=torch.long)
    cb = RobustnessEvaluation(mean=MEAN, std=STD, attacks=(), corruptions=("contrast",),
                              severities=(2,))
    net = Recorder()
    cb.on_test_batch_end(_trainer(), net, None, (x, y), 0)
    means = pix.mean(dim=(-2, -1), keepdim=True)
    ref = ((((pix - means) * 0.5 + means).clamp(0, 1) * 255).round() / 255)  # severity 2: 0.5
    assert len(net.seen) == 2  # clean, contrast_s2
    assert torch.allclose(net.seen[1], _norm(ref), atol=1e-5)


def test_callback_max_batches_counts_exactly_that_many_batches():
    cb = RobustnessEvaluation(attacks=(), corruptions=(), max_batches=2)
    net = Recorder()
    x, y = torch.rand(4, 3, 4, 4), torch.zeros(4, dtype=torch.long)
    for i in range(4):
        cb.on_test_batch_end(_trainer(), net, None, (x, y), i)
    assert len(net.seen) == 2 and int(cb.counts.total) == 8


def test_random_draws_follow_the_image_not_its_batch():
    """Noise corruptions and PGD's random start were seeded per (rank, batch): the same image
    got other noise with another eval batch size or number of processes (about 1 point of a
    noise corruption's accuracy on a 300-image check). Per-image generators keyed by content:
    the whole set at once, or shuffled in batches of 3, gives each image the same draws."""
    pix = (torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    y = torch.arange(10) % 3
    x = _norm(pix)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))

    def per_image(fn) -> torch.Tensor:  # fn(pixels of a batch) -> per-image outputs
        whole = fn(pix)
        parts = torch.empty_like(whole)
        for chunk in order.split(3):
            parts[chunk] = fn(pix[chunk])
        assert torch.equal(whole, parts)
        return whole

    for name in NOISE_CORRUPTIONS:
        out = per_image(lambda p, n=name: corrupt(p, n, 3, image_generators(p, 0, n)))
        assert not torch.equal(out, pix)  # it did corrupt
        other = corrupt(pix, name, 3, image_generators(pix, 1, name))  # another seed
        assert not torch.equal(out, other)
    start = per_image(lambda p: pgd(lambda q: torch.zeros(q.shape[0], 3), p, y[:p.shape[0]],
                                    EPS, steps=0, generator=image_generators(p, 0, "pgd")))
    assert 0 < (start - pix).abs().max() <= EPS + 1e-6
    # the callback: the counts of one batch of 10 equal those of batches of 4 + 6
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    counts = []
    for sizes in ((10,), (4, 6)):
        cb = RobustnessEvaluation(mean=MEAN, std=STD, attacks=("pgd",), pgd_steps=1,
                                  corruptions=NOISE_CORRUPTIONS, severities=(5,))
        for i, idx in enumerate(torch.arange(10).split(sizes)):
            cb.on_test_batch_end(_trainer(), net, None, (x[idx], y[idx]), i)
        counts.append(cb.counts.correct.clone())
    assert torch.equal(counts[0], counts[1])


def test_to_pixels_clamps_out_of_range_inputs():
    x = torch.tensor([-100.0, 0.0, 100.0]).view(1, 3, 1, 1)
    assert torch.equal(to_pixels(x, MEAN, STD).flatten(), torch.tensor([0.0, 0.5, 1.0]))


# --------------------------------------------------------------------------- corruptions
def test_severity_zero_returns_a_copy():
    x = torch.rand(2, 3, 4, 4)
    out = corrupt(x, "gaussian_noise", 0)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_contrast_is_per_channel_and_rounded_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([0.1 + 0.2 * torch.rand(4, 4, generator=g),  # three channels, three means
                     0.4 + 0.2 * torch.rand(4, 4, generator=g),
                     0.7 + 0.2 * torch.rand(4, 4, generator=g)]).unsqueeze(0)
    for s, c in enumerate([0.75, 0.5, 0.4, 0.3, 0.15], start=1):
        out = corrupt(x, "contrast", s)
        ref = x.clone()
        for ch in range(3):
            m = x[0, ch].mean()
            ref[0, ch] = (x[0, ch] - m) * c + m
        ref = torch.floor(ref.clamp(0, 1) * 255 + 0.5) / 255
        assert torch.allclose(out, ref, atol=1e-6), s


def _gauss_ref(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(mode='nearest', truncate=4) written out, separable."""
    r = int(4 * sigma + 0.5)
    w = [math.exp(-k * k / (2 * sigma * sigma)) for k in range(-r, r + 1)]
    w = [v / sum(w) for v in w]
    h, wd = img.shape
    tmp = torch.zeros_like(img, dtype=torch.float64)
    for i in range(h):
        for j in range(wd):
            tmp[i, j] = sum(w[k + r] * img[i, min(max(j + k, 0), wd - 1)] for k in range(-r, r + 1))
    out = torch.zeros_like(tmp)
    for i in range(h):
        for j in range(wd):
            out[i, j] = sum(w[k + r] * tmp[min(max(i + k, 0), h - 1), j] for k in range(-r, r + 1))
    return out


def test_gaussian_blur_matches_truncated_gaussian_with_nearest_border():
    img = torch.zeros(1, 1, 12, 12, dtype=torch.float64)
    img[0, 0, 6, 6] = 1.0  # an impulse: the output is the kernel itself
    img[0, 0, 0, :] = 0.5  # an edge row: tests the border mode
    for s, sigma in ((1, 0.4), (5, 1.0)):
        out = corrupt(img, "gaussian_blur", s, quantize=False)
        assert torch.allclose(out[0, 0], _gauss_ref(img[0, 0], sigma), atol=1e-9), s


def test_defocus_blur_uses_reflect_101_border():
    img = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    img[0, 0, 1, :] = 1.0  # the row next to the border: reflect-101 mirrors it, replicate not
    out = corrupt(img, "defocus_blur", 5, quantize=False)  # 3x3 box (radius 1.5, tiny alias)
    padded = torch.zeros(10, 10, dtype=torch.float64)
    padded[1:9, 1:9] = img[0, 0]
    padded[0, 1:9] = img[0, 0, 1]  # reflect-101: row -1 is row 1
    padded[9, 1:9] = img[0, 0, 6]
    padded[:, 0], padded[:, 9] = padded[:, 2], padded[:, 7]
    box = torch.stack([padded[i:i + 8, j:j + 8] for i in range(3) for j in range(3)]).mean(0)
    assert torch.allclose(out[0, 0], box, atol=1e-3)


# --------------------------------------------------------------------------- predictions
def test_prediction_writer_uses_batch_indices_and_keeps_every_batch(tmp_path):
    outs = [{"pred": torch.tensor([1, 0]), "label": torch.tensor([1, 1]), "logits": torch.eye(2)},
            {"pred": torch.tensor([0]), "label": torch.tensor([0]), "logits": torch.ones(1, 2)}]
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=0, world_size=1)
    writer = PredictionWriter(logits=False)
    writer.write_on_epoch_end(trainer, None, [[outs[0]], [outs[1]]], [[[7, 3]], [[5]]])  # 2 loaders
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert saved["index"].tolist() == [7, 3, 5]
    assert saved["pred"].tolist() == [1, 0, 0] and saved["label"].tolist() == [1, 1, 0]
    assert "logits" not in saved
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows == ["index,pred,label", "7,1,1", "3,0,1", "5,0,0"]


def test_prediction_writer_without_tracked_indices_under_ddp_writes_minus_one(tmp_path):
    """Positions within a rank's shard are not sample indices: never write them as such."""
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=1, world_size=2)
    out = {"pred": torch.tensor([0, 1, 1])}
    with pytest.warns(UserWarning, match="index` is -1"):
        PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[]]])
    saved = torch.load(tmp_path / "predictions-rank1.pt", weights_only=True)
    assert saved["index"].tolist() == [-1, -1, -1]
    trainer.world_size, trainer.global_rank = 1, 0  # one process: the loader's order
    PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[]]])
    assert torch.load(tmp_path / "predictions.pt", weights_only=True)["index"].tolist() == [0, 1, 2]


def test_prediction_writer_names_the_image_file_of_each_row(tmp_path):
    """Sets read file by file (ImageNet) are shuffled once: `index` alone cannot be mapped back
    to a file without rebuilding the data module, so the writer adds the path."""
    from hug_lightning.data.imagenet import ImageFileDataset
    files = [tmp_path / f"img{i}.JPEG" for i in range(4)]
    dataset = ImageFileDataset([(f, i % 2) for i, f in enumerate(files)], None)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=0, world_size=1,
                              predict_dataloaders=DataLoader(dataset, batch_size=2))
    out = {"pred": torch.tensor([0, 1]), "label": torch.tensor([1, 1])}
    PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[3, 1]]])  # per loader
    saved = torch.load(tmp_path / "predictions.pt", weights_only=True)
    assert saved["path"] == [str(files[3]), str(files[1])]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows == ["index,pred,label,path", f"3,0,1,{files[3]}", f"1,1,1,{files[1]}"]


def test_prediction_writer_names_the_classes_it_can(tmp_path):
    """The data module's class names go next to the indices, only when they cover them."""
    out = {"pred": torch.tensor([2, 0]), "label": torch.tensor([1, 2])}
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=0, world_size=1,
                              datamodule=SimpleNamespace(class_names=["cat", "dog", "emu"]))
    PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[4, 9]]])
    assert torch.load(tmp_path / "predictions.pt", weights_only=True)["class_names"] == [
        "cat", "dog", "emu"]
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows == ["index,pred,label,pred_name,label_name", "4,2,1,emu,dog", "9,0,2,cat,emu"]
    for names in (["cat", "dog"], None, []):  # too few names for label 2, or none: no columns
        trainer.datamodule.class_names = names
        PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[4, 9]]])
        assert "class_names" not in torch.load(tmp_path / "predictions.pt", weights_only=True)
        assert (tmp_path / "predictions.csv").read_text().splitlines()[0] == "index,pred,label"


def test_prediction_writer_writes_no_names_of_renumbered_labels(tmp_path):
    """A data module merging CIFAR-10 into vehicles (0) and animals (1) keeps the ten names its
    load read unless it sets its own: label 1 is not 'automobile', so no names, and a warning."""
    ten = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
    out = {"pred": torch.tensor([1, 0]), "label": torch.tensor([1, 1])}
    datamodule = SimpleNamespace(num_classes=2, class_names=ten)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path),
                              global_rank=0, world_size=1, datamodule=datamodule)
    with pytest.warns(UserWarning, match="10 names for its 2 classes"):
        PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[0, 1]]])
    assert (tmp_path / "predictions.csv").read_text().splitlines() == [
        "index,pred,label", "0,1,1", "1,0,1"]
    datamodule.class_names = ["vehicle", "animal"]  # set anew: written
    PredictionWriter().write_on_epoch_end(trainer, None, [out], [[[0, 1]]])
    assert (tmp_path / "predictions.csv").read_text().splitlines()[1] == "0,1,1,animal,animal"


# --------------------------------------------------------------------------- UFM
def test_ufm_labels_features_and_shards():
    dm = UFMDataModule(num_classes=3, samples_per_class=2)
    assert dm.labels.tolist() == [0, 0, 1, 1, 2, 2]  # label of sample i is i // n
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    index, labels = next(iter(dm.val_dataloader()))
    assert index.tolist() == [1, 3, 5] and labels.tolist() == [0, 1, 2]

    feats = FreeFeatures(dim=64, num_samples=50, seed=0)
    assert torch.equal(feats(torch.tensor([4, 0])), feats.weight[[4, 0]])
    bound = 1 / math.sqrt(64)
    w = feats.weight.detach()
    assert w.abs().max() <= bound and w.min() < -0.9 * bound and w.max() > 0.9 * bound


def test_ece_puts_saturated_confidences_in_the_last_bin():
    """Confidences of exactly 1.0 (a float32 softmax saturates at a margin of ~17) belong to the
    last bin (lo, 1], as in Guo et al.: torchmetrics' [lo, hi) bins gave them a bin of their own
    and overstated the ECE (0.275 instead of 0.225 here)."""
    from hug_lightning.calibration import expected_calibration_error
    logits = torch.tensor([[40.0, 0.0], [40.0, 0.0], [2.944439, 0.0], [2.944439, 0.0]])
    labels = torch.tensor([0, 1, 0, 0])  # confidences 1.0, 1.0, 0.95, 0.95: one bin (14/15, 1]
    conf = torch.softmax(logits, -1).max(-1).values.double()
    assert conf[0] == 1.0
    expected = abs(3 / 4 - conf.mean().item())  # one bin: |acc - mean confidence|
    assert expected_calibration_error(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_ece_confidences_on_a_bin_edge_go_to_the_lower_bin():
    """A confidence of exactly b/n belongs to bin (b-1)/n..b/n (Guo et al.'s (lo, hi] bins):
    ties of two (0.5) or four (0.25) classes land on the edges of 4 bins. Kills a floor
    instead of ceil - 1 in the bin index (the ties would join the bin above)."""
    logits = torch.tensor([[0.0, 0.0, -50.0, -50.0]] * 2 + [[0.847298, 0.0, -50.0, -50.0]] * 2
                          + [[0.0, 0.0, 0.0, 0.0]] * 2)
    labels = torch.tensor([0, 0, 1, 1, 0, 0])  # conf 0.5 right, conf 0.7 wrong, conf 0.25 right
    probs = torch.softmax(logits, -1)
    assert probs.max(-1).values[[0, 4]].tolist() == [0.5, 0.25]  # exactly on edges
    conf = probs.max(-1).values.double()
    # by hand: bins (0, .25]: 2 right at .25; (.25, .5]: 2 right at .5; (.5, .75]: 2 wrong at .7
    expected = (2 * (1 - 0.25) + 2 * (1 - 0.5) + 2 * conf[2].item()) / 6
    got = expected_calibration_error(logits, labels, n_bins=4).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert got == pytest.approx(manual_ece(probs, labels, 4), abs=1e-6)


def test_ece_l2_norm_is_the_root_of_the_weighted_squared_gaps():
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(300, 4, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    conf, pred = torch.softmax(logits, -1).max(-1)
    total = 0.0
    for b in range(10):
        mask = (conf > b / 10) & (conf <= (b + 1) / 10)
        if mask.any():
            gap = (pred[mask] == labels[mask]).double().mean() - conf[mask].double().mean()
            total += mask.double().mean().item() * gap.item() ** 2
    got = expected_calibration_error(logits, labels, n_bins=10, norm="l2").item()
    assert got == pytest.approx(math.sqrt(total), abs=1e-6)


def test_attacks_start_from_the_clamped_input():
    """Images slightly outside [0, 1] (an un-normalization's rounding) are clamped first: the
    attack is the one of clamp(x), and eps = 0 returns clamp(x)."""
    net, w, x, y = _setup(seed=4)
    x[:, 0] += 0.3  # channel 0 above 1 in places
    x[:, 1] -= 0.3  # channel 1 below 0 in places
    xc = x.clamp(0, 1)
    assert not torch.equal(x, xc)
    ref = (xc + EPS * _grad_sign(w, xc, y, 1.0)).clamp(0, 1)
    assert torch.allclose(fgsm(net, x, y, EPS), ref, atol=1e-12)
    assert torch.equal(fgsm(net, x, y, 0.0), xc) and torch.equal(pgd(net, x, y, 0.0), xc)
    adv = pgd(net, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(0))
    assert (adv - xc).abs().max() <= EPS + 1e-12 and adv.min() >= 0 and adv.max() <= 1


def test_train_accuracy_counts_restore_on_rank_0_only():
    """The checkpointed counts are the sum over processes: restored on every rank, a DDP run
    resumed mid-epoch would count them once per process."""
    from hug_lightning.train_accuracy import TrainAccuracy
    acc = TrainAccuracy()
    acc.update(torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0]))
    ckpt: dict = {}
    acc.save(ckpt, None)
    assert ckpt["train_counts"].tolist() == [2, 3]
    for rank, expected in ((0, [2, 3]), (1, [0, 0])):
        fresh = TrainAccuracy()
        fresh.load(dict(ckpt), rank)
        assert fresh.counts.tolist() == expected, rank
    fresh.load({"state_dict": {"train_counts": torch.tensor([4, 9])}}, 1)  # legacy key too
    assert fresh.counts.tolist() == [0, 0]
    assert acc.compute_and_reset(None).item() == pytest.approx(2 / 3)
    assert acc.counts.tolist() == [0, 0]


def test_callback_pgd_start_follows_the_image_not_the_global_generator():
    """PGD's random start in the callback is drawn from the per-image generators: the same
    start for an image in a batch of 10 or of 4 + 6, whatever the global generator's state
    (the counts-only check above missed a callback drawing it from the global generator)."""
    pix = (torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    x, y = _norm(pix), torch.arange(10) % 3
    starts = []
    for seed, sizes in ((1, (10,)), (2, (4, 6))):
        torch.manual_seed(seed)
        cb = RobustnessEvaluation(mean=MEAN, std=STD, attacks=("pgd",), eps=(EPS,),
                                  pgd_steps=1, corruptions=())
        parts = []
        for i, idx in enumerate(torch.arange(10).split(sizes)):
            net = Recorder()
            cb.on_test_batch_end(_trainer(), net, None, (x[idx], y[idx]), i)
            parts.append(net.seen[1])  # seen: clean, the start (PGD's 1st step), the result
        starts.append(torch.cat(parts))
    assert torch.equal(starts[0], starts[1])
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    offset = starts[0] * s + m - pix  # the start, in pixels, minus the image
    assert 0 < offset.abs().max() <= EPS + 1e-5


def test_callback_seed_changes_the_random_draws_and_only_them():
    """The same seed gives the model the same noisy and PGD-start images; another seed other
    ones (a callback ignoring its seed went unnoticed)."""
    pix = (torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    x, y = _norm(pix), torch.arange(6) % 3

    def seen(seed: int) -> list[torch.Tensor]:
        cb = RobustnessEvaluation(mean=MEAN, std=STD, attacks=("pgd",), eps=(EPS,),
                                  pgd_steps=1, corruptions=("gaussian_noise",), severities=(3,),
                                  seed=seed)
        torch.manual_seed(5)  # the same model each time
        net = Recorder()
        torch.manual_seed(seed + 7)  # the global generator must not matter
        cb.on_test_batch_end(_trainer(), net, None, (x, y), 0)
        return net.seen  # clean, PGD start, PGD result, noisy

    a, b, c = seen(0), seen(0), seen(1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert torch.equal(a[0], c[0])  # the clean images
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[3], c[3])
