"""FedMR (Hu et al., KDD 2024): layer-wise model recombination instead of aggregation.

The server keeps K model slots (K = clients per round), all starting from the initial weights.
In round r the i-th sampled client (`plan.clients` is sorted) trains slot i. Afterwards each
unit u of the slots (a layer-map group, or a single tensor as in the official code) is dealt out
again by a permutation pi_u of the K slots drawn from the (seed, RECOMBINE, r) stream:
new_slot[i][u] = old_slot[pi_u(i)][u]. For the first `first_stage_rounds` rounds every slot is
instead reset to the unweighted average of the trained slots (the two-stage scheme).

In fedlit the server is a collective, and the slots are never gathered:
- slot i of round r is held by the rank that owns the client training it,
  `owner(clients_r[i])`; a rank holds no other slot;
- the next round's sample is known from the seeded stream, so one `all_to_all_single` per round
  sends each unit of each held slot straight to the rank that trains its destination slot next;
  units whose source and destination slots are on the same rank are copied, not sent;
- averaging (the first stage, and the global model used for evaluation, which recombination does
  not change) is one all-reduce of the held slots' sum that also carries the clients' losses;
  on recombination rounds that are not evaluated only the two loss numbers are reduced.
Only floating-point tensors are slots' content: parameters and BN running statistics travel
together (buffers = "average"); integer buffers (BN's num_batches_tracked) are never shuffled or
averaged: every client starts from the global model's value, as under FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import StepResult, Upload
from fedlit.clients import Stream, owner, stream_seed
from fedlit.comm import FlatLayout, copy_into, named_tensors
from fedlit.context import Context, RoundPlan
from fedlit.models.layers import Layer, layer_map_of

Unit = Literal["layer", "tensor"]


class FedMR:
    """FedMR: cross-entropy locally; the server recombines the trained models unit by unit.

    Args:
        first_stage_rounds: S, the number of warm-up rounds. Rounds 1..S (fedlit numbers rounds
            from 1) end like FedAvg with equal weights: every slot becomes the unweighted mean of
            the trained slots. Recombination ends every round after S. This is the official
            code's `first_stage_bound` (its 0-based round `iter` averages while `iter < S`).
            0 (the official default) recombines from round 1; the authors advise 50-100 for VGG.
        unit: what is shuffled as one piece. "layer" (default, the paper's wording): a group of
            the model's layer map, so a conv's weight, bias and BN statistics stay together.
            "tensor" (the official code): every parameter and floating-point buffer on its own.
        partitions: 1 (default) draws a fresh permutation for every unit, as the paper does.
            P >= 2 is the partitioned variant: the units are cut into P consecutive blocks of
            (nearly) equal length and each block shares one permutation (the official code's
            `fedmr_partition` = 1/P). P may not exceed the number of units.
    """

    def __init__(
        self, first_stage_rounds: int = 0, unit: Unit = "layer", partitions: int = 1
    ) -> None:
        if isinstance(first_stage_rounds, bool) or first_stage_rounds < 0:
            raise ValueError(
                "algorithm.first_stage_rounds must be an integer >= 0 (0: recombine from "
                f"round 1), got {first_stage_rounds}"
            )
        if unit not in ("layer", "tensor"):
            raise ValueError(f"algorithm.unit must be 'layer' or 'tensor', got {unit!r}")
        if isinstance(partitions, bool) or partitions < 1:
            raise ValueError(
                "algorithm.partitions must be an integer >= 1 (1: one permutation per unit), "
                f"got {partitions}"
            )
        self.first_stage_rounds = first_stage_rounds
        self.unit = unit
        self.partitions = partitions
        self.buffers: Literal["average"] = "average"
        self.local: tuple[str, ...] = ()  # slots are recombined whole: nothing stays local
        # each slot is recombined as a whole model: a round that trains only some layers
        # (FedPart's select_layers) has no meaning here, and the engine refuses the pairing
        self.partial_rounds = False

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def build_model(self, model: nn.Module) -> None:
        """Reject a partition count the model cannot take, before any rank starts."""
        units = len(slot_layout(model, layer_map_of(model), self.unit).units)
        if self.partitions > units:
            raise ValueError(
                f"algorithm.partitions must be between 1 and the number of units of "
                f"{type(model).__name__} with unit={self.unit!r} ({units}), got {self.partitions}"
            )

    def make_server(self, context: Context) -> RecombinationServer:
        return RecombinationServer(context, self)


# --- what a slot is made of -------------------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """A slot as one flat tensor: the float tensors layer by layer, cut into units."""

    layout: FlatLayout
    units: list[tuple[int, int]]  # [start, stop) of each unit in the flat slot
    unit_names: list[str]
    dtype: torch.dtype

    @property
    def names(self) -> list[str]:
        return self.layout.names

    def unit_numels(self) -> list[int]:
        return [stop - start for start, stop in self.units]

    def nbytes(self) -> int:
        return self.layout.nbytes(self.dtype)


def slot_layout(model: nn.Module, layers: Sequence[Layer], unit: Unit) -> SlotLayout:
    """Parameters and floating-point buffers in layer-map order, each layer contiguous, so
    that a unit is one slice of the flat slot whichever unit is chosen."""
    buffers = dict(model.named_buffers())
    names: list[str] = []
    groups: list[tuple[str, list[str]]] = []
    for layer in layers:
        tensors = list(layer.params) + [b for b in layer.buffers if buffers[b].is_floating_point()]
        names.extend(tensors)
        if unit == "layer":
            groups.append((layer.name, tensors))
        else:
            groups.extend((name, [name]) for name in tensors)
    layout = FlatLayout.of(model, names)
    dtypes = {t.dtype for t in named_tensors(model, names)}
    if len(dtypes) != 1:
        raise ValueError(f"FedMR needs the model's float tensors in one dtype, got {dtypes}")
    numel = dict(zip(layout.names, layout.numels, strict=True))
    units, unit_names, start = [], [], 0
    for name, tensors in groups:
        stop = start + sum(numel[t] for t in tensors)
        if stop > start:  # a group of integer buffers only has nothing to shuffle
            units.append((start, stop))
            unit_names.append(name)
        start = stop
    return SlotLayout(layout, units, unit_names, dtypes.pop())


# --- the recombination, as pure functions -----------------------------------------------------


def unit_blocks(num_units: int, partitions: int) -> list[int]:
    """The block of each unit: units of one block share a permutation."""
    if partitions == 1:
        return list(range(num_units))
    if not 1 <= partitions <= num_units:
        raise ValueError(f"partitions must be between 1 and {num_units}, got {partitions}")
    blocks = np.array_split(np.arange(num_units), partitions)
    return [b for b, members in enumerate(blocks) for _ in members]


def unit_permutations(
    seed: int, round_idx: int, num_slots: int, num_units: int, partitions: int = 1
) -> np.ndarray:
    """[units, slots] array: row u is pi_u, and new_slot[i][u] = old_slot[pi_u[i]][u].

    Drawn from the (seed, RECOMBINE, round) stream, one permutation per block in block order, so
    every rank draws the same ones and the number of ranks does not matter.
    """
    blocks = unit_blocks(num_units, partitions)
    rng = np.random.default_rng(stream_seed(seed, Stream.RECOMBINE, round_idx))
    drawn = [rng.permutation(num_slots) for _ in range(max(blocks, default=-1) + 1)]
    return np.array([drawn[b] for b in blocks], dtype=np.int64).reshape(num_units, num_slots)


@dataclass
class Exchange:
    """One rank's part of a recombination: what it sends, receives and copies locally.

    For every pair of ranks the sender lists its pieces in the order the receiver lists them
    (destination slot, then unit), so the flat buffers need no headers.
    """

    send: list[list[tuple[int, int]]]  # per destination rank: (source slot, unit)
    recv: list[list[tuple[int, int]]]  # per source rank: (destination slot, unit)
    local: list[tuple[int, int, int]] = field(default_factory=list)  # (dest, source, unit)
    moved_units: list[int] = field(default_factory=list)  # units crossing ranks, all ranks

    def splits(self, numels: Sequence[int]) -> tuple[list[int], list[int]]:
        """Elements sent to and received from each rank."""
        send = [sum(numels[u] for _, u in part) for part in self.send]
        recv = [sum(numels[u] for _, u in part) for part in self.recv]
        return send, recv


def plan_exchange(
    perms: np.ndarray,
    holders_now: Sequence[int],
    holders_next: Sequence[int],
    rank: int,
    world_size: int,
) -> Exchange:
    """Route unit u of new slot i from the holder of its source slot pi_u[i] this round to the
    holder of slot i next round."""
    exchange = Exchange([[] for _ in range(world_size)], [[] for _ in range(world_size)])
    num_units, num_slots = perms.shape
    for dest in range(num_slots):
        to_rank = holders_next[dest]
        for unit in range(num_units):
            source = int(perms[unit, dest])
            from_rank = holders_now[source]
            if from_rank != to_rank:
                exchange.moved_units.append(unit)
            if from_rank == rank == to_rank:
                exchange.local.append((dest, source, unit))
            elif from_rank == rank:
                exchange.send[to_rank].append((source, unit))
            elif to_rank == rank:
                exchange.recv[from_rank].append((dest, unit))
    return exchange


def recombine(
    slots: Sequence[torch.Tensor], perms: np.ndarray, units: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Single-process reference: all K flat slots in, all K recombined slots out."""
    new = [torch.empty_like(s) for s in slots]
    for dest, slot in enumerate(new):
        for unit, (start, stop) in enumerate(units):
            slot[start:stop] = slots[int(perms[unit, dest])][start:stop]
    return new


# --- the server step --------------------------------------------------------------------------


class RecombinationServer:
    """FedMR's server step on one rank: holds the slots of the clients it runs.

    Slot i of round r is kept in the client store "fedmr/slots" under the id of the client that
    trains it, `clients_r[i]`, on that client's rank; so a checkpoint resumes on any number of
    ranks like any other client state.

    Attributes read by tests and the engine:
        round: the round the held slots are for.
        exchange_bytes: bytes that crossed ranks in the last round's all-to-all, all ranks
            together (identical on every rank: it follows from the permutations and ownership).
        metrics: this round's extra metrics (`fedmr/exchange_bytes`,
            `fedmr/exchange_bytes_total`), identical on every rank.
    """

    def __init__(self, context: Context, algorithm: FedMR) -> None:
        self.context = context
        self.algorithm = algorithm
        model = context.global_model
        self.layout = slot_layout(model, context.layers, algorithm.unit)
        self.int_buffers = [n for n, b in model.named_buffers() if not b.is_floating_point()]
        self.num_slots = context.per_round
        self.round = 1
        # True after the run's last round: the trained slots were not moved on (nothing would
        # train them); a resumed run that goes further moves them at its next start_round.
        self.pending = False
        self.store = context.state.store("fedmr/slots")
        initial = self.flat(model)
        self.slots: dict[int, torch.Tensor] = {i: initial.clone() for i in self.held(1)}
        self.keep()
        self.slot_of: dict[int, int] = {}
        self.sent: set[int] = set()
        self.stats = torch.zeros(2, dtype=torch.float64, device=context.device)
        self.exchange_bytes = 0
        self.exchange_bytes_total = 0
        self.metrics: dict[str, int] = {}

    # which slots live where
    def clients_of(self, round_idx: int) -> list[int]:
        return self.context.sample(round_idx)

    def holders(self, round_idx: int) -> list[int]:
        return [owner(c, self.context.world_size) for c in self.clients_of(round_idx)]

    def held(self, round_idx: int) -> list[int]:
        return [i for i, h in enumerate(self.holders(round_idx)) if h == self.context.rank]

    def keep(self) -> None:
        """The held slots into the client store, keyed by the client each is for (shared
        tensors, no copy: training writes them in place)."""
        clients = self.clients_of(self.round)
        self.store.replace({clients[i]: {"slot": s} for i, s in self.slots.items()}, copy=False)

    def flat(self, model: nn.Module) -> torch.Tensor:
        """A fresh flat copy of `model`'s slot tensors."""
        flat = self.layout.layout.zeros(self.context.device, dtype=self.layout.dtype)
        copy_into(self.layout.layout.views(flat), named_tensors(model, self.layout.names))
        return flat

    # the ServerStep protocol
    def start_round(self, plan: RoundPlan) -> None:
        if self.pending:
            self.move_on(self.round)
        expected = self.clients_of(self.round)
        if plan.clients != expected:
            raise RuntimeError(
                f"FedMR holds the slots of round {self.round} (clients {expected}), but the "
                f"round's plan has clients {plan.clients}: restore the server's state_dict "
                "when resuming"
            )
        self.slot_of = {client: i for i, client in enumerate(plan.clients)}
        self.sent = set()
        self.stats.zero_()

    def receive(self, client: int, model: nn.Module) -> None:
        slot = self.slots[self.slot_of[client]]
        copy_into(named_tensors(model, self.layout.names), self.layout.layout.views(slot))
        global_model = self.context.global_model
        copy_into(
            named_tensors(model, self.int_buffers), named_tensors(global_model, self.int_buffers)
        )

    def send(
        self,
        client: int,
        model: nn.Module,
        weight: float,
        loss: torch.Tensor,
        upload: Upload | None = None,
    ) -> None:
        if upload is not None:
            raise ValueError("FedMR recombines whole models: it takes no upload besides them")
        slot = self.slot_of[client]
        copy_into(
            self.layout.layout.views(self.slots[slot]), named_tensors(model, self.layout.names)
        )
        self.stats[0] += loss.detach().double() * weight
        self.stats[1] += weight
        self.sent.add(slot)

    def finish(self, plan: RoundPlan) -> StepResult:
        round_idx = self.round
        if self.sent != set(self.slots):
            raise RuntimeError(
                f"FedMR round {round_idx}: slots {sorted(self.slots)} are held here but "
                f"{sorted(self.sent)} were trained"
            )
        warm_up = round_idx <= self.algorithm.first_stage_rounds
        train_loss = self.reduce(with_mean=warm_up or plan.evaluate)
        self.exchange_bytes = 0
        if round_idx < self.context.rounds:
            self.move_on(round_idx)
        else:
            self.pending = True
        self.exchange_bytes_total += self.exchange_bytes
        self.metrics = {
            "fedmr/exchange_bytes": self.exchange_bytes,
            "fedmr/exchange_bytes_total": self.exchange_bytes_total,
        }
        # every sampled client downloads its whole slot and uploads it trained: the slots
        # differ in every layer, whatever a callback freezes
        slot_bytes = len(plan.clients) * self.layout.nbytes()
        return StepResult(
            train_loss=train_loss,
            up_bytes=slot_bytes,
            down_bytes=slot_bytes,
            metrics=dict(self.metrics),
        )

    # the collectives
    def reduce(self, with_mean: bool) -> float:
        """One all-reduce: the clients' sample-weighted loss, and with `with_mean` the sum of
        the slots, whose mean (unweighted, over K) becomes the global model on every rank."""
        context = self.context
        numel = self.layout.layout.numel if with_mean else 0
        dtype = getattr(torch, context.trainer.reduce_dtype)
        buffer = torch.zeros(numel + 2, dtype=dtype, device=context.device)
        if with_mean:
            for i in sorted(self.slots):  # a fixed order: the result does not depend on timing
                buffer[:numel] += self.slots[i].to(dtype)
        buffer[numel:] = self.stats.to(dtype)
        context.comm.all_reduce_sum(buffer)
        if with_mean:
            mean = buffer[:numel] / self.num_slots
            copy_into(
                named_tensors(context.global_model, self.layout.names),
                self.layout.layout.views(mean),
            )
        loss_sum, weight = float(buffer[numel]), float(buffer[numel + 1])
        if weight <= 0:
            raise RuntimeError("no client contributed to the round")
        return loss_sum / weight

    def move_on(self, round_idx: int) -> None:
        """Give the slots trained in `round_idx` to the holders of round `round_idx + 1`."""
        if round_idx <= self.algorithm.first_stage_rounds:
            # the mean is in the global model on every rank already: no exchange needed
            mean = self.flat(self.context.global_model)
            self.slots = {i: mean.clone() for i in self.held(round_idx + 1)}
        else:
            self.exchange(round_idx)
        self.round = round_idx + 1
        self.pending = False
        self.keep()

    def exchange(self, round_idx: int) -> None:
        """Recombine with one all_to_all_single: each rank sends the units of the slots it
        holds to the ranks holding their destination slots next round."""
        context = self.context
        units = self.layout.units
        numels = self.layout.unit_numels()
        perms = unit_permutations(
            context.seed, round_idx, self.num_slots, len(units), self.algorithm.partitions
        )
        holders_now, holders_next = self.holders(round_idx), self.holders(round_idx + 1)
        plan = plan_exchange(perms, holders_now, holders_next, context.rank, context.world_size)
        send_splits, recv_splits = plan.splits(numels)
        pieces = [
            self.slots[source][slice(*units[unit])] for part in plan.send for source, unit in part
        ]
        device, dtype = context.device, self.layout.dtype
        send = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_splits), dtype=dtype, device=device)
        context.comm.all_to_all_single(send, recv, send_splits, recv_splits)

        numel = self.layout.layout.numel
        new = {i: torch.empty(numel, dtype=dtype, device=device) for i in self.held(round_idx + 1)}
        for dest, source, unit in plan.local:
            new[dest][slice(*units[unit])] = self.slots[source][slice(*units[unit])]
        offset = 0
        for part in plan.recv:
            for dest, unit in part:
                new[dest][slice(*units[unit])] = recv[offset : offset + numels[unit]]
                offset += numels[unit]
        self.slots = new
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.exchange_bytes = itemsize * sum(numels[u] for u in plan.moved_units)

    # checkpointing: the slots are client state (self.store); this is what every rank shares
    def state_dict(self) -> dict[str, Any]:
        """The round the held slots are for, whether they still await the move after the
        run's last round, and the bytes exchanged so far."""
        return {
            "round": self.round,
            "pending": self.pending,
            "exchange_bytes_total": self.exchange_bytes_total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """After the client store was loaded: take this rank's slots of the saved round."""
        self.round = int(state["round"])
        self.pending = bool(state["pending"])
        self.exchange_bytes_total = int(state.get("exchange_bytes_total", 0))
        clients = self.clients_of(self.round)
        numel = self.layout.layout.numel
        slots = {}
        for i in self.held(self.round):
            entry = self.store.get(clients[i])
            if entry is None or entry["slot"].numel() != numel:
                raise ValueError(
                    f"the checkpoint has no FedMR slot of {numel} elements for client "
                    f"{clients[i]} of round {self.round}"
                )
            slots[i] = entry["slot"].to(dtype=self.layout.dtype)
        self.slots = slots
        self.keep()
