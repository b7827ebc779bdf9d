"""The narrow API methods and callbacks program against: what a hook may read and do.

An algorithm's `setup(context)`, a server step's constructor and a callback's
`on_fit_start(context)` receive one `Context` per rank. It exposes:

- where the hook runs: `rank`, `world_size`, `device`, `is_main` (rank 0), `autocast`;
- the run: `seed`, `run_dir`, `rounds`, `num_clients`, `per_round`, the trainer settings
  (`trainer`, read-only), whether figures are drawn (`plots`);
- the model: `global_model` (identical on every rank after each aggregation) and its `layers`
  (the layer map);
- the data: `data` (the device-resident dataset: `train_batches`, `eval_batches`), each client's
  `client_indices` / `client_test_indices` into it and `client_sizes`;
- randomness: `generator(purpose, *keys)`, a device generator from the (seed, purpose, *keys)
  stream, and `sample(round)`, the clients of any round (known ahead, identical on every rank);
- ownership: `owns(client)` (client c lives on rank c % world_size) and `owned(clients)`;
- communication: `comm` (all-reduce and all-to-all over flat buffers, with byte counts);
- state: `state`, the per-client registry (fedlit.state: named stores, checkpointed and
  re-sharded by client id);
- `receive(client, into)`: load the model `client` receives (global weights plus its own local
  tensors) into a module.

What a hook may do: change the model it is handed, keep state (in `state` for per-client
tensors, in its own `state_dict` for what is the same on every rank), run collectives through
`comm` as long as every rank makes the same calls, and add metrics (the same values on every
rank). Nothing else of the engine is reachable, so a method never depends on its internals.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlit.clients import Stream, owned_clients, owner, sample_clients, torch_generator
from fedlit.comm import Communicator
from fedlit.models.layers import Layer
from fedlit.state import ClientState

if TYPE_CHECKING:
    from fedlit.config import TrainerConfig
    from fedlit.data.device import DeviceData


@dataclass
class Context:
    """One rank's view of a run for algorithms, server steps and callbacks (see the module)."""

    rank: int
    world_size: int
    device: torch.device
    seed: int
    run_dir: Path
    trainer: TrainerConfig
    plots: bool
    num_clients: int
    per_round: int
    global_model: nn.Module
    layers: list[Layer]
    data: DeviceData
    client_indices: list[torch.Tensor]
    client_test_indices: list[torch.Tensor] | None
    client_sizes: list[int]
    comm: Communicator
    state: ClientState
    autocast: Callable[[], AbstractContextManager]
    _receive: Callable[[int, nn.Module | None], nn.Module] = field(repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def rounds(self) -> int:
        return self.trainer.rounds

    def generator(self, purpose: Stream, *keys: int) -> torch.Generator:
        """A generator on this rank's device seeded from the (seed, purpose, *keys) stream."""
        return torch_generator(self.seed, purpose, *keys, device=self.device)

    def sample(self, round_idx: int) -> list[int]:
        """The clients of round `round_idx` (sorted), as every rank draws them."""
        return sample_clients(self.seed, round_idx, self.num_clients, self.per_round)

    def owns(self, client: int) -> bool:
        return owner(client, self.world_size) == self.rank

    def owned(self, clients: list[int]) -> list[int]:
        return owned_clients(clients, self.rank, self.world_size)

    def tensor_names(self, layer_names: list[str]) -> tuple[list[str], list[str]]:
        """(parameter names, floating-point buffer names) of the chosen layers, in map order."""
        chosen = set(layer_names)
        buffers = dict(self.global_model.named_buffers())
        params: list[str] = []
        floats: list[str] = []
        for layer in self.layers:
            if layer.name in chosen:
                params.extend(layer.params)
                floats.extend(b for b in layer.buffers if buffers[b].is_floating_point())
        return params, floats

    def receive(self, client: int, into: nn.Module | None = None) -> nn.Module:
        """`into` (default: the engine's working model) := what `client` receives: the global
        weights with its own local tensors once it has trained."""
        return self._receive(client, into)


@dataclass
class RoundPlan:
    """What a round moves: decided before any client trains, identical on every rank."""

    round: int
    clients: list[int]
    mine: list[int]  # the clients this rank runs
    active: list[str]  # layers trained and communicated this round (the rest are frozen)
    trainable: set[str]  # parameter names of the active layers
    reduced: list[str]  # tensors in the all-reduce: shared trained parameters, float BN buffers
    sent: list[str]  # of those, what a client really uploads (local tensors excluded)
    sent_bytes: int  # bytes one client uploads this round
    down_bytes: int  # bytes the sampled clients download: what changed since each last synced
    evaluate: bool
