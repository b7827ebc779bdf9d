"""The client's optimizer: built anew for every client and round from `trainer.optimizer`."""

from __future__ import annotations

import torch
from torch import nn

from fedlit.config import OptimizerFactory


def make_optimizer(factory: OptimizerFactory | None, params: list[nn.Parameter]):
    """The client's optimizer, built anew for every client and round (plain SGD, lr 0.01, when
    trainer.optimizer is unset)."""
    if factory is None:
        return torch.optim.SGD(params, lr=0.01)
    return factory(params)


def probe_optimizer(factory: OptimizerFactory | None) -> torch.optim.Optimizer:
    """The client's optimizer built on a dummy parameter: its class and settings, for checks
    made before any model exists."""
    return make_optimizer(factory, [nn.Parameter(torch.zeros(1))])
