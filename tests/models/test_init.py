"""The official codes' initialisations (`init: official`) and that the default is unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedlit.models import CNN, VGG11, VGG16, ResNet8, ResNet20

# ---- initialisation ---------------------------------------------------------------------------


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("cls", "bn_weight", "linear_std"),
    [(ResNet8, 1.0, None), (VGG11, 1.0, 0.01), (ResNet20, 0.5, None)],
)
def test_official_init_is_he_fan_out_with_the_papers_bn_and_linear(cls, bn_weight, linear_std):
    torch.manual_seed(0)
    model = cls(10, (3, 32, 32), init="official")
    for weight in conv_weights(model):
        fan_out = weight.shape[0] * weight[0, 0].numel()
        expected = math.sqrt(2.0 / fan_out)
        assert abs(weight.std().item() / expected - 1) < 0.2, weight.shape
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == bn_weight) and torch.all(module.bias == 0)
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            assert torch.all(module.bias == 0)
    fc = model.fc
    if linear_std is None:  # PyTorch's default: uniform within 1/sqrt(fan_in)
        assert fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)
        assert fc.bias.abs().max() > 0
    else:
        assert abs(fc.weight.std().item() / linear_std - 1) < 0.1
        assert torch.all(fc.bias == 0)


@pytest.mark.parametrize("cls", [CNN, VGG11, VGG16, ResNet8, ResNet20])
def test_default_init_is_unchanged(cls):
    torch.manual_seed(3)
    plain = cls(10, (3, 32, 32)).state_dict()
    torch.manual_seed(3)
    named = cls(10, (3, 32, 32), init="pytorch").state_dict()
    assert all(torch.equal(v, named[k]) for k, v in plain.items())
    with pytest.raises(ValueError, match="model init must be one of"):
        cls(10, (3, 32, 32), init="kaiming")


def test_official_init_of_fedmr_models_is_pytorchs():
    for cls in (CNN, VGG16):
        torch.manual_seed(1)
        plain = cls(10, (3, 32, 32)).state_dict()
        torch.manual_seed(1)
        official = cls(10, (3, 32, 32), init="official").state_dict()
        assert all(torch.equal(v, official[k]) for k, v in plain.items())
