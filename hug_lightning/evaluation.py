"""Robustness (adversarial / corruption accuracy) and calibration (ECE, temperature) callbacks.

Ordinary Lightning callbacks, selectable from YAML or the command line, e.g.
``--trainer.callbacks+ '{"class_path": "hug_lightning.evaluation.RobustnessEvaluation",
"init_args": {"max_batches": 20}}'``. :class:`RobustnessEvaluation` runs in the test stage;
:class:`CalibrationMonitor` fits the temperature every validation epoch, logs ECE / NLL.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from hug_lightning import calibration as cal
from hug_lightning.robustness import (CORRUPTIONS, NOISE_CORRUPTIONS, CorrectCounts, Generators,
                                      corrupt, fgsm, from_pixels, image_generators, pgd,
                                      to_pixels)

# reduced over processes by their own collectors (all-gather / all-reduce): global already
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\("
                        r"'(test/robust/|(val|test)/(ece|ece_raw|nll|temperature)')")

Attack = Literal["fgsm", "pgd"]
Corruption = Literal["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                     "gaussian_blur", "contrast", "jpeg_compression"]
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "defocus_blur", "contrast",
                       "jpeg_compression")


class RobustnessEvaluation(Callback):
    """Adversarial (FGSM, PGD) and corruption accuracy on the test set, in pixel space.

    On every test batch the images are un-normalized with the data module's ``mean`` / ``std``
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
        pgd_step_size: PGD step length; ``None``: ``eps / 4``.
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
        """Attacked version of the normalized batch ``x`` (normalized, same dtype as ``x``)."""
        def fn(pixels: Tensor) -> Tensor:
            return self._forward(trainer, pl_module, self.from_pixels(pixels, x.dtype))

        was_training = pl_module.training  # attacks run in eval mode: BatchNorm untouched
        pl_module.eval()
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the attacks clone x, y
                p, t = self.to_pixels(x.detach().clone()), self.attack_temperature
                if attack == "fgsm":
                    adv = fgsm(fn, p, y, eps, temperature=t)
                else:
                    adv = pgd(fn, p, y, eps, self.pgd_steps, self.pgd_step_size,
                              self.random_start, generator, temperature=t)
                return self.from_pixels(adv, x.dtype)
        finally:
            pl_module.train(was_training)

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.counts = self.counts.to(pl_module.device)  # the model is on its device by now
        self.counts.reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx: int = 0) -> None:
        if not self.enabled or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        x, y = batch[0], batch[1]
        with torch.no_grad():
            has_logits = isinstance(outputs, dict) and "logits" in outputs
            scores = [outputs["logits"] if has_logits else self._forward(trainer, pl_module, x)]
            pixels = self.to_pixels(x)
            for attack in self.attacks:
                for eps in self.eps:
                    gen = (image_generators(pixels, self.seed, f"{attack}/{eps!r}")
                           if attack == "pgd" and self.random_start else None)
                    adv = self.adversarial(pl_module, x, y, attack, eps, gen, trainer)
                    scores.append(self._forward(trainer, pl_module, adv))
            for name in self.corruptions:
                for sev in self.severities:
                    gen = (image_generators(pixels, self.seed, f"{name}/{sev}")
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


class CalibrationMonitor(Callback):
    """Fit the softmax temperature on validation scores; log ECE and NLL at validation and test.

    Each validation epoch (not the sanity check) the scores and labels of every batch are kept
    on the CPU; under DDP they are gathered from all processes at the epoch end (padded
    ``all_gather``, exact for uneven shards), so every process fits the same ``T`` on the whole
    validation set (:func:`hug_lightning.calibration.fit_temperature`, deterministic). Logged:
    ``val/temperature``, ``val/ece`` and ``val/nll`` (with that ``T``; optimistic, since ``T`` is
    fitted on the same data), ``val/ece_raw`` (``T = 1``); at test ``test/ece`` and ``test/nll``
    with the stored ``T``, ``test/ece_raw`` and ``test/temperature``. ``T`` is part of the
    callback's ``state_dict``, so it is saved in checkpoints and restored by ``test --ckpt_path``.
    Probabilities are ``softmax(scores / T)``; see ``hug_lightning.calibration``.

    Args:
        enabled: Turn the monitor on or off.
        fit_temperature: Fit ``T`` by minimizing the validation NLL (needed for HUG, whose
            cosine scores give nearly uniform probabilities at ``T = 1``; for cross-entropy it is
            post-hoc temperature scaling). ``False`` keeps ``temperature`` fixed.
        temperature: ``T`` used before any fit, or always when ``fit_temperature`` is false.
        n_bins: Number of equal-width confidence bins of the ECE.
        bounds: Search interval of the fitted ``T``.
    """

    def __init__(self, enabled: bool = True, fit_temperature: bool = True,
                 temperature: float = 1.0, n_bins: int = 15,
                 bounds: tuple[float, float] = (1e-3, 1e3)) -> None:
        super().__init__()
        if temperature <= 0 or n_bins < 1:
            raise ValueError("temperature and n_bins must be positive.")
        self.enabled, self.fit_temperature = enabled, fit_temperature
        self.temperature, self.fitted = float(temperature), False
        #: "test" when T was fitted on a validation set that was the test split (val_split 0)
        self.fitted_on: str | None = None
        self._val_is_test = False
        self.n_bins, self.bounds = int(n_bins), (float(bounds[0]), float(bounds[1]))
        self._logits: list[Tensor] = []
        self._labels: list[Tensor] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        self._val_is_test = getattr(dm, "val_split", None) == 0
        if (self.enabled and self.fit_temperature and self._val_is_test
                and stage in ("fit", "validate")):
            rank_zero_warn("CalibrationMonitor: val_split is 0, so validation runs on the test "
                           "split and the temperature behind test/ece is fitted on the test "
                           "data. Set --data.init_args.val_split (e.g. 0.1) for a held-out "
                           "calibration split.")

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "fitted": self.fitted,
                "fitted_on": self.fitted_on}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.fit_temperature and state_dict.get("fitted", False):
            self.temperature, self.fitted = float(state_dict["temperature"]), True
            self.fitted_on = state_dict.get("fitted_on")

    # ------------------------------------------------------------------ collection
    def _reset(self, *_: Any) -> None:
        self._logits, self._labels = [], []

    def _collect(self, outputs: Any) -> None:
        if isinstance(outputs, dict) and "logits" in outputs and "labels" in outputs:
            self._logits.append(outputs["logits"].detach().float().cpu())
            self._labels.append(outputs["labels"].detach().long().cpu())

    @staticmethod
    def _gather(trainer: Trainer, pl_module: LightningModule, rows: Tensor) -> Tensor:
        """Concatenate ``rows`` of every process (uneven counts: pad, all_gather, trim)."""
        if trainer.world_size == 1:
            return rows
        device = pl_module.device
        sizes = pl_module.all_gather(torch.tensor(rows.shape[0], device=device)).view(-1)
        pad = torch.zeros((int(sizes.max()),) + tuple(rows.shape[1:]), dtype=rows.dtype,
                          device=device)
        pad[: rows.shape[0]] = rows.to(device)
        out = pl_module.all_gather(pad)
        return torch.cat([out[r, : int(n)] for r, n in enumerate(sizes)]).cpu()

    def _finish(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Gather the epoch's scores, fit ``T`` (validation) and log ECE / NLL."""
        k = int(getattr(pl_module, "num_classes", 1))  # shape of an empty shard
        logits = torch.cat(self._logits) if self._logits else torch.zeros(0, k)
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)
        self._reset()
        logits, labels = (self._gather(trainer, pl_module, t) for t in (logits, labels))
        if logits.shape[0] == 0:
            return
        if stage == "val" and self.fit_temperature:
            self.temperature = cal.fit_temperature(logits, labels, self.bounds)
            self.fitted, self.fitted_on = True, "test" if self._val_is_test else "val"
            low, high = self.bounds
            if not low * 1.05 < self.temperature < high / 1.05:
                rank_zero_warn(
                    f"CalibrationMonitor: the fitted temperature {self.temperature:.4g} is at "
                    f"its search bound {self.bounds} ({logits.shape[0]} validation samples): "
                    "the validation scores carry no usable confidence (an untrained model, or "
                    "a tiny or perfectly separated validation set), so ECE/NLL with it mean "
                    "little.")
        elif stage == "test" and self.fit_temperature and not self.fitted:
            rank_zero_warn("CalibrationMonitor: no fitted temperature (no validation epoch ran "
                           f"and the checkpoint holds none); test/ece uses T = {self.temperature}.")
        elif stage == "test" and self.fitted_on == "test":
            rank_zero_warn("CalibrationMonitor: this temperature was fitted on the test split "
                           "(the run had val_split 0): test/ece and test/nll are optimistic.")
        t = self.temperature
        for name, value in (
            ("ece", cal.expected_calibration_error(logits, labels, t, self.n_bins)),
            ("ece_raw", cal.expected_calibration_error(logits, labels, 1.0, self.n_bins)),
            ("nll", cal.negative_log_likelihood(logits, labels, t)),
            ("temperature", t),
        ):
            pl_module.log(f"{stage}/{name}", float(value), sync_dist=False)

    # ------------------------------------------------------------------ hooks
    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx: int = 0) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx: int = 0) -> None:
        if self.enabled:
            self._collect(outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled:
            self._finish(trainer, pl_module, "test")


__all__ = ["CalibrationMonitor", "RobustnessEvaluation"]
