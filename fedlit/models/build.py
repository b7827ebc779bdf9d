"""Building any `nn.Module` a config names: the arguments fedlit knows are passed by name.

A config's `model` is a `class_path` (an `nn.Module` subclass, or a function returning one, such
as `torchvision.models.resnet18`) and `init_args`. The data decide two values, which the
constructor receives when its signature names them: `num_classes` and `input_shape` (C, H, W for
images, (D,) for vectors). A builder that forwards `**kwargs` (torchvision's) receives
`num_classes` through them. Everything else comes from `init_args`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedlit.imports import import_path

DATA_ARGUMENTS = ("num_classes", "input_shape")
MODEL_FACTORY_MARK = "__fedlit_model_factory__"  # set by model_factory, read by fedlit.kinds


def model_factory(function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark a function without a `-> nn.Module` annotation as a model builder a config may
    name: `model` accepts nn.Module subclasses and functions that say they build one, so that a
    config never calls an arbitrary function such as `os.system` (fedlit.kinds)."""
    setattr(function, MODEL_FACTORY_MARK, True)
    return function


def data_arguments(target: Callable[..., Any], num_classes: int, input_shape: tuple[int, ...]):
    """The data-decided arguments `target`'s signature takes, by name."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin without a signature: nothing is passed
        return {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    arguments: dict[str, Any] = {}
    if "num_classes" in parameters or takes_kwargs:
        arguments["num_classes"] = num_classes
    if "input_shape" in parameters:
        arguments["input_shape"] = tuple(input_shape)
    return arguments


@dataclass
class ModelSpec:
    """A config's model, built once the data say how many classes and what input shape."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def __call__(self, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        target = import_path(self.class_path, "model.class_path")
        arguments = {**self.init_args, **data_arguments(target, num_classes, input_shape)}
        model = target(**arguments)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model.class_path {self.class_path} built a {type(model).__name__}, not a "
                "torch.nn.Module"
            )
        return model
