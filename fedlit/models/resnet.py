"""Residual networks of the FL papers fedlit reproduces: ResNet-8, ResNet-18 and ResNet-20.

All three pool globally before the classifier, so they run on any input of at least 8x8.
Layer names follow the module paths (`s2.conv1` is `self.s2.conv1` plus `self.s2.bn1`), with
the blocks of a stage named `b0`, `b1`, ...
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.models.init import Init, check_init, kaiming_fan_out
from fedlit.models.layers import Layer, layers_from_modules


def _image_channels(model: str, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs an image input_shape (C, H, W), got {input_shape}")
    return input_shape[0]


class BasicBlock(nn.Module):
    """Post-activation residual block: two 3x3 conv+BN, plus a 1x1 conv+BN projection shortcut
    when the shape changes.

    The shortcut runs after conv2 so that module execution order matches the layer map
    (conv1, conv2, downsample); the arithmetic is the usual ResNet block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)

    def layer_groups(self, path: str) -> list[tuple[str, list[str]]]:
        """Groups for `layers_from_modules`; `path` is this block's module path in the model."""
        groups = [
            (f"{path}.conv1", [f"{path}.conv1", f"{path}.bn1"]),
            (f"{path}.conv2", [f"{path}.conv2", f"{path}.bn2"]),
        ]
        if self.downsample is not None:
            groups.append((f"{path}.downsample", [f"{path}.downsample"]))
        return groups


def _imagenet_stem(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            bn=nn.BatchNorm2d(64),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        )
    )


class ResNet8(nn.Module):
    """FedPart's ResNet-8 (Wang et al., NeurIPS 2024): ImageNet-style stem, one BasicBlock per
    stage at widths 64/128/256, global average pool, fc.

    10 layers in forward order: stem, s1.conv1, s1.conv2, s2.conv1, s2.conv2, s2.downsample,
    s3.conv1, s3.conv2, s3.downsample, fc; each conv layer holds its BN (affine parameters and
    running statistics). `features(x)` is the 256-d pooled output of stage 3.

    `init="official"`: the init loop of the Fling ResNet FedPart's code uses
    (fling/model/resnet.py): convs He normal fan-out for ReLU, BN weight 1 and bias 0, the
    linear classifier PyTorch's default.
    """

    def __init__(
        self, num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32), init: Init = "pytorch"
    ) -> None:
        super().__init__()
        check_init("ResNet8", init)
        self.stem = _imagenet_stem(_image_channels("ResNet8", input_shape))
        self.s1 = BasicBlock(64, 64, stride=1)
        self.s2 = BasicBlock(64, 128, stride=2)
        self.s3 = BasicBlock(128, 256, stride=2)
        self.fc = nn.Linear(256, num_classes)
        self.feature_dim = 256
        if init == "official":
            kaiming_fan_out(self)

    def features(self, x: Tensor) -> Tensor:
        x = self.s3(self.s2(self.s1(self.stem(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_map(self) -> list[Layer]:
        groups = [("stem", ["stem"])]
        for stage, block in (("s1", self.s1), ("s2", self.s2), ("s3", self.s3)):
            groups.extend(block.layer_groups(stage))
        groups.append(("fc", ["fc"]))
        return layers_from_modules(self, groups)


class ResNet18(nn.Module):
    """ResNet-18: BasicBlocks [2, 2, 2, 2] at widths 64/128/256/512, global average pool, fc.

    `stem="cifar"` is the usual small-image stem (3x3 conv, stride 1, no max pool);
    `stem="imagenet"` is the original 7x7 stride-2 conv with a max pool.
    21 layers in forward order: stem; for each block `s{i}.b{j}.conv1`, `s{i}.b{j}.conv2` and,
    for the first block of stages 2-4, `s{i}.b0.downsample`; fc. `features(x)` is 512-d.

    `init="official"`: the Fling ResNet's init loop, as for ResNet8.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (3, 32, 32),
        stem: Literal["cifar", "imagenet"] = "cifar",
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        check_init("ResNet18", init)
        in_channels = _image_channels("ResNet18", input_shape)
        if stem == "cifar":
            self.stem = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
                    bn=nn.BatchNorm2d(64),
                    relu=nn.ReLU(inplace=True),
                )
            )
        elif stem == "imagenet":
            self.stem = _imagenet_stem(in_channels)
        else:
            raise ValueError(f"ResNet18 stem must be 'cifar' or 'imagenet', got {stem!r}")
        widths = (64, 128, 256, 512)
        previous = 64
        for index, width in enumerate(widths, start=1):
            stride = 1 if index == 1 else 2
            blocks = OrderedDict(
                b0=BasicBlock(previous, width, stride), b1=BasicBlock(width, width, 1)
            )
            self.add_module(f"s{index}", nn.Sequential(blocks))
            previous = width
        self.fc = nn.Linear(512, num_classes)
        self.feature_dim = 512
        if init == "official":
            kaiming_fan_out(self)

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in ("s1", "s2", "s3", "s4"):
            x = self.get_submodule(stage)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_map(self) -> list[Layer]:
        groups = [("stem", ["stem"])]
        for stage in ("s1", "s2", "s3", "s4"):
            for block_name, block in self.get_submodule(stage).named_children():
                groups.extend(block.layer_groups(f"{stage}.{block_name}"))
        groups.append(("fc", ["fc"]))
        return layers_from_modules(self, groups)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck as in FedMR's official code: BN-ReLU-conv 1x1, BN-ReLU-conv 3x3
    (carries the stride), BN-ReLU-conv 1x1 to `4 * planes`; the projection shortcut is a bare
    1x1 conv (no BN) applied to the block input before any normalisation.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return out + shortcut

    def layer_groups(self, path: str) -> list[tuple[str, list[str]]]:
        groups = [(f"{path}.conv{i}", [f"{path}.bn{i}", f"{path}.conv{i}"]) for i in (1, 2, 3)]
        if self.shortcut is not None:
            groups.append((f"{path}.shortcut", [f"{path}.shortcut"]))
        return groups


class ResNet20(nn.Module):
    """FedMR's ResNet-20 (Hu et al., KDD 2024): 3x3 stem conv to 16 channels, pre-activation
    bottlenecks [2, 2, 2] at widths 16/32/64 with expansion 4, then BN-ReLU, global average
    pool and fc on 256-d features.

    Layer grouping (23 layers for the defaults), one conv or linear weight per layer:
    - `stem`: the stem conv alone (it has no BN of its own; the BN after it is the
      pre-activation of the first block and goes with the conv it feeds);
    - `s{i}.b{j}.conv{k}`: the pre-activation BN `bn{k}` together with the conv `conv{k}` it feeds;
    - `s{i}.b0.shortcut`: the bare 1x1 projection conv of every block whose shape changes
      (the first block of each stage), its own layer;
    - `fc`: the final BN (whose ReLU-pooled output feeds fc) together with the classifier.
    Because the final BN belongs to layer `fc`, `features(x)` depends on that layer too.

    Departures from the official code: the final BN-ReLU is applied (the official code builds
    it but never calls it); pooling is adaptive (official: AvgPool2d(8)) so input sizes other
    than 32x32 work.

    `init="official"`: the official code's init loop (models/Nets.py, ResNet_cifar): convs
    N(0, sqrt(2 / (k * k * C_out))) (He normal, fan-out), BN weight 0.5 and bias 0, the linear
    classifier PyTorch's default. The default "pytorch" keeps torch's own init.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (3, 32, 32),
        widths: tuple[int, ...] = (16, 32, 64),
        blocks: tuple[int, ...] = (2, 2, 2),
        init: Init = "pytorch",
    ) -> None:
        super().__init__()
        check_init("ResNet20", init)
        if len(widths) != len(blocks):
            raise ValueError(f"ResNet20 widths {widths} and blocks {blocks} differ in length")
        in_channels = _image_channels("ResNet20", input_shape)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        previous = widths[0]
        self.stages: list[str] = []
        for index, (planes, count) in enumerate(zip(widths, blocks, strict=True), start=1):
            stage: OrderedDict[str, nn.Module] = OrderedDict()
            for b in range(count):
                stride = 2 if index > 1 and b == 0 else 1
                stage[f"b{b}"] = PreActBottleneck(previous, planes, stride)
                previous = planes * PreActBottleneck.expansion
            self.add_module(f"s{index}", nn.Sequential(stage))
            self.stages.append(f"s{index}")
        self.final_bn = nn.BatchNorm2d(previous)
        self.fc = nn.Linear(previous, num_classes)
        self.feature_dim = previous
        if init == "official":
            kaiming_fan_out(self, bn_weight=0.5)

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = self.get_submodule(stage)(x)
        x = F.relu(self.final_bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def layer_map(self) -> list[Layer]:
        groups = [("stem", ["stem"])]
        for stage in self.stages:
            for block_name, block in self.get_submodule(stage).named_children():
                groups.extend(block.layer_groups(f"{stage}.{block_name}"))
        groups.append(("fc", ["final_bn", "fc"]))
        return layers_from_modules(self, groups)
