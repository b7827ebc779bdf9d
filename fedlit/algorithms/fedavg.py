"""FedAvg (McMahan et al., AISTATS 2017): the sample-weighted average of the clients' weights,
and the averaging server step every averaging method shares.

The average is computed as a collective: each rank adds w_k * theta_k for the clients it ran
into one flat buffer, together with the extra tensors the method uploads and the clients'
losses; one all-reduce sums the buffers of all ranks, and every rank divides. No rank ever holds
more than its own running sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import (
    BufferPolicy,
    ExtraKind,
    RoundSums,
    StepResult,
    Upload,
    Weighting,
    check_buffers,
    check_weighting,
)
from fedlit.comm import Communicator, FlatLayout, add_scaled, copy_into, named_tensors
from fedlit.context import Context, RoundPlan
from fedlit.hooks import call, defines
from fedlit.local_tensors import LocalClass, check_local
from fedlit.server import ServerOptimizer


class FedAvg:
    """Plain FedAvg: cross-entropy locally, weighted average on the server.

    Args:
        buffers: "average" sends BatchNorm running statistics with the weights and averages them
            (most frameworks); "local" keeps each client's statistics on its rank and never sends
            them (FedPart's official code); the same as listing bn_stats in `local`.
        local: tensor classes each client keeps to itself (fedlit.local_tensors): bn_stats,
            bn_affine, bias. FedBN: [bn_stats, bn_affine]; LIPS's official code shares only
            conv and linear weights: [bn_stats, bn_affine, bias].
        weighting: "samples" (McMahan et al.: client k weighs n_k) or "uniform" (1 each).
    """

    def __init__(
        self,
        buffers: BufferPolicy = "average",
        local: list[LocalClass] | None = None,
        weighting: Weighting = "samples",
    ) -> None:
        check_buffers(buffers)
        check_weighting(weighting)
        self.buffers = buffers
        self.local = check_local(local, buffers)
        self.weighting = weighting

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
    """A rank's running sums for one all-reduce: w_k * theta_k, weighted and summed extras, the
    clients' weighted losses and sum w_k.

    Layout of the flat buffer: [tensors..., weighted extras..., summed extras..., loss, total
    weight]. Tensors and weighted extras are divided by the total weight after the reduction;
    summed extras are not; the loss slot carries sum w_k * loss_k.
    """

    def __init__(
        self,
        layout: FlatLayout,
        device: torch.device,
        dtype: torch.dtype = torch.float64,
        weighted: FlatLayout | None = None,
        summed: FlatLayout | None = None,
    ) -> None:
        self.layout = layout
        self.weighted = weighted or FlatLayout([], [])
        self.summed = summed or FlatLayout([], [])
        size = layout.numel + self.weighted.numel + self.summed.numel
        self.buffer = torch.zeros(size + 2, device=device, dtype=dtype)
        self.views = layout.views(self.buffer)
        start = layout.numel
        self.weighted_views = self.weighted.views(self.buffer[start:])
        start += self.weighted.numel
        self.summed_views = self.summed.views(self.buffer[start:])

    def add(
        self,
        tensors: list[torch.Tensor],
        weight: float,
        loss: torch.Tensor | float = 0.0,
        weighted: Sequence[torch.Tensor] = (),
        summed: Sequence[torch.Tensor] = (),
    ) -> None:
        add_scaled(self.views, tensors, weight)
        add_scaled(self.weighted_views, list(weighted), weight)
        add_scaled(self.summed_views, list(summed), 1.0)
        self.buffer[-2] += loss * weight
        self.buffer[-1] += weight

    def reduce(
        self, comm: Communicator
    ) -> tuple[list[torch.Tensor], float, float, list[torch.Tensor], list[torch.Tensor]]:
        """All-reduce and divide; returns (averaged tensors, total weight, sum w_k * loss_k,
        averaged weighted extras, summed extras)."""
        comm.all_reduce_sum(self.buffer)
        total = float(self.buffer[-1])
        if total <= 0:
            raise RuntimeError("no client contributed to the aggregation this round")
        self.buffer[: self.layout.numel + self.weighted.numel].div_(total)
        loss_sum = float(self.buffer[-2])
        return self.views, total, loss_sum, self.weighted_views, self.summed_views


class AverageServer:
    """The averaging server step: every client starts from the global model (plus its own local
    tensors); the trained layers, the extra tensors the method uploads and the clients' losses
    are summed in one all-reduce; the new global model is the weighted average, or what the
    algorithm's `server_update` and a server optimizer make of it.
    """

    def __init__(
        self, context: Context, algorithm: object, optimizer: ServerOptimizer | None = None
    ) -> None:
        self.context = context
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.summed: WeightedSum | None = None
        self.kinds: dict[str, ExtraKind] = {}
        self.extra_up_bytes = self.extra_down_bytes = 0
        params = dict(context.global_model.named_parameters())
        self.param_names = set(params)

    def start_round(self, plan: RoundPlan) -> None:
        context = self.context
        dtype = getattr(torch, context.trainer.reduce_dtype)
        model = context.global_model
        trained = {n: p.shape for n, p in model.named_parameters() if n in plan.trainable}
        spec = call(self.algorithm, "upload_spec", trained=trained) or {}
        self.kinds = {name: kind for name, (_, kind) in spec.items()}
        layouts = {
            kind: FlatLayout(
                [n for n, (_, k) in spec.items() if k == kind],
                [torch.Size(s) for _, (s, k) in spec.items() if k == kind],
            )
            for kind in ("weighted", "summed")
        }
        self.summed = WeightedSum(
            FlatLayout.of(model, plan.reduced),
            context.device,
            dtype=dtype,
            weighted=layouts["weighted"],
            summed=layouts["summed"],
        )
        # a client sends its extras in float32, and downloads what the method broadcasts
        self.extra_up_bytes = 4 * (layouts["weighted"].numel + layouts["summed"].numel)
        broadcast = call(self.algorithm, "downloads") or {}
        self.extra_down_bytes = sum(t.numel() * t.element_size() for t in broadcast.values())

    def receive(self, client: int, model: nn.Module) -> None:
        self.context.receive(client, into=model)

    def send(
        self,
        client: int,
        model: nn.Module,
        weight: float,
        loss: torch.Tensor,
        upload: Upload | None = None,
    ) -> None:
        summed = self.summed
        tensors = named_tensors(model, summed.layout.names)
        upload = upload or Upload()
        if upload.model:
            tensors = [
                upload.model.get(n, t) for n, t in zip(summed.layout.names, tensors, strict=True)
            ]
        missing = [n for n in self.kinds if n not in upload.extras]
        if missing:
            raise ValueError(
                f"{type(self.algorithm).__name__}.client_end returned no {missing} for client "
                f"{client}, which its upload_spec declares"
            )
        weighted = [upload.extras[n] for n in summed.weighted.names]
        plain = [upload.extras[n] for n in summed.summed.names]
        summed.add(tensors, weight, loss, weighted, plain)

    def finish(self, plan: RoundPlan) -> StepResult:
        context = self.context
        names = self.summed.layout.names
        averaged, total, loss_sum, weighted, plain = self.summed.reduce(context.comm)
        target = dict(zip(names, averaged, strict=True))
        if defines(self.algorithm, "server_update") or self.optimizer is not None:
            current = dict(zip(names, named_tensors(context.global_model, names), strict=True))
            if defines(self.algorithm, "server_update"):
                sums = RoundSums(
                    round=plan.round,
                    clients=len(plan.clients),
                    num_clients=context.num_clients,
                    total_weight=total,
                    weighted=dict(zip(self.summed.weighted.names, weighted, strict=True)),
                    summed=dict(zip(self.summed.summed.names, plain, strict=True)),
                )
                target = call(
                    self.algorithm,
                    "server_update",
                    global_tensors=current,
                    average=target,
                    sums=sums,
                )
            if self.optimizer is not None:
                stepped = [n for n in names if n in self.param_names]
                target.update(
                    self.optimizer.step(
                        {n: current[n] for n in stepped},
                        {n: target[n].to(current[n].dtype) for n in stepped},
                    )
                )
        copy_into(named_tensors(context.global_model, names), [target[n] for n in names])
        self.summed = None
        clients = len(plan.clients)
        return StepResult(
            train_loss=loss_sum / total,
            # each client uploads the layers it trained (and the method's extras) and
            # downloaded what had changed since it last took part (the engine's ledger,
            # fedlit.costs), plus what the method broadcasts
            up_bytes=clients * (plan.sent_bytes + self.extra_up_bytes),
            down_bytes=plan.down_bytes + clients * self.extra_down_bytes,
        )

    def state_dict(self) -> dict | None:
        return None if self.optimizer is None else {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None and state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.optimizer.to(self.context.device)
