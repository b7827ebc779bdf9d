"""VGG networks with BatchNorm: LIPS's 5-conv VGG-11 and FedMR's VGG-16.

Max pools use `ceil_mode=True`. On power-of-two sizes (32x32) this is exactly the usual floor
pooling; on 28x28 (MNIST) it gives 28 -> 14 -> 7 -> 4 -> 2 -> 1 instead of collapsing to 0x0
at the fifth pool, so the same architectures run on every dataset fedlit loads (8x8 included).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fedlit.models.init import Init, check_init, kaiming_fan_out
from fedlit.models.layers import Layer, layers_from_modules

VGG11_LIPS = (64, "M", 128, "M", 256, "M", 512, "M", 512, "M")
VGG11_FULL = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _conv_body(
    name: str, input_shape: tuple[int, ...], cfg: tuple[int | str, ...]
) -> tuple[nn.Sequential, int, int]:
    """3x3 conv+BN+ReLU per int in `cfg`, a 2x2 max pool per "M".

    Returns the body, the number of convs and the flattened size of its output.
    """
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs an image input_shape (C, H, W), got {input_shape}")
    channels, height, width = input_shape
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    convs = pools = 0
    for entry in cfg:
        if entry == "M":
            pools += 1
            modules[f"pool{pools}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
            height, width = (height + 1) // 2, (width + 1) // 2
        elif isinstance(entry, int) and not isinstance(entry, bool) and entry > 0:
            convs += 1
            modules[f"conv{convs}"] = nn.Conv2d(channels, entry, 3, padding=1)
            modules[f"bn{convs}"] = nn.BatchNorm2d(entry)
            modules[f"relu{convs}"] = nn.ReLU(inplace=True)
            channels = entry
        else:
            raise ValueError(f"{name} cfg entries must be positive ints or 'M', got {entry!r}")
    if convs == 0:
        raise ValueError(f"{name} cfg has no conv layer: {cfg}")
    return nn.Sequential(modules), convs, channels * height * width


def _conv_groups(convs: int) -> list[tuple[str, list[str]]]:
    return [(f"conv{i}", [f"body.conv{i}", f"body.bn{i}"]) for i in range(1, convs + 1)]


class VGG11(nn.Module):
    """VGG with BN and a single linear classifier on the flattened conv output.

    The default `cfg` is LIPS's 5-conv "VGG-11" (Xiao et al., 2025): 64-M-128-M-256-M-512-M-512-M
    then Linear(512 * h * w, C), i.e. Linear(512, C) on 32x32. `cfg=VGG11_FULL` gives the
    8-conv VGG-11 of Simonyan & Zisserman with the same single-linear head.

    Layer map: conv1..convN (each conv with its BN), then fc. `features(x)` is the flattened
    conv output (512 * h * w).

    `init="official"`: the init loop of the VGG in LIPS's code (fling/model/vgg.py): convs He
    normal fan-out for ReLU with bias 0, BN weight 1 and bias 0, linear N(0, 0.01) with bias 0.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (3, 32, 32),
        cfg: tuple[int | str, ...] = VGG11_LIPS,
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        check_init("VGG11", init)
        self.body, self._convs, flat = _conv_body("VGG11", input_shape, tuple(cfg))
        self.fc = nn.Linear(flat, num_classes)
        self.feature_dim = flat
        if init == "official":
            kaiming_fan_out(self, linear_std=0.01)

    def features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.body(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_map(self) -> list[Layer]:
        return layers_from_modules(self, [*_conv_groups(self._convs), ("fc", ["fc"])])


class VGG16(nn.Module):
    """FedMR's VGG-16 (Hu et al., KDD 2024): 13 conv+BN, then fc1 (512 * h * w -> hidden),
    fc2 (hidden -> hidden), each followed by ReLU and dropout, and fc3 (hidden -> C).

    Layer map: conv1..conv13 (each conv with its BN), fc1, fc2, fc3. `features(x)` is the
    `hidden`-d output of fc2 after its ReLU and dropout, i.e. the input of fc3.

    `init="official"` is PyTorch's default init: FedMR's code (models/Nets.py, VGG16) runs no
    init loop of its own.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (3, 32, 32),
        hidden: int = 4096,
        dropout: float = 0.5,
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        check_init("VGG16", init)
        self.body, self._convs, flat = _conv_body("VGG16", input_shape, VGG16_CFG)
        self.fc1 = nn.Linear(flat, hidden)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def features(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.body(x), 1)
        x = self.drop1(torch.relu(self.fc1(x)))
        return self.drop2(torch.relu(self.fc2(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.features(x))

    def layer_map(self) -> list[Layer]:
        heads = [(name, [name]) for name in ("fc1", "fc2", "fc3")]
        return layers_from_modules(self, [*_conv_groups(self._convs), *heads])
