"""The layer map: a model's parameters and buffers cut into named groups, shallow to deep.

FedPart trains one group at a time, FedMR recombines models group by group, LIPS chooses the
groups it may sparsify and the probes read features at group boundaries. Each model declares its
map once, next to its forward pass, so those methods never have to guess from parameter names.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# Normalisation modules join the weight layer before them in a derived layer map.
NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)
WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
ROOT = "(root)"  # the layer of tensors the model owns directly


@dataclass(frozen=True)
class Layer:
    """One named group of tensors that the FL methods treat as a unit.

    Names are the full dotted names of `model.named_parameters()` / `model.named_buffers()`,
    so a layer can select entries of a state dict without holding a reference to the model.
    """

    name: str
    params: tuple[str, ...]
    buffers: tuple[str, ...] = ()


def layers_from_modules(model: nn.Module, groups: list[tuple[str, list[str]]]) -> list[Layer]:
    """Build a layer map from `(layer name, [module paths])` pairs, in the order given.

    Every parameter and buffer under each listed module (recursively) joins that layer, so a
    conv and its BatchNorm become one layer by naming both modules, BN running statistics and
    `num_batches_tracked` included.
    """
    layers = []
    for name, paths in groups:
        params: list[str] = []
        buffers: list[str] = []
        for path in paths:
            try:
                module = model.get_submodule(path)
            except AttributeError as err:
                raise ValueError(
                    f"layer {name!r}: {type(model).__name__} has no submodule {path!r}"
                ) from err
            prefix = f"{path}." if path else ""
            params.extend(prefix + n for n, _ in module.named_parameters())
            buffers.extend(prefix + n for n, _ in module.named_buffers())
        layers.append(Layer(name=name, params=tuple(params), buffers=tuple(buffers)))
    return layers


def default_layer_map(model: nn.Module) -> list[Layer]:
    """The layer map of a model that declares none, derived from its module tree.

    The rule: one layer per module that owns parameters or buffers directly, named by its module
    path, in the order the modules are registered (the order `__init__` defines them, which is
    the forward order of sequential architectures such as torchvision's ResNet and VGG); a
    normalisation module (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) joins the convolution or
    linear layer just before it, so that "conv + its BN" is one layer as in fedlit's own models.
    Tensors the root module owns directly form a layer named "(root)". A tensor shared by
    several modules belongs to the first. A model whose registration order differs from its
    forward order should define `layer_map()` (fedlit.models.layers.layers_from_modules).
    """
    layers: list[Layer] = []
    seen: set[int] = set()
    joinable = False  # the last layer is a conv or linear without its norm yet
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        params = []
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                params.append(prefix + name)
        buffers = [prefix + name for name, _ in module.named_buffers(recurse=False)]
        if not params and not buffers:
            continue
        if isinstance(module, NORMS) and joinable:
            last = layers[-1]
            layers[-1] = Layer(
                last.name, last.params + tuple(params), last.buffers + tuple(buffers)
            )
            joinable = False
            continue
        layers.append(Layer(path or ROOT, tuple(params), tuple(buffers)))
        joinable = isinstance(module, WEIGHT_LAYERS)
    return layers


def layer_map_of(model: nn.Module) -> list[Layer]:
    """The model's own `layer_map()`, or the one derived from its module tree."""
    own = getattr(model, "layer_map", None)
    return own() if callable(own) else default_layer_map(model)


def check_layer_map(model: nn.Module, layers: list[Layer]) -> None:
    """Raise ValueError unless every parameter and buffer of `model` is in exactly one layer.

    The message lists every problem at once (missing, duplicated, unknown names and repeated
    layer names), because a wrong map silently breaks partial training and recombination: a
    missing tensor is never communicated, a duplicated one is averaged twice.
    """
    problems: list[str] = []

    seen_layer_names: set[str] = set()
    for layer in layers:
        if layer.name in seen_layer_names:
            problems.append(f"layer name {layer.name!r} is used more than once")
        seen_layer_names.add(layer.name)

    for kind, model_names in (
        ("parameter", [n for n, _ in model.named_parameters()]),
        ("buffer", [n for n, _ in model.named_buffers()]),
    ):
        owners: dict[str, list[str]] = defaultdict(list)
        for layer in layers:
            for tensor_name in layer.params if kind == "parameter" else layer.buffers:
                owners[tensor_name].append(layer.name)
        known = set(model_names)
        for tensor_name in model_names:
            if tensor_name not in owners:
                problems.append(f"{kind} {tensor_name!r} is in no layer")
            elif len(owners[tensor_name]) > 1:
                where = ", ".join(repr(o) for o in owners[tensor_name])
                problems.append(f"{kind} {tensor_name!r} appears in several layers: {where}")
        for tensor_name, layer_names in owners.items():
            if tensor_name not in known:
                where = ", ".join(repr(o) for o in layer_names)
                problems.append(
                    f"unknown {kind} {tensor_name!r} (in layer {where}) is not a {kind} of "
                    f"{type(model).__name__}"
                )

    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"invalid layer map for {type(model).__name__}:\n  {lines}")
