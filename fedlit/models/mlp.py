"""Fully connected network for vector data, e.g. FedProx's Synthetic(alpha, beta) tasks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedlit.models.layers import Layer, layers_from_modules


class MLP(nn.Module):
    """Linear layers with ReLU in between; `hidden=()` is multinomial logistic regression,
    the model FedProx (Li et al., MLSys 2020) uses on its Synthetic data (60-d inputs).

    Inputs of any shape are flattened, so `input_shape=(1, 28, 28)` gives an MNIST MLP.
    Layer map: one layer per linear module, fc1..fcN with fcN the classifier.
    `features(x)` is the input of the classifier: the last hidden activation, or the flattened
    input itself when there is no hidden layer.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, ...] = (60,),
        hidden: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        widths = [math.prod(input_shape), *hidden, num_classes]
        self._names = [f"fc{i}" for i in range(1, len(widths))]
        for i, name in enumerate(self._names):
            self.add_module(name, nn.Linear(widths[i], widths[i + 1]))
        self.feature_dim = widths[-2]

    def features(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        for name in self._names[:-1]:
            x = torch.relu(self.get_submodule(name)(x))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.get_submodule(self._names[-1])(self.features(x))

    def layer_map(self) -> list[Layer]:
        return layers_from_modules(self, [(name, [name]) for name in self._names])
