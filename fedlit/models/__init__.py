"""Model zoo: every model takes `(num_classes, input_shape, **knobs)`, returns logits, exposes
`features(x)` (the classifier's input) and `layer_map()` (named layers, shallow to deep)."""

from fedlit.models.cnn import CNN
from fedlit.models.layers import Layer, check_layer_map, layers_from_modules
from fedlit.models.mlp import MLP
from fedlit.models.resnet import ResNet8, ResNet18, ResNet20
from fedlit.models.vgg import VGG11, VGG16

__all__ = [
    "CNN",
    "MLP",
    "VGG11",
    "VGG16",
    "Layer",
    "ResNet8",
    "ResNet18",
    "ResNet20",
    "check_layer_map",
    "layers_from_modules",
]
