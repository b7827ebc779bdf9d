"""Model zoo: shapes on every input size fedlit loads, and layer maps that are complete,
exclusive and in execution order."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedlit.models import (
    CNN,
    MLP,
    VGG11,
    VGG16,
    Layer,
    ResNet8,
    ResNet18,
    ResNet20,
    check_layer_map,
    layers_from_modules,
)
from fedlit.models.vgg import VGG11_FULL
from runs import RESNET8_LAYERS

NUM_CLASSES = 7

# case id -> (builder, input shape, features() dimension)
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "cnn-3x32": (lambda: CNN(NUM_CLASSES), (3, 32, 32), 84),
    "cnn-1x28": (lambda: CNN(NUM_CLASSES, (1, 28, 28)), (1, 28, 28), 84),
    "cnn-1x8-pad2": (lambda: CNN(NUM_CLASSES, (1, 8, 8), padding=2), (1, 8, 8), 84),
    "resnet8-3x32": (lambda: ResNet8(NUM_CLASSES), (3, 32, 32), 256),
    "resnet8-1x28": (lambda: ResNet8(NUM_CLASSES, (1, 28, 28)), (1, 28, 28), 256),
    "resnet8-1x8": (lambda: ResNet8(NUM_CLASSES, (1, 8, 8)), (1, 8, 8), 256),
    "resnet18-3x32": (lambda: ResNet18(NUM_CLASSES), (3, 32, 32), 512),
    "resnet18-1x28": (lambda: ResNet18(NUM_CLASSES, (1, 28, 28)), (1, 28, 28), 512),
    "resnet18-1x8": (lambda: ResNet18(NUM_CLASSES, (1, 8, 8)), (1, 8, 8), 512),
    "resnet18-imagenet-3x32": (
        lambda: ResNet18(NUM_CLASSES, stem="imagenet"),
        (3, 32, 32),
        512,
    ),
    "resnet20-3x32": (lambda: ResNet20(NUM_CLASSES), (3, 32, 32), 256),
    "resnet20-1x28": (lambda: ResNet20(NUM_CLASSES, (1, 28, 28)), (1, 28, 28), 256),
    "resnet20-1x8": (lambda: ResNet20(NUM_CLASSES, (1, 8, 8)), (1, 8, 8), 256),
    "vgg11-3x32": (lambda: VGG11(NUM_CLASSES), (3, 32, 32), 512),
    "vgg11-1x28": (lambda: VGG11(NUM_CLASSES, (1, 28, 28)), (1, 28, 28), 512),
    "vgg11-1x8": (lambda: VGG11(NUM_CLASSES, (1, 8, 8)), (1, 8, 8), 512),
    "vgg11-full-3x32": (lambda: VGG11(NUM_CLASSES, cfg=VGG11_FULL), (3, 32, 32), 512),
    "vgg16-3x32": (lambda: VGG16(NUM_CLASSES), (3, 32, 32), 4096),
    "vgg16-1x28": (lambda: VGG16(NUM_CLASSES, (1, 28, 28), hidden=256), (1, 28, 28), 256),
    "mlp-logreg-60": (lambda: MLP(NUM_CLASSES), (60,), 60),
    "mlp-hidden-60": (lambda: MLP(NUM_CLASSES, hidden=(32, 16)), (60,), 16),
    "mlp-1x28": (lambda: MLP(NUM_CLASSES, (1, 28, 28), hidden=(200,)), (1, 28, 28), 200),
}


@functools.cache
def build(case: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[case][0]()


def batch(case: str) -> torch.Tensor:
    return torch.randn(2, *CASES[case][1], generator=torch.Generator().manual_seed(1))


def classifier(model: nn.Module) -> nn.Linear:
    """The last registered Linear: the classifier in every model of the zoo."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("case", CASES)
def test_logits_and_features_shapes(case: str) -> None:
    model, x, feature_dim = build(case), batch(case), CASES[case][2]
    assert model(x).shape == (2, NUM_CLASSES)
    assert model.features(x).shape == (2, feature_dim)
    assert model.feature_dim == feature_dim
    assert classifier(model).in_features == feature_dim


@pytest.mark.parametrize("case", CASES)
def test_forward_is_classifier_of_features(case: str) -> None:
    model, x = build(case).eval(), batch(case)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(model)(model.features(x)))
    model.train()


@pytest.mark.parametrize("case", CASES)
def test_layer_map_covers_every_tensor_once(case: str) -> None:
    model = build(case)
    layers = model.layer_map()
    check_layer_map(model, layers)
    mapped_params = [n for layer in layers for n in layer.params]
    mapped_buffers = [n for layer in layers for n in layer.buffers]
    assert sorted(mapped_params) == sorted(n for n, _ in model.named_parameters())
    assert sorted(mapped_buffers) == sorted(n for n, _ in model.named_buffers())
    assert all(layer.params for layer in layers), "every layer holds trainable weights"


def layer_execution_order(model: nn.Module, layers: list[Layer], x: torch.Tensor) -> list[int]:
    """Layer index of every tensor-owning module in the order the modules run, with
    consecutive repeats collapsed: a map in forward order yields 0, 1, ..., L-1."""
    layer_of = {name: i for i, layer in enumerate(layers) for name in layer.params + layer.buffers}
    calls: list[int] = []
    handles = []
    for path, module in model.named_modules():
        own = itertools.chain(
            module.named_parameters(recurse=False), module.named_buffers(recurse=False)
        )
        indices = {layer_of[f"{path}.{n}" if path else n] for n, _ in own}
        if indices:
            assert len(indices) == 1, f"module {path!r} is split across layers"
            index = indices.pop()
            handles.append(module.register_forward_hook(lambda *_, i=index: calls.append(i)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [i for i, _ in itertools.groupby(calls)]


@pytest.mark.parametrize("case", CASES)
def test_layer_map_is_in_forward_order(case: str) -> None:
    model = build(case)
    layers = model.layer_map()
    assert layer_execution_order(model, layers, batch(case)) == list(range(len(layers)))


# ../shared/specs/fedpart.md: ResNet-8's 10 layers, shallow to deep (FedPart's schedule order)


def test_resnet8_layers_are_fedparts_ten() -> None:
    layers = build("resnet8-3x32").layer_map()
    assert [layer.name for layer in layers] == RESNET8_LAYERS
    by_name = {layer.name: layer for layer in layers}
    assert by_name["s1.conv1"] == Layer(
        "s1.conv1",
        params=("s1.conv1.weight", "s1.bn1.weight", "s1.bn1.bias"),
        buffers=("s1.bn1.running_mean", "s1.bn1.running_var", "s1.bn1.num_batches_tracked"),
    )
    assert by_name["s2.downsample"].params == (
        "s2.downsample.conv.weight",
        "s2.downsample.bn.weight",
        "s2.downsample.bn.bias",
    )
    assert by_name["fc"] == Layer("fc", params=("fc.weight", "fc.bias"))


@pytest.mark.parametrize("case", ["resnet18-3x32", "resnet18-imagenet-3x32"])
def test_resnet18_has_21_layers(case: str) -> None:
    names = [layer.name for layer in build(case).layer_map()]
    assert len(names) == 21
    assert names[:6] == ["stem", "s1.b0.conv1", "s1.b0.conv2", "s1.b1.conv1", "s1.b1.conv2"] + [
        "s2.b0.conv1"
    ]
    assert [n for n in names if n.endswith("downsample")] == [
        "s2.b0.downsample",
        "s3.b0.downsample",
        "s4.b0.downsample",
    ]
    assert names[-1] == "fc"


def test_resnet20_grouping() -> None:
    layers = build("resnet20-3x32").layer_map()
    by_name = {layer.name: layer for layer in layers}
    # stem + 3 stages x (first block: 3 convs + shortcut, second block: 3 convs) + fc
    assert len(layers) == 1 + 3 * (4 + 3) + 1
    assert by_name["stem"].params == ("stem.weight",)
    assert by_name["s1.b0.conv1"].params == (
        "s1.b0.bn1.weight",
        "s1.b0.bn1.bias",
        "s1.b0.conv1.weight",
    )
    assert by_name["s2.b0.shortcut"].params == ("s2.b0.shortcut.weight",)
    assert "s2.b1.shortcut" not in by_name
    assert by_name["fc"].params == (
        "final_bn.weight",
        "final_bn.bias",
        "fc.weight",
        "fc.bias",
    )


def test_resnet8_parameter_count() -> None:
    # conv k x k, in -> out, no bias: in*out*k*k; BN(c): 2c affine parameters.
    stem = 3 * 64 * 7 * 7 + 2 * 64  # 9_408 + 128 = 9_536
    s1 = 2 * (64 * 64 * 9 + 2 * 64)  # 2 * (36_864 + 128) = 73_984
    s2 = (64 * 128 * 9 + 2 * 128) + (128 * 128 * 9 + 2 * 128) + (64 * 128 + 2 * 128)
    assert s2 == 73_984 + 147_712 + 8_448
    s3 = (128 * 256 * 9 + 2 * 256) + (256 * 256 * 9 + 2 * 256) + (128 * 256 + 2 * 256)
    assert s3 == 295_424 + 590_336 + 33_280
    fc = 256 * 10 + 10  # 2_570
    assert stem + s1 + s2 + s3 + fc == 1_235_274
    model = ResNet8(10)
    assert sum(p.numel() for p in model.parameters()) == 1_235_274


def test_cnn_parameter_count() -> None:
    # 3x32x32 -conv5-> 6x28x28 -pool-> 6x14x14 -conv5-> 16x10x10 -pool-> 16x5x5 = 400
    conv1 = 3 * 6 * 5 * 5 + 6  # 456
    conv2 = 6 * 16 * 5 * 5 + 16  # 2_416
    fc1 = 400 * 120 + 120  # 48_120
    fc2 = 120 * 84 + 84  # 10_164
    fc3 = 84 * 10 + 10  # 850
    assert conv1 + conv2 + fc1 + fc2 + fc3 == 62_006
    assert sum(p.numel() for p in CNN(10).parameters()) == 62_006
    # 1x8x8 with padding=2: 6x8x8 -> 6x4x4 -> 16x4x4 -> 16x2x2 = 64 inputs to fc1
    digits = CNN(10, (1, 8, 8), padding=2)
    assert digits.fc1.in_features == 64


def test_cnn_rejects_inputs_that_vanish() -> None:
    with pytest.raises(ValueError, match=r"too small for CNN.*try padding=2"):
        CNN(10, (1, 8, 8))


def test_check_layer_map_names_a_dropped_layer() -> None:
    model = build("resnet8-3x32")
    layers = [layer for layer in model.layer_map() if layer.name != "s1.conv2"]
    with pytest.raises(ValueError) as info:
        check_layer_map(model, layers)
    message = str(info.value)
    assert "parameter 's1.conv2.weight' is in no layer" in message
    assert "parameter 's1.bn2.bias' is in no layer" in message
    assert "buffer 's1.bn2.running_var' is in no layer" in message
    assert "s1.conv1" not in message


def test_check_layer_map_names_a_duplicated_layer() -> None:
    model = build("cnn-3x32")
    layers = model.layer_map()
    layers.append(Layer("again", params=layers[0].params))
    with pytest.raises(
        ValueError,
        match=re.escape("parameter 'conv1.weight' appears in several layers: 'conv1', 'again'"),
    ):
        check_layer_map(model, layers)


def test_check_layer_map_names_unknown_tensors_and_repeated_layer_names() -> None:
    model = build("cnn-3x32")
    layers = [*model.layer_map(), Layer("fc3", params=("fc4.weight",), buffers=("fc3.bias",))]
    with pytest.raises(ValueError) as info:
        check_layer_map(model, layers)
    message = str(info.value)
    assert "unknown parameter 'fc4.weight'" in message
    assert "unknown buffer 'fc3.bias'" in message
    assert "layer name 'fc3' is used more than once" in message


def test_layers_from_modules_rejects_unknown_module() -> None:
    with pytest.raises(ValueError, match="has no submodule 'conv9'"):
        layers_from_modules(build("cnn-3x32"), [("conv9", ["conv9"])])


def test_bad_knobs_are_rejected() -> None:
    with pytest.raises(ValueError, match="stem must be 'cifar' or 'imagenet'"):
        ResNet18(10, stem="tiny")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cfg entries must be positive ints or 'M'"):
        VGG11(10, cfg=(64, "P"))
    with pytest.raises(ValueError, match=r"image input_shape \(C, H, W\)"):
        ResNet8(10, (60,))
