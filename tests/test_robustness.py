"""Attacks and corruptions (hug_lightning.robustness) and the RobustnessEvaluation callback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_args
from datagen import make_images
from hug_lightning.cli import main
from hug_lightning.data.cifar import CIFAR10DataModule
from hug_lightning.evaluation import RobustnessEvaluation
from hug_lightning.heads import HUGHead
from hug_lightning.robustness import CORRUPTIONS, corrupt, disk_kernel, fgsm, pgd

EPS = 8 / 255


class Net(nn.Module):
    """MLP on 3x8x8 pixel images with a linear or HUG (cosine) head."""

    def __init__(self, k: int = 4, hug: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = HUGHead(k, 16) if hug else nn.Linear(16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.5) / 0.25))


def make_data(n: int, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, k, (n,), generator=g)
    x = 0.5 + 0.12 * (protos[y] - 0.5) + 0.06 * torch.randn(n, 3, 8, 8, generator=g)
    return x.clamp(0, 1), y


@pytest.fixture(scope="module", params=[False, True], ids=["linear", "hug"])
def trained(request) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = Net(hug=request.param)
    x, y = make_data(1024)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        if request.param:
            loss, _ = net.head.loss(net.body((x - 0.5) / 0.25), y)
        else:
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xt, yt = make_data(512, seed=1)
    return net, xt, yt


def _acc(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(-1) == y).float().mean().item()


# --------------------------------------------------------------------------- attacks
def test_attacks_stay_in_eps_ball_and_pixel_box():
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.rand(64, 3, 8, 8)
    x[:8] = 0.0
    x[8:16] = 1.0  # at the box edges the clamp must keep the ball constraint
    y = torch.randint(0, 4, (64,))
    for adv in (fgsm(net, x, y, EPS), pgd(net, x, y, EPS, steps=5, step_size=EPS / 2),
                pgd(net, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(1))):
        assert (adv - x).abs().max() <= EPS + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert not adv.requires_grad
    assert torch.equal(fgsm(net, x, y, 0.0), x) and torch.equal(pgd(net, x, y, 0.0), x)
    assert all(p.grad is None for p in net.parameters())  # input gradients only


def test_attacks_under_inference_mode_and_seeded():
    net = Net().eval()
    x, y = make_data(32)
    with torch.inference_mode():  # as in Lightning's test loop
        a = pgd(net, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(5))
        b = pgd(net, x, y, EPS, steps=3, generator=torch.Generator().manual_seed(5))
        f = fgsm(net, x, y, EPS)
    assert torch.equal(a, b)
    assert (f - x).abs().max() <= EPS + 1e-6
    assert all(p.grad is None for p in net.parameters())


def test_pgd_at_most_fgsm_on_trained_model(trained):
    net, x, y = trained
    clean = _acc(net, x, y)
    assert clean > 0.95
    for eps in (2 / 255, 4 / 255, 8 / 255):
        acc_fgsm = _acc(net, fgsm(net, x, y, eps), y)
        acc_pgd = _acc(net, pgd(net, x, y, eps, steps=10,
                                generator=torch.Generator().manual_seed(0)), y)
        assert acc_pgd <= acc_fgsm + 1e-9, (eps, acc_pgd, acc_fgsm)
        assert acc_fgsm <= clean
    assert acc_pgd < acc_fgsm - 0.05  # at 8/255 the iterated attack is clearly stronger
    assert acc_pgd < clean - 0.5  # 8/255 breaks this weakly separated model


# --------------------------------------------------------------------------- corruptions
@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    labels = np.arange(16) % 10
    return torch.from_numpy(make_images(labels, 10)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_identity_and_distortion_grows(images, name):
    assert torch.equal(corrupt(images, name, 0), images)
    mse = []
    for s in range(1, 6):
        out = corrupt(images, name, s, generator=torch.Generator().manual_seed(s))
        assert out.shape == images.shape and out.dtype == images.dtype
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, (out * 255).round() / 255)  # on the uint8 grid
        mse.append(((out - images) ** 2).mean().item())
    assert mse[0] > 0 and all(a < b for a, b in zip(mse, mse[1:])), mse


def test_corruption_parameters_match_cifar10c_tables():
    gray = torch.full((8, 3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    for s, std in enumerate([0.04, 0.06, 0.08, 0.09, 0.10], start=1):
        noise = corrupt(gray, "gaussian_noise", s, g, quantize=False) - gray
        assert abs(noise.std().item() - std) < 0.03 * std
    for s, c in enumerate([500, 250, 100, 75, 50], start=1):  # Poisson: var = x / c
        diff = corrupt(gray, "shot_noise", s, g, quantize=False) - gray
        assert abs(diff.var().item() - 0.5 / c) < 0.05 * 0.5 / c
        assert abs(diff.mean().item()) < 0.05 * (0.5 / c) ** 0.5  # unbiased: E Poisson(xc)/c = x
    for s in range(1, 6):  # blurs preserve constants; contrast keeps channel means
        assert torch.allclose(corrupt(gray, "defocus_blur", s, quantize=False), gray)
        ramp = torch.linspace(0.1, 0.9, 32).expand(2, 3, 32, 32)
        out = corrupt(ramp, "contrast", s, quantize=False)
        assert torch.allclose(out.mean(dim=(-2, -1)), ramp.mean(dim=(-2, -1)), atol=1e-6)
    assert torch.allclose((out - 0.5) / (ramp - 0.5), torch.tensor(0.15), atol=1e-4)
    k = disk_kernel(1.5, 0.1)  # severity 5: a 3x3 box (9 pixels within radius 1.5)
    assert torch.allclose(k[1:4, 1:4], torch.full((3, 3), 1 / 9, dtype=k.dtype), atol=1e-6)
    assert abs(k.sum().item() - 1) < 1e-9
    a = corrupt(gray, "impulse_noise", 5, torch.Generator().manual_seed(3), quantize=False)
    assert abs((a != 0.5).float().mean().item() - 0.07) < 0.01


def test_corruption_noise_is_seeded(images):
    def run(seed: int) -> torch.Tensor:
        return corrupt(images, "shot_noise", 3, torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


# --------------------------------------------------------------------------- callback
def test_callback_attack_respects_ball_in_pixel_space():
    torch.manual_seed(0)
    dm = CIFAR10DataModule
    cb = RobustnessEvaluation(mean=dm.mean, std=dm.std)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                        nn.Linear(4 * 30 * 30, 10)).eval()
    u8 = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    m, s = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    x = (u8.float() / 255 - m) / s
    y = torch.randint(0, 10, (16,))
    with torch.inference_mode():
        for attack in ("fgsm", "pgd"):
            net.train()  # a direct caller's model in train mode: the attack must not touch BN
            stats = [b.clone() for b in net.buffers()]
            adv = cb.adversarial(net, x, y, attack, EPS, torch.Generator().manual_seed(0))
            assert net.training and all(torch.equal(a, b) for a, b in zip(stats, net.buffers()))
            pix = adv * s + m
            assert (pix - u8.float() / 255).abs().max() <= EPS + 1e-6
            assert pix.min() >= -1e-6 and pix.max() <= 1 + 1e-6
    assert all(p.grad is None for p in net.parameters())


def test_cli_eps0_equals_test_accuracy(cifar10_tv_root, no_checksum, tmp_path):
    main(["fit", *tiny_args(cifar10_tv_root, tmp_path)])
    ckpt = next((tmp_path / "cifar10_ce").glob("version_*/checkpoints/last.ckpt"))
    cli = main(["test", *tiny_args(cifar10_tv_root, tmp_path), "--ckpt_path", str(ckpt),
                "--robust.enabled", "true", "--robust.eps", json.dumps([0.0, EPS]),
                "--robust.pgd_steps", "2", "--robust.severities", "[0, 3]",
                "--robust.corruptions", "[gaussian_noise, contrast]"])
    m = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    acc = m["test/acc"]
    for key in ("clean", "fgsm_eps0", "pgd_eps0", "gaussian_noise_s0", "contrast_s0"):
        assert m[f"test/robust/{key}"] == pytest.approx(acc, abs=1e-7), key
    corr = [m[f"test/robust/{c}_s3"] for c in ("gaussian_noise", "contrast")]
    # severity 0 (the clean image) is reported but not part of the corruption mean
    assert m["test/robust/corruption_mean"] == pytest.approx(sum(corr) / 2, abs=1e-6)
    assert {"test/robust/fgsm_eps8", "test/robust/pgd_eps8"} <= set(m)
    assert all(p.grad is None for p in cli.model.parameters())


def test_metric_keys_name_the_budget_in_units_of_1_255():
    """The README's example eps (decimals of 2/255 and 8/255) gave keys like fgsm_eps1.9992."""
    cb = RobustnessEvaluation(attacks=["fgsm", "pgd"], eps=[0.00784, 0.03137, 0.5 / 255])
    assert cb.keys == ["clean", "fgsm_eps2", "fgsm_eps8", "fgsm_eps0.5", "pgd_eps2", "pgd_eps8",
                       "pgd_eps0.5"]
    with pytest.raises(ValueError, match="the same budget twice"):
        RobustnessEvaluation(eps=[2 / 255, 0.00784])


def test_bad_budgets_and_batch_limits_are_errors_and_nothing_evaluated_logs_nothing():
    """max_batches 0 was accepted and every robust accuracy logged as 0.0; eps 8 (meant as
    8/255) ran an unbounded attack."""
    from types import SimpleNamespace
    for bad in ({"max_batches": 0}, {"eps": [8]}, {"eps": [-0.1]}):
        with pytest.raises(ValueError, match="invalid arguments"):
            RobustnessEvaluation(**bad)
    cb = RobustnessEvaluation(max_batches=1)
    logged = {}
    module = SimpleNamespace(log=lambda k, v, **_: logged.__setitem__(k, v))
    with pytest.warns(UserWarning, match="no test batch was evaluated"):
        cb.on_test_epoch_end(None, module)
    assert logged == {}


def test_callback_attack_restores_every_submodules_mode():
    """A model in train mode with a frozen (eval-mode) BatchNorm, as in fine-tuning: the
    attack switched the whole model to eval and back to train, so the frozen BatchNorm came
    back in train mode and its statistics moved at the next training step."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    net.train()
    net[1].eval()
    before = [m.training for m in net.modules()]
    cb = RobustnessEvaluation()
    x, y = torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    for attack in ("fgsm", "pgd"):
        cb.adversarial(net, x, y, attack, EPS, torch.Generator().manual_seed(0))
        assert [m.training for m in net.modules()] == before, attack


def test_pgd_step_size_must_be_positive():
    """A negative step size descended the loss (robust accuracy above the clean one) and 0 left
    the start unchanged, both silently."""
    net = Net().eval()
    x, y = make_data(8)
    for bad in (-EPS / 4, 0.0):
        with pytest.raises(ValueError, match="step_size must be positive"):
            pgd(net, x, y, EPS, steps=2, step_size=bad)
        with pytest.raises(ValueError, match="invalid arguments"):
            RobustnessEvaluation(pgd_step_size=bad)
    RobustnessEvaluation(pgd_step_size=EPS / 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_callback_attack_stays_in_the_ball_for_half_precision_inputs(dtype):
    """bf16 inputs (``bf16-true``): the attacked pixels, rounded to the nearest bf16 after
    normalization, left the eps-ball around the clean input by up to half a bf16 step (8.6/255
    for eps 8/255, 2.6/255 for 2/255). Rounded toward the clean input, they stay inside, and
    early stopping judges the very images it returns."""
    torch.manual_seed(0)
    dm = CIFAR10DataModule
    cb = RobustnessEvaluation(mean=dm.mean, std=dm.std)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()
    net = net.to(dtype)
    m, s = torch.tensor(dm.mean).view(1, 3, 1, 1), torch.tensor(dm.std).view(1, 3, 1, 1)
    u8 = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    x = ((u8.float() / 255 - m) / s).to(dtype)
    y = torch.randint(0, 10, (32,))
    for eps in (2 / 255, 8 / 255):
        for attack in ("fgsm", "pgd"):
            adv = cb.adversarial(net, x, y, attack, eps, torch.Generator().manual_seed(0))
            assert adv.dtype == dtype
            offset = (adv.float() - x.float()) * s  # in pixels, against the clean input
            pix = x.float() * s + m  # a rounded clean pixel may lie outside [0, 1]: the ball
            outside = (pix - pix.clamp(0, 1)).abs()  # is about the clamped one
            excess = (offset.abs() - outside).max()
            assert excess <= eps + 1e-6, (attack, eps, excess * 255)
            assert offset.abs().max() > 0.9 * eps  # it did attack


def test_callback_refuses_batches_that_are_not_images():
    """Index or feature batches (the UFM data set) went into the pixel conversions and failed
    deep inside an attack (a batch-size mismatch of the cross-entropy, or nextafter on Long)."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(forward_context=nullcontext))
    y = torch.zeros(8, dtype=torch.long)
    for x in (torch.arange(8), torch.randn(8, 16)):
        with pytest.raises(ValueError, match=r"needs image batches \(B, C, H, W\).*"
                                             r"--robust.enabled false"):
            RobustnessEvaluation().on_test_batch_end(trainer, nn.Identity(), None, (x, y), 0)


def test_callback_refuses_a_mean_or_std_of_another_channel_count():
    """3 values on 1-channel images broadcast to 3-channel pixels (the model then failed on
    its input); 2 values on 3 channels failed in the broadcast."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(forward_context=nullcontext))
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    y = torch.zeros(2, dtype=torch.long)
    for mean, std in (((0.5, 0.5, 0.5), (0.25,)), ((0.5,), (0.2, 0.3))):
        cb = RobustnessEvaluation(mean=mean, std=std, attacks=("fgsm",))
        with pytest.raises(ValueError, match="1-channel images"):
            cb.on_test_batch_end(trainer, net, None, (torch.rand(2, 1, 4, 4), y), 0)
    cb = RobustnessEvaluation(mean=(0.5,), std=(0.25,), attacks=("fgsm",), corruptions=())
    cb.on_test_batch_end(trainer, net, None, (torch.rand(2, 1, 4, 4), y), 0)  # one value: fine
