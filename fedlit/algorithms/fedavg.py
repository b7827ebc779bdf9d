"""FedAvg (McMahan et al., AISTATS 2017): the sample-weighted average of the clients' weights.

The average is computed as a collective: each rank adds n_k * w_k for the clients it ran into
one flat buffer whose last slot holds sum n_k, one all-reduce sums the buffers of all ranks, and
every rank divides. No rank ever holds more than its own running sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import BufferPolicy, StepResult, check_buffers
from fedlit.comm import Communicator, FlatLayout, add_scaled, copy_into, named_tensors
from fedlit.local_tensors import LocalClass, check_local

if TYPE_CHECKING:
    from fedlit.engine import Federation, RoundPlan


class FedAvg:
    """Plain FedAvg: cross-entropy locally, weighted average on the server.

    Args:
        buffers: "average" sends BatchNorm running statistics with the weights and averages them
            (most frameworks); "local" keeps each client's statistics on its rank and never sends
            them (FedPart's official code); the same as listing bn_stats in `local`.
        local: tensor classes each client keeps to itself (fedlit.local_tensors): bn_stats,
            bn_affine, bias. FedBN: [bn_stats, bn_affine]; LIPS's official code shares only
            conv and linear weights: [bn_stats, bn_affine, bias].
    """

    def __init__(
        self, buffers: BufferPolicy = "average", local: list[LocalClass] | None = None
    ) -> None:
        check_buffers(buffers)
        self.buffers = buffers
        self.local = check_local(local, buffers)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


def weighted_average(
    contributions: Sequence[tuple[Sequence[torch.Tensor], float]],
) -> list[torch.Tensor]:
    """sum_k w_k * theta_k / sum_k w_k over (tensors, weight) pairs; the reference for tests."""
    total = sum(weight for _, weight in contributions)
    if total <= 0:
        raise ValueError("weighted_average needs a positive total weight")
    first, _ = contributions[0]
    averaged = [torch.zeros_like(t, dtype=torch.float64) for t in first]
    for tensors, weight in contributions:
        for acc, tensor in zip(averaged, tensors, strict=True):
            acc.add_(tensor.double(), alpha=weight / total)
    return [a.to(t.dtype) for a, t in zip(averaged, first, strict=True)]


class WeightedSum:
    """A rank's running sum of n_k * w_k, n_k and a few scalars, reduced in one all-reduce.

    Layout of the flat buffer: [tensors..., extras..., total weight]. The extras carry
    per-client statistics (already multiplied by the client's weight, e.g. its mean training
    loss) so that they ride along the model reduction instead of needing a collective of their own.
    """

    def __init__(
        self,
        layout: FlatLayout,
        device: torch.device,
        extras: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.layout = layout
        self.extras = extras
        self.buffer = layout.zeros(device, dtype=dtype, extra=extras + 1)
        self.views = layout.views(self.buffer)

    def add(
        self,
        tensors: list[torch.Tensor],
        weight: float,
        extras: Sequence[torch.Tensor | float] = (),
    ) -> None:
        if len(extras) != self.extras:
            raise ValueError(f"expected {self.extras} extra values, got {len(extras)}")
        add_scaled(self.views, tensors, weight)
        for i, value in enumerate(extras):
            self.buffer[self.layout.numel + i] += value
        self.buffer[-1] += weight

    def reduce(self, comm: Communicator) -> tuple[list[torch.Tensor], float, list[float]]:
        """All-reduce and divide; returns (averaged tensors, total weight, summed extras)."""
        comm.all_reduce_sum(self.buffer)
        total = float(self.buffer[-1])
        if total <= 0:
            raise RuntimeError("no client contributed to the aggregation this round")
        start = self.layout.numel
        extras = [float(v) for v in self.buffer[start : start + self.extras]]
        self.buffer[:start].div_(total)
        return self.views, total, extras


class AverageServer:
    """FedAvg's server step: every client starts from the global model (plus its own BN
    statistics under the "local" buffer policy); the trained layers are averaged with one
    all-reduce that also carries the clients' losses."""

    def __init__(self, federation: Federation) -> None:
        self.fed = federation
        self.summed: WeightedSum | None = None

    def start_round(self, plan: RoundPlan) -> None:
        fed = self.fed
        dtype = getattr(torch, fed.run.trainer.reduce_dtype)
        layout = FlatLayout.of(fed.global_model, plan.reduced)
        self.summed = WeightedSum(layout, fed.fabric.device, extras=1, dtype=dtype)

    def receive(self, client: int, model: nn.Module) -> None:
        self.fed.load_client_model(client, into=model)

    def send(self, client: int, model: nn.Module, weight: float, loss: torch.Tensor) -> None:
        tensors = named_tensors(model, self.summed.layout.names)
        self.summed.add(tensors, weight, extras=[loss * weight])

    def finish(self, plan: RoundPlan) -> StepResult:
        fed = self.fed
        averaged, total_weight, extras = self.summed.reduce(fed.comm)
        copy_into(named_tensors(fed.global_model, plan.reduced), averaged)
        self.summed = None
        return StepResult(
            train_loss=extras[0] / total_weight,
            # each client uploads the layers it trained and downloaded what had changed
            # since it last took part (the engine's ledger, fedlit.costs)
            up_bytes=len(plan.clients) * plan.sent_bytes,
            down_bytes=plan.down_bytes,
        )
