"""Weight initialisations of the papers' official code, as options of the models.

Every model takes `init`: "pytorch" (the default: each module's own reset_parameters) or
"official" (what the official code of the paper the model comes from does after building it).
The draws come from the same seeded generator as the model's construction, so a run stays a
function of its seed.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

Init = Literal["pytorch", "official"]
INITS = ("pytorch", "official")


def check_init(model: str, init: str) -> None:
    if init not in INITS:
        raise ValueError(f"{model}: model init must be one of {list(INITS)}, got {init!r}")


def kaiming_fan_out(
    model: nn.Module, bn_weight: float = 1.0, linear_std: float | None = None
) -> None:
    """Convolutions: He normal in fan-out mode for ReLU (std sqrt(2 / (k * k * C_out))), bias 0;
    BatchNorm: weight `bn_weight`, bias 0; linear layers: N(0, linear_std) with bias 0 when
    `linear_std` is given, PyTorch's default otherwise."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, _BatchNorm) and module.affine:
            nn.init.constant_(module.weight, bn_weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
