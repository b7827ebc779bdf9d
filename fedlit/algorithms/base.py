"""What the engine asks of an algorithm: structural types, no base class to inherit.

An algorithm is a client objective (`loss`) plus optional hooks, each found by name and called
with the keyword arguments its signature names (fedlit.hooks). It programs against
`fedlit.context.Context`, never against the engine. In the order a round calls them:

- `build_model(model) -> nn.Module`: change the architecture once, before the layer map is
  checked (MOON adds its projection head).
- `setup(context)`: once per rank, after the model is on its device: register per-client stores
  (`context.state.store(name)`), keep the initial weights, ...
- `client_start(round, client, model, global_model)`: the client holds the weights it received
  and frozen layers are set; before callbacks may perturb them (LIPS) and before the optimizer
  is built (FedProx anchors here, SCAFFOLD loads its control variates).
- `before_step(round, client, model, optimizer)`: after each backward, before the optimizer
  step (SCAFFOLD's gradient correction).
- `client_end(round, client, model, steps, optimizer) -> Upload | None`: after local training,
  with the number of local steps and the optimizer; keep state, and return what the client
  uploads besides its trained tensors (an `Upload`).
- `upload_spec(trained) -> {name: (shape, "weighted" | "summed")}`: asked on every rank before the
  round, for the extra tensors of the `Upload`s, so that every rank (also one without a client
  this round) lays out the same all-reduce. `trained` maps the round's trained parameters to
  their shapes.
- `server_update(global_tensors, average, sums) -> {name: tensor}`: a pure function from the
  global model's tensors, the round's (weighted) average of what clients uploaded and the
  round's `RoundSums` to the new global tensors (default: the average). Testable without
  processes. A configured server optimizer (fedlit.server) then steps from the old global model
  towards this target.
- `downloads() -> {name: tensor}`: tensors every sampled client downloads besides the model
  (SCAFFOLD's server control variate); their bytes are counted.
- `make_server(context) -> ServerStep`: replace weighted averaging by another server step
  (FedMR's recombination).
- `frozen_forwards(taken_part) -> int`: extra forward passes through `model.features` per batch
  (MOON), for the FLOP count.
- attributes: `weighting` ("samples": n_k, the default; "uniform": 1 per client),
  `partial_rounds = False` (refuses layer-selecting callbacks), `local` (tensor classes kept on
  the clients, fedlit.local_tensors), `buffers` ("average" | "local").
- `state_dict()` / `load_state_dict(state)`: server-side state that is the same on every rank
  (SCAFFOLD's c, FedDyn's h), saved once per checkpoint. Per-client state goes into
  `context.state` instead and is checkpointed and re-sharded by client id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import nn

from fedlit.context import RoundPlan

BufferPolicy = Literal["average", "local"]
BUFFER_POLICIES = ("average", "local")
Weighting = Literal["samples", "uniform"]
WEIGHTINGS = ("samples", "uniform")
ExtraKind = Literal["weighted", "summed"]


def check_buffers(buffers: str) -> None:
    """Shared by the averaging algorithms: the engine only knows these two policies."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(
            f"algorithm.buffers must be one of {list(BUFFER_POLICIES)}, got {buffers!r}"
        )


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"algorithm.weighting must be one of {list(WEIGHTINGS)} (samples: each client "
            f"weighs its number of training samples; uniform: 1 each), got {weighting!r}"
        )


@runtime_checkable
class Algorithm(Protocol):
    """A federated algorithm as the engine sees it: a client objective on one batch."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Upload:
    """What one client uploads besides its trained tensors.

    `model` replaces some of the client's trained tensors in the round's average (FedNova's
    normalised update); `extras` are the tensors `upload_spec` declared, each averaged with the
    clients' weights ("weighted") or summed over the clients ("summed").
    """

    model: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoundSums:
    """What the server knows after the round's all-reduce (identical on every rank)."""

    round: int
    clients: int  # sampled this round
    num_clients: int  # in the federation
    total_weight: float  # sum of the clients' aggregation weights
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)  # averaged extras
    summed: dict[str, torch.Tensor] = field(default_factory=dict)  # summed extras


@dataclass
class StepResult:
    """What a server step reports back to the round loop (identical on every rank)."""

    train_loss: float  # weighted mean of the clients' mean training losses
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
    `send` (take the trained model and its `Upload`); then `finish` once, which runs the
    collectives and leaves the model to evaluate in `context.global_model` (at least on
    evaluation rounds).
    """

    def start_round(self, plan: RoundPlan) -> None: ...

    def receive(self, client: int, model: nn.Module) -> None: ...

    def send(
        self,
        client: int,
        model: nn.Module,
        weight: float,
        loss: torch.Tensor,
        upload: Upload | None = None,
    ) -> None: ...

    def finish(self, plan: RoundPlan) -> StepResult: ...
