"""Any nn.Module is a model: built with the arguments its signature names; a layer map derived
from the module tree when the model declares none."""

from functools import partial

import pytest
import torch
from torch import nn

from fedlit.models import CNN, ResNet8
from fedlit.models.build import ModelSpec
from fedlit.models.layers import ROOT, check_layer_map, default_layer_map, layer_map_of
from runs import TinyMLP


def test_constructors_get_the_data_arguments_their_signatures_name():
    tiny = ModelSpec("runs.TinyMLP", {"in_features": 48})(10, (3, 4, 4))
    assert tiny.head.out_features == 10 and tiny.body[1].in_features == 48
    cnn = ModelSpec("fedlit.models.CNN", {"padding": 2})(7, (1, 8, 8))
    assert isinstance(cnn, CNN) and cnn.fc3.out_features == 7 and cnn.conv1.in_channels == 1
    # torchvision's builders take **kwargs and forward num_classes to the class
    resnet = ModelSpec("torchvision.models.resnet18")(5, (3, 32, 32))
    assert resnet.fc.out_features == 5
    with pytest.raises(ValueError, match=r"built a .*, not a torch.nn.Module"):
        ModelSpec("builtins.dict")(5, (3, 32, 32))
    with pytest.raises(ValueError, match="model.class_path: cannot import 'nowhere.Model'"):
        ModelSpec("nowhere.Model")(5, (3, 32, 32))


def test_the_default_layer_map_joins_each_norm_to_the_weight_layer_before_it():
    layers = default_layer_map(TinyMLP(3, 8))
    assert [layer.name for layer in layers] == ["body.1", "head"]
    assert layers[0].params == ("body.1.weight", "body.1.bias", "body.2.weight", "body.2.bias")
    assert layers[0].buffers == (
        "body.2.running_mean", "body.2.running_var", "body.2.num_batches_tracked",
    )  # fmt: skip


def test_torchvision_resnet18_gets_fedparts_21_layers():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    layers = default_layer_map(model)
    check_layer_map(model, layers)
    names = [layer.name for layer in layers]
    assert len(names) == 21 and names[0] == "conv1" and names[-1] == "fc"
    assert "layer2.0.downsample.0" in names and "layer1.0.bn1.weight" in layers[1].params


class Owner(nn.Module):
    """Tensors on the root module, a tied weight, a LayerNorm first, a GroupNorm after a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4))
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.group = nn.GroupNorm(1, 2)
        self.embed = nn.Linear(4, 4)
        self.unembed = nn.Linear(4, 4)
        self.unembed.weight = self.embed.weight  # tied: belongs to the first owner
        self.register_buffer("scale", torch.ones(1))


def test_the_rule_covers_root_tensors_tied_weights_and_every_norm():
    model = Owner()
    layers = default_layer_map(model)
    check_layer_map(model, layers)
    assert [layer.name for layer in layers] == [ROOT, "norm", "conv", "embed", "unembed"]
    assert layers[0].params == ("token",) and layers[0].buffers == ("scale",)
    assert layers[2].params == ("conv.weight", "conv.bias", "group.weight", "group.bias")
    assert layers[4].params == ("unembed.bias",)


@pytest.mark.parametrize("make", [partial(CNN, 10, (3, 32, 32)), partial(ResNet8, 10, (3, 32, 32))])
def test_declared_layer_maps_are_kept(make):
    model = make()
    assert layer_map_of(model) == model.layer_map()
