"""The evaluation callbacks: RobustnessEvaluation (here) and CalibrationMonitor (re-exported).

Ordinary Lightning callbacks, selectable from YAML or the command line, e.g.
``--trainer.callbacks+ '{"class_path": "hug_lightning.evaluation.RobustnessEvaluation",
"init_args": {"max_batches": 20}}'``. :class:`RobustnessEvaluation` runs in the test stage;
:class:`CalibrationMonitor` (defined in :mod:`hug_lightning.calibration_monitor`) fits the
temperature every validation epoch, logs ECE / NLL; both keep their
``hug_lightning.evaluation.<name>`` paths.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning.calibration_monitor import CalibrationMonitor
from hug_lightning.loop import unpack_batch_of
from hug_lightning.robustness import (CORRUPTIONS, NOISE_CORRUPTIONS, CorrectCounts, Generators,
                                      cast_toward, corrupt, fgsm, from_pixels, image_digests,
                                      image_generators, pgd, to_pixels)

# reduced over processes by the callback's own all-reduce (CorrectCounts): global already
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('test/robust/")

Attack = Literal["fgsm", "pgd"]
Corruption = Literal["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                     "gaussian_blur", "contrast", "jpeg_compression"]
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "contrast",
                       "jpeg_compression")


class RobustnessEvaluation(Callback):
    """Adversarial (FGSM, PGD) and corruption accuracy on the test set, in pixel space.

    On every test batch (read by the module's ``unpack_batch``, or as ``(images, labels)`` for
    a module without it) the images are un-normalized with the data module's ``mean`` / ``std``
    (``[0, 1]`` assumed when it has none; a warning says so), attacked or corrupted, clamped to
    ``[0, 1]`` and normalized again. Attacks maximize ``CE(scores / attack_temperature, y)``
    through the model's own prediction scores (cosines for HUG; see ``hug_lightning.robustness``)
    with input gradients only, in eval mode. Accuracies are summed in a torchmetrics state
    (exact under DDP) and logged as ``test/robust/clean`` (equals ``test/acc`` when
    ``max_batches`` is None), ``test/robust/<attack>_eps<k>`` (``k = eps * 255``),
    ``test/robust/<corruption>_s<severity>`` and ``test/robust/corruption_mean`` (mean over
    corruptions and severities). Random draws are seeded per image by (seed, attack or
    corruption, its content): the same for any number of processes and any eval batch size.

    Args:
        enabled: Turn the evaluation on or off.
        attacks: Attacks to run: ``fgsm`` and/or ``pgd`` (L-infinity).
        eps: Attack radii in pixel units (``8/255`` ...); 0 gives the clean accuracy.
        pgd_steps: Number of PGD steps.
        pgd_step_size: PGD step length (positive, pixel units); ``None``: ``eps / 4``.
        random_start: Start PGD from a uniform point of the eps-ball.
        attack_temperature: ``T`` of the attack loss ``CE(scores / T, y)``; 1 suits logits,
            and for HUG's cosines gives a cosine-margin loss.
        corruptions: CIFAR-10-C corruptions to apply (``hug_lightning.robustness.CORRUPTIONS``).
        severities: Corruption severities, 1-5 (0 is the identity).
        max_batches: Evaluate only the first this many test batches (per process); ``None``:
            all. PGD costs ``pgd_steps`` forward-backward passes per radius and batch.
        seed: Seed of PGD's random start and of the noise corruptions.
        mean: Normalization mean overriding the data module's (``None``: ``datamodule.mean``).
        std: Normalization std overriding the data module's (``None``: ``datamodule.std``).
    """

    def __init__(
        self,
        enabled: bool = True,
        attacks: Sequence[Attack] = ("fgsm", "pgd"),
        eps: Sequence[float] = (2 / 255, 8 / 255),
        pgd_steps: int = 10,
        pgd_step_size: float | None = None,
        random_start: bool = True,
        attack_temperature: float = 1.0,
        corruptions: Sequence[Corruption] = DEFAULT_CORRUPTIONS,
        severities: Sequence[int] = (1, 2, 3, 4, 5),
        max_batches: int | None = None,
        seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        bad = [a for a in attacks if a not in ("fgsm", "pgd")]
        bad += [c for c in corruptions if c not in CORRUPTIONS]
        bad += [e for e in eps if not 0 <= e <= 1] + [s for s in severities if not 0 <= int(s) <= 5]
        if pgd_steps < 1 or attack_temperature <= 0 or (max_batches is not None
                                                        and max_batches < 1):
            bad.append("pgd_steps, attack_temperature and max_batches must be positive")
        if pgd_step_size is not None and not pgd_step_size > 0:
            bad.append(f"pgd_step_size {pgd_step_size} must be positive (or null: eps / 4)")
        if bad:
            raise ValueError(f"RobustnessEvaluation: invalid arguments {bad}; attacks: fgsm, "
                             f"pgd; corruptions: {', '.join(CORRUPTIONS)}; eps in [0, 1] "
                             "(pixel units: 8/255 is 0.0314, not 8); severities 0..5.")
        self.enabled = enabled
        self.attacks, self.eps = list(attacks), [float(e) for e in eps]
        self.pgd_steps, self.pgd_step_size = int(pgd_steps), pgd_step_size
        self.random_start, self.attack_temperature = random_start, float(attack_temperature)
        self.corruptions, self.severities = list(corruptions), [int(s) for s in severities]
        self.max_batches, self.seed = max_batches, int(seed)
        self.mean, self.std = mean, std
        self._norm: tuple[Sequence[float], Sequence[float]] = (mean or (0.0,), std or (1.0,))
        self.keys = ["clean"] + [f"{a}_eps{round(e * 255, 2):g}"  # 0.00784 -> eps2
                                 for a in self.attacks for e in self.eps]
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"robust.eps {self.eps} name the same budget twice in units of "
                             "1/255 (two decimals): give distinct values.")
        self.corruption_keys = [f"{c}_s{s}" for c in self.corruptions for s in self.severities]
        self.counts = CorrectCounts(len(self.keys) + len(self.corruption_keys))

    # ------------------------------------------------------------------ normalization
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        mean = self.mean if self.mean is not None else getattr(dm, "mean", None)
        std = self.std if self.std is not None else getattr(dm, "std", None)
        if mean is None or std is None:
            if self.enabled and stage == "test":
                rank_zero_warn("RobustnessEvaluation: the data module has no mean/std "
                               "attributes; assuming the inputs are pixels in [0, 1].")
            mean, std = (0.0,), (1.0,)
        self._norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        size = getattr(dm, "image_size", 32)
        if self.enabled and stage == "test" and self.corruptions and int(size) > 32:
            rank_zero_warn(f"RobustnessEvaluation: the corruption severities are CIFAR-10-C's; "
                           f"on {size}-pixel images they are milder than ImageNet-C's, so "
                           "test/robust/*_s<k> are not comparable to ImageNet-C figures.")

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized inputs -> pixel images in ``[0, 1]`` (float32)."""
        return to_pixels(x, *self._norm)

    def from_pixels(self, p: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Pixel images -> the normalized inputs the model expects (in ``dtype``)."""
        return from_pixels(p, *self._norm, dtype=dtype)

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _forward(trainer: Trainer | None, pl_module: LightningModule, x: Tensor) -> Tensor:
        context = trainer.precision_plugin.forward_context() if trainer else nullcontext()
        with context:
            return pl_module(x)

    def adversarial(self, pl_module: LightningModule, x: Tensor, y: Tensor, attack: str,
                    eps: float, generator: Generators = None,
                    trainer: Trainer | None = None) -> Tensor:
        """Attacked version of the normalized batch ``x`` (normalized, same dtype as ``x``; a
        half-precision batch is rounded toward ``x``, so the eps-ball holds after the cast)."""
        def fn(pixels: Tensor) -> Tensor:  # half-precision x: rounded toward x, in the ball
            return self._forward(trainer, pl_module, cast_toward(self.from_pixels(pixels), x))

        # attacks run in eval mode (BatchNorm untouched); every submodule's own mode is put
        # back after, so a frozen (eval-mode) part of a training model stays frozen
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the attacks clone x, y
                p, t = self.to_pixels(x.detach().clone()), self.attack_temperature
                if attack == "fgsm":
                    adv = fgsm(fn, p, y, eps, temperature=t)
                else:
                    adv = pgd(fn, p, y, eps, self.pgd_steps, self.pgd_step_size,
                              self.random_start, generator, temperature=t)
                return cast_toward(self.from_pixels(adv), x)  # what fn judged (early stop)
        finally:
            for module, training in modes:
                module.training = training

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.counts = self.counts.to(pl_module.device)  # the model is on its device by now
        self.counts.reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx: int = 0) -> None:
        if not self.enabled or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        x, y = unpack_batch_of(pl_module, batch, "RobustnessEvaluation")
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"RobustnessEvaluation needs image batches (B, C, H, W) of floats, "
                             f"got {x.dtype} {tuple(x.shape)} (features or sample indices, as "
                             "the UFM's?): turn it off with --robust.enabled false.")
        if any(len(v) not in (1, x.shape[1]) for v in self._norm):
            raise ValueError(f"RobustnessEvaluation: mean {self._norm[0]} and std "
                             f"{self._norm[1]} do not fit {x.shape[1]}-channel images: give "
                             f"--robust.mean and --robust.std one or {x.shape[1]} values.")
        with torch.no_grad():
            has_logits = isinstance(outputs, dict) and "logits" in outputs
            scores = [outputs["logits"] if has_logits else self._forward(trainer, pl_module, x)]
            pixels = self.to_pixels(x)
            digests = image_digests(pixels)  # once per batch: every tag's draws are keyed on it
            for attack in self.attacks:
                for eps in self.eps:
                    gen = (image_generators(digests, self.seed, f"{attack}/{eps!r}")
                           if attack == "pgd" and self.random_start else None)
                    adv = self.adversarial(pl_module, x, y, attack, eps, gen, trainer)
                    scores.append(self._forward(trainer, pl_module, adv))
            for name in self.corruptions:
                for sev in self.severities:
                    gen = (image_generators(digests, self.seed, f"{name}/{sev}")
                           if name in NOISE_CORRUPTIONS else None)
                    xc = self.from_pixels(corrupt(pixels, name, sev, generator=gen), x.dtype)
                    scores.append(self._forward(trainer, pl_module, xc))
        correct = torch.stack([(s.argmax(-1) == y).sum() for s in scores])
        self.counts.update(correct, int(y.shape[0]))

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        acc = self.counts.compute().float()  # over all processes (a collective)
        if torch.isnan(acc).all():  # no batch evaluated anywhere (e.g. limit_test_batches 0)
            rank_zero_warn("RobustnessEvaluation: no test batch was evaluated; nothing logged.")
            self.counts.reset()
            return
        n = len(self.keys)
        for key, value in zip(self.keys + self.corruption_keys, acc):
            pl_module.log(f"test/robust/{key}", value, sync_dist=False)
        severities = [sev for _ in self.corruptions for sev in self.severities]
        corrupted = [i for i, sev in enumerate(severities) if sev > 0]  # 0: the clean image
        if corrupted:
            pl_module.log("test/robust/corruption_mean", acc[n:][corrupted].mean(),
                          sync_dist=False)
        self.counts.reset()


__all__ = ["CalibrationMonitor", "RobustnessEvaluation"]
