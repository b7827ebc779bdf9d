"""A config is code: what each of its class paths may name, checked before anything is built.

`model`, `algorithm`, `callbacks`, `server_optimizer`, `trainer.optimizer` and `data.source`
name Python objects by import path, and building the run calls them with the config's
`init_args`, so a config runs code the way a Python script does: naming a module imports it (its
top-level code runs), and what it names there is called. That is how your models, data,
callbacks and algorithms plug in, and it is why a config deserves the trust a script gets.
What fedlit does is narrow each entry to its kind *before* anything is called, so that a
mistyped or hostile entry (a shell command through `subprocess.Popen` as a callback, `os.system`
as a model) is refused without being called:

- `model`: a subclass of `torch.nn.Module`, or a Python function annotated to return one
  (`torchvision.models.resnet18`) or marked `@fedlit.models.build.model_factory`;
- `trainer.optimizer`: a subclass of `torch.optim.Optimizer`;
- `server_optimizer`: a subclass of `fedlit.server.ServerOptimizer`;
- `algorithm`: a class with a `loss(model, x, y)` method;
- `callbacks`: classes with at least one of the hooks the engine calls (CALLBACK_HOOKS);
- `data.source`: a class or a Python function (not a builtin such as `os.system`).

Algorithms, callbacks and data sources may come from any module, and their code runs in the
run. Checkpoints are data: they are loaded with `torch.load(weights_only=True)` and cannot run
code.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedlit.imports import import_path
from fedlit.models.build import MODEL_FACTORY_MARK

# What the engine and rank 0's observers call on a callback (fedlit.engine lists them in order).
CALLBACK_HOOKS = (
    "check_layers",
    "on_fit_start",
    "on_round_start",
    "select_layers",
    "on_client_receive",
    "on_client_start",
    "on_train_batch_end",
    "on_client_end",
    "on_aggregate_end",
    "on_evaluate_end",
    "on_round_end",
    "on_fit_end",
    "draw",
    "save",
)
MODELS = "CNN, MLP, ResNet8, ResNet18, ResNet20, VGG11, VGG16"


def named(key: str, entry: Any) -> tuple[str, Any] | None:
    """(import path, object) of the config entry `key`: a `{class_path, init_args}` spec, a
    bare import path, or an object jsonargparse already resolved; None for an unset entry."""
    try:
        return _named(entry)
    except ValueError as error:
        message = str(error).removeprefix("class_path: ")
        raise ValueError(f"{key}.class_path: {message}") from None


def _named(entry: Any) -> tuple[str, Any] | None:
    if entry is None:
        return None
    if hasattr(entry, "as_dict"):  # a jsonargparse Namespace
        entry = entry.as_dict()
    if isinstance(entry, dict):
        entry = entry.get("class_path")
        if not isinstance(entry, str):
            return None  # malformed: the parser or the builder reports it
    if isinstance(entry, str):
        return entry, import_path(entry, "class_path")
    target = getattr(entry, "func", entry)  # functools.partial of a class
    name = getattr(target, "__qualname__", type(target).__name__)
    return f"{getattr(target, '__module__', '?')}.{name}", target


def is_model_class(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, nn.Module)


def returns_model(function: Any) -> bool:
    """Whether `function` is a Python function that says it builds a model: marked with
    `model_factory`, or annotated to return an nn.Module subclass (torchvision's builders)."""
    if not inspect.isfunction(function):
        return False  # builtins (os.system), classes, other callables
    if getattr(function, MODEL_FACTORY_MARK, False):
        return True
    try:
        returned = typing.get_type_hints(function).get("return")
    except Exception:  # an annotation that does not resolve says nothing
        return False
    return is_model_class(returned)


def check_model(entry: Any) -> None:
    """`model`: an nn.Module subclass, or a function that builds one."""
    found = named("model", entry)
    if found is None:
        return
    path, obj = found
    if is_model_class(obj) or returns_model(obj):
        return
    kind = "a class that is not a torch.nn.Module" if inspect.isclass(obj) else "not a model"
    raise ValueError(
        f"model: {path} is {kind}: model names a torch.nn.Module subclass (e.g. "
        f"fedlit.models.CNN; the zoo: {MODELS}), or a function annotated `-> nn.Module` or "
        "marked @fedlit.models.build.model_factory (e.g. torchvision.models.resnet18); "
        "nothing was called"
    )


def check_built_model(model: nn.Module, class_path: str) -> None:
    """A model has parameters to train and send: `torch.nn.Identity` passes the class check
    but there is nothing to federate."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"model: {class_path} has no trainable parameters, so there is nothing to train or "
            f"average; name a model with weights (e.g. fedlit.models.CNN; the zoo: {MODELS})"
        )


def check_source(entry: Any) -> None:
    """`data.source`: a class or a Python function; a builtin (os.system) is refused."""
    found = named("data.source", entry)
    if found is None:
        return
    path, obj = found
    if not (inspect.isclass(obj) or inspect.isfunction(obj)):
        raise ValueError(
            f"data.source: {path} is a {type(obj).__name__}, not a class or a Python function "
            "returning the (train, test) splits; nothing was called"
        )


def check_subclass(key: str, entry: Any, base: type, example: str) -> None:
    """`key` names a subclass of `base`."""
    found = named(key, entry)
    if found is None:
        return
    path, obj = found
    if not (inspect.isclass(obj) and issubclass(obj, base)):
        raise ValueError(
            f"{key}: {path} is not a subclass of {base.__module__}.{base.__qualname__}; name "
            f"one, e.g. {example}; nothing was called"
        )


def check_class_with(
    key: str, entry: Any, has: Callable[[type], bool], what: str, example: str
) -> None:
    """`key` names a class for which `has(class)` holds."""
    found = named(key, entry)
    if found is None:
        return
    path, obj = found
    if not (inspect.isclass(obj) and has(obj)):
        kind = "a class" if inspect.isclass(obj) else f"a {type(obj).__name__}, not a class"
        raise ValueError(
            f"{key}: {path} is {kind} without {what}; name one, e.g. {example}; nothing was called"
        )


def is_algorithm(cls: type) -> bool:
    return callable(getattr(cls, "loss", None))


def is_callback(cls: type) -> bool:
    return any(callable(getattr(cls, hook, None)) for hook in CALLBACK_HOOKS)


def check_config_kinds(section: Any) -> None:
    """Every class path of a parsed (not yet instantiated) `fit` or `partition` section names
    an object of its kind; raises ValueError naming the key otherwise."""
    from fedlit.server import ServerOptimizer

    def get(key: str) -> Any:
        value = section
        for part in key.split("."):
            value = getattr(value, part, None)
        return value

    check_model(get("model"))
    check_source(get("data.source"))
    check_subclass(
        "trainer.optimizer", get("trainer.optimizer"), torch.optim.Optimizer, "torch.optim.SGD"
    )
    check_subclass(
        "server_optimizer", get("server_optimizer"), ServerOptimizer, "fedlit.server.FedAdam"
    )
    check_class_with(
        "algorithm",
        get("algorithm"),
        is_algorithm,
        "a loss(model, x, y) method",
        "fedlit.algorithms.FedAvg",
    )
    for position, entry in enumerate(get("callbacks") or []):
        check_class_with(
            f"callbacks[{position}]",
            entry,
            is_callback,
            f"any of the callback hooks ({', '.join(CALLBACK_HOOKS)})",
            "callbacks.freezing.FedPartSchedule",
        )
