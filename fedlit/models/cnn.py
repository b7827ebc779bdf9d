"""The LeNet-style CNN of FedMR (Hu et al., KDD 2024) and of many FL baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.models.init import Init, check_init
from fedlit.models.layers import Layer, layers_from_modules


class CNN(nn.Module):
    """conv-ReLU-pool twice, then three linear layers; no normalisation.

    With the defaults on 3x32x32 this is FedMR's CNN: conv 3->6 5x5, conv 6->16 5x5,
    fc 400-120-84-C. The flatten size is computed from `input_shape`, so the same class serves
    MNIST (1x28x28 -> 16*4*4). On 8x8 inputs (sklearn digits) the default `padding=0` leaves
    nothing after the second pool; `padding=2` makes each 5x5 conv keep the spatial size,
    so only the pools shrink it (8 -> 4 -> 2) and the net works.

    Layer map: one layer per conv or linear module: conv1, conv2, fc1, fc2, fc3.
    `features(x)` is the 84-d (`hidden[-1]`) output of fc2 after its ReLU.

    `init="official"` is PyTorch's default init: FedMR's code (models/Nets.py, CNNCifar) runs
    no init loop of its own.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (3, 32, 32),
        channels: tuple[int, int] = (6, 16),
        hidden: tuple[int, int] = (120, 84),
        kernel_size: int = 5,
        padding: int = 0,
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        check_init("CNN", init)
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs an image input_shape (C, H, W), got {input_shape}")
        in_channels, height, width = input_shape
        for _ in range(2):
            height = (height + 2 * padding - kernel_size + 1) // 2
            width = (width + 2 * padding - kernel_size + 1) // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"input_shape {tuple(input_shape)} is too small for CNN with kernel_size="
                f"{kernel_size}, padding={padding}: nothing is left after the second pool "
                f"(try padding={kernel_size // 2})"
            )
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(channels[0], channels[1], kernel_size, padding=padding)
        self.fc1 = nn.Linear(channels[1] * height * width, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)
        self.feature_dim = hidden[1]

    def features(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return F.relu(self.fc2(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(self.features(x))

    def layer_map(self) -> list[Layer]:
        names = ["conv1", "conv2", "fc1", "fc2", "fc3"]
        return layers_from_modules(self, [(name, [name]) for name in names])
