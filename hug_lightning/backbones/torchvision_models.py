"""Any torchvision classification model, by name, with its classifier removed.

For 224-pixel inputs (ImageNet and its subsets). The final ``nn.Linear`` of the model
(``fc``, ``classifier[-1]``, ``heads.head``, ``head``) is replaced by ``nn.Identity``, so
``forward`` returns the penultimate features and ``num_features`` is that layer's input width.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision import models


def _strip_classifier(model: nn.Module) -> int:
    """Replace the model's last Linear layer by Identity; return its ``in_features``."""
    for attr in ("fc", "classifier", "heads", "head"):
        sub = getattr(model, attr, None)
        if sub is None:
            continue
        if isinstance(sub, nn.Linear):
            setattr(model, attr, nn.Identity())
            return sub.in_features
        if isinstance(sub, nn.Sequential):
            for idx in reversed(range(len(sub))):
                if isinstance(sub[idx], nn.Linear):
                    width = sub[idx].in_features
                    sub[idx] = nn.Identity()
                    return width
    raise ValueError(
        f"TorchvisionBackbone: cannot find the final Linear classifier of {type(model).__name__} "
        "(looked at .fc, .classifier, .heads, .head). Wrap the model yourself and give it a "
        "`num_features` attribute."
    )


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model by name, returning penultimate features.

    Args:
        name: A name from ``torchvision.models.list_models(module=torchvision.models)``,
            for example ``resnet18``, ``resnet50``, ``convnext_tiny``, ``vit_b_16``.
        weights: Pretrained weights name (``DEFAULT``, ``IMAGENET1K_V1``, ...) or ``None``
            for random initialisation. Pretrained weights are downloaded by torchvision into
            ``$TORCH_HOME``; offline, copy the file there first.
    """

    def __init__(self, name: str = "resnet50", weights: str | None = None) -> None:
        super().__init__()
        available = models.list_models(module=models)
        if name not in available:
            raise ValueError(
                f"TorchvisionBackbone: unknown model name {name!r}. Choose one of "
                f"torchvision's classification models, e.g. {', '.join(available[:12])}, ..."
            )
        if name.startswith("squeezenet"):  # its classifier is a 1x1 convolution, not a Linear
            raise ValueError(f"TorchvisionBackbone: {name} ends in a convolution, not a Linear "
                             "classifier; wrap it yourself with a `num_features` attribute.")
        if weights is not None:
            known = [w.name for w in models.get_model_weights(name)]
            if weights not in known + ["DEFAULT"]:
                raise ValueError(f"TorchvisionBackbone: {name} has no weights {weights!r}; "
                                 f"choose DEFAULT, {', '.join(known)} or null (random init).")
        # no auxiliary classifiers: they would hold parameters no loss reaches (DDP rejects
        # those) and make training-mode outputs tuples
        extra = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        try:
            self.model = models.get_model(name, weights=weights, **extra)
        except (OSError, RuntimeError) as err:  # download failures surface as URLError/OSError
            raise RuntimeError(
                f"TorchvisionBackbone: could not load weights {weights!r} for {name!r} ({err}). "
                "Offline, place the weight file in $TORCH_HOME/hub/checkpoints or set weights: "
                "null."
            ) from err
        self.name = name
        self.num_features: int = _strip_classifier(self.model)

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        # GoogLeNet / Inception v3 return (logits, aux...) named tuples in training mode; with
        # the classifier stripped, `.logits` holds the main branch's features
        return out.logits if hasattr(out, "logits") else out
