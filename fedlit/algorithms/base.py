"""What the engine needs from an algorithm, as structural types (no base class to inherit).

An algorithm is two things: a client objective (`loss`) and a server step. Everything else is
optional and found by name, so FedAvg stays a few lines and a regulariser is one small module:

- `build_model(model) -> nn.Module`: change the architecture once, before the layer map is
  checked (MOON adds its projection head here).
- `setup(global_model, layers, device, federation)`: once per rank, after the model is on its
  device (e.g. keep the initial weights).
- `client_start(round, client, model, global_model)`: after the client has received its
  weights and frozen layers are set, before callbacks may perturb them (LIPS) and before its
  optimizer is built (FedProx takes its anchor here, MOON its frozen reference models).
- `client_end(round, client, model)`: after local training (MOON keeps the client's model).
- `make_server(federation) -> ServerStep`: replace weighted averaging by another server step
  (FedMR's recombination); without it the engine uses `fedlit.algorithms.fedavg.AverageServer`.
  A server step reports the bytes its clients really moved (`StepResult.up_bytes` and
  `down_bytes`); `plan.down_bytes` is what the clients need to catch up with the global model.
- `frozen_forwards(taken_part) -> int`: how many extra forward passes through `model.features`,
  on frozen models and without backward, the loss runs per batch for a client that has trained
  `taken_part` times before (MOON: the global model and its previous models). The cost
  accounting (`fedlit.costs`) counts their FLOPs; without it only the model's own forward and
  backward are counted.
- `partial_rounds = False` (an attribute): the method cannot train only some layers per round
  (FedMR recombines whole models), so a callback with `select_layers` is refused before launch.

Each optional method receives only the keyword arguments its signature names.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from fedlit.engine import Federation, RoundPlan


BufferPolicy = Literal["average", "local"]
BUFFER_POLICIES = ("average", "local")


def check_buffers(buffers: str) -> None:
    """Shared by the averaging algorithms: the engine only knows these two policies."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(
            f"algorithm.buffers must be one of {list(BUFFER_POLICIES)}, got {buffers!r}"
        )


@runtime_checkable
class Algorithm(Protocol):
    """A federated algorithm as the engine sees it.

    `buffers` says whether BatchNorm statistics travel with the weights ("average") or stay with
    each client ("local"). `loss` is a client's training objective on one batch; regularised
    methods add their term to the cross-entropy here and keep the shared local-training loop.
    """

    buffers: Literal["average", "local"]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


def call_optional(obj: Any, name: str, **kwargs: Any) -> Any:
    """Call `obj.name` with the keyword arguments its signature accepts; None if it has none."""
    method = getattr(obj, name, None)
    if method is None:
        return None
    accepted = inspect.signature(method).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return method(**kwargs)
    return method(**{k: v for k, v in kwargs.items() if k in accepted})


@dataclass
class StepResult:
    """What a server step reports back to the round loop (identical on every rank)."""

    train_loss: float  # sample-weighted mean of the clients' mean training losses
    up_bytes: int  # bytes the round's clients uploaded to the server, all together
    down_bytes: int  # bytes they downloaded from it before training, all together
    metrics: dict[str, float | int] = field(default_factory=dict)  # extra, same on every rank

    @property
    def round_bytes(self) -> int:
        """Both directions: the round's `comm/round_bytes`."""
        return self.up_bytes + self.down_bytes


@runtime_checkable
class ServerStep(Protocol):
    """The server's side of one round, run as collectives by every rank.

    The engine calls `start_round` once, then for each client this rank owns: `receive` (write
    the weights the client starts from into the working model) and, after local training,
    `send` (take the trained model); then `finish` once, which runs the collectives and leaves
    the model to evaluate in `federation.global_model` (at least on evaluation rounds).
    """

    def start_round(self, plan: RoundPlan) -> None: ...

    def receive(self, client: int, model: nn.Module) -> None: ...

    def send(self, client: int, model: nn.Module, weight: float, loss: torch.Tensor) -> None: ...

    def finish(self, plan: RoundPlan) -> StepResult: ...


def default_server(federation: Federation) -> ServerStep:
    from fedlit.algorithms.fedavg import AverageServer

    return AverageServer(federation)
