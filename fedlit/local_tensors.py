"""Which tensors stay on the clients: classes of model tensors that an algorithm never shares.

Averaging algorithms (FedAvg, FedProx, MOON) take `local: [...]`, any of
- `bn_stats`: BatchNorm running statistics (running_mean, running_var, num_batches_tracked);
- `bn_affine`: BatchNorm weight and bias;
- `bias`: the bias of every other module (convolutions, linear layers).
FedBN is `local: [bn_stats, bn_affine]`; LIPS's official policy, which synchronises only conv and
linear weights, is `local: [bn_stats, bn_affine, bias]`. The older `buffers: local` means
`bn_stats`.

A local tensor lives with its client on the client's rank and is never sent or counted. A client
taking part for the first time starts from the global model's value. What the global model holds
for local tensors: BatchNorm statistics are the sample-weighted average of the round's clients'
(computed for evaluation only, inside the round's all-reduce, never delivered to a client);
local parameters (`bn_affine`, `bias`) are never reduced at all, so the global model keeps their
initial values. Evaluate such a run with `trainer.eval_bn: [client:K]` (client K's own local
tensors and statistics) or personalised accuracy (`trainer.personal_eval`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

LocalClass = Literal["bn_stats", "bn_affine", "bias"]
LOCAL_CLASSES: tuple[str, ...] = get_args(LocalClass)


def check_local(local: Iterable[str] | None, buffers: str) -> tuple[str, ...]:
    """The algorithm's local classes, validated and sorted; `buffers: local` adds bn_stats."""
    if local is not None and (isinstance(local, str) or not isinstance(local, Iterable)):
        raise ValueError(
            f"algorithm.local must be a list drawn from {list(LOCAL_CLASSES)}, got {local!r}"
        )
    chosen = set(local or ())
    unknown = sorted(str(c) for c in chosen - set(LOCAL_CLASSES))
    if unknown:
        raise ValueError(
            f"algorithm.local: unknown tensor class(es) {unknown}; choose from "
            f"{list(LOCAL_CLASSES)} (FedBN: [bn_stats, bn_affine]; LIPS's official policy: "
            "[bn_stats, bn_affine, bias])"
        )
    if buffers == "local":
        chosen.add("bn_stats")
    return tuple(c for c in LOCAL_CLASSES if c in chosen)


def local_classes(algorithm: Any) -> tuple[str, ...]:
    """The classes `algorithm` keeps local (none for algorithms without the setting)."""
    local = getattr(algorithm, "local", None)
    if local is not None:
        return tuple(local)
    return ("bn_stats",) if getattr(algorithm, "buffers", "average") == "local" else ()


def bn_stat_names(model: nn.Module) -> list[str]:
    """Names of the running statistics of every BatchNorm module, in module order."""
    return [
        f"{path}.{name}" if path else name
        for path, module in model.named_modules()
        if isinstance(module, _BatchNorm)
        for name, _ in module.named_buffers(recurse=False)
    ]


def local_tensor_names(model: nn.Module, classes: Iterable[str]) -> set[str]:
    """Names of the parameters and buffers of `model` in the given classes."""
    classes = set(classes)
    names: set[str] = set()
    if "bn_stats" in classes:
        names.update(bn_stat_names(model))
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, _BatchNorm):
            if "bn_affine" in classes:
                names.update(prefix + name for name in own)
        elif "bias" in classes and own.get("bias") is not None:
            names.add(prefix + "bias")
    return names
