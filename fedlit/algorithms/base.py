"""What the engine needs from an algorithm, as a structural type (no base class to inherit)."""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Algorithm(Protocol):
    """A federated algorithm as the engine sees it.

    `buffers` says whether BatchNorm statistics travel with the weights ("average") or stay with
    each client ("local"). `loss` is a client's training objective on one batch; regularised
    methods add their term to the cross-entropy here and keep the shared local-training loop.
    """

    buffers: Literal["average", "local"]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
