"""Per-client state in one place: named stores of tensors, each client's entry kept on the rank
that owns the client.

A method or callback that remembers something about a client between rounds (its local BN
statistics, MOON's previous model, SCAFFOLD's control variate, LIPS's last gradient, FedMR's
slot) registers a named store once and puts and gets tensors by client id. Everything else about
checkpoints is generic: the engine gathers every rank's stores into one dict keyed by
(store, client), and on resume each rank loads the entries of the clients it owns, whatever the
number of ranks that wrote them. fedlit.resume therefore names no method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

Tensors = dict[str, torch.Tensor]


class ClientStore:
    """One named kind of per-client tensors on this rank.

    Entries live on `device`, or on the CPU with `offload` (moved back on `get`); the store
    holds one entry per client at most and copies what it is given.
    """

    def __init__(self, device: torch.device, offload: bool = False) -> None:
        self.device = torch.device(device)
        self.offload = offload
        self._entries: dict[int, Tensors] = {}

    def __contains__(self, client: int) -> bool:
        return client in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clients(self) -> list[int]:
        return sorted(self._entries)

    def put(self, client: int, tensors: Tensors, copy: bool = True) -> None:
        """Keep `tensors` for `client`: copies, unless `copy` is False and they already live
        where the store keeps them (the caller hands them over and must not reuse them)."""
        target = torch.device("cpu") if self.offload else self.device
        self._entries[client] = {k: v.detach().to(target, copy=copy) for k, v in tensors.items()}

    def get(self, client: int) -> Tensors | None:
        entry = self._entries.get(client)
        if entry is None:
            return None
        return {k: v.to(self.device, non_blocking=True) for k, v in entry.items()}

    def pop(self, client: int) -> Tensors | None:
        entry = self.get(client)
        self._entries.pop(client, None)
        return entry

    def replace(self, entries: dict[int, Tensors], copy: bool = True) -> None:
        """Hold exactly `entries` (FedMR hands its slots to next round's clients at once)."""
        self._entries = {}
        for client, tensors in entries.items():
            self.put(client, tensors, copy=copy)

    def state_dict(self) -> dict[int, Tensors]:
        return {c: {k: v.detach().cpu() for k, v in e.items()} for c, e in self._entries.items()}

    def load_state_dict(self, entries: dict[int, Tensors]) -> None:
        self.replace({int(c): dict(e) for c, e in entries.items()})


class ClientState:
    """The registry of a rank's client stores, by name (e.g. "local", "scaffold/control")."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._stores: dict[str, ClientStore] = {}

    def store(self, name: str, offload: bool = False) -> ClientStore:
        """The store called `name`, made on first use (one name, one store, per run)."""
        if name not in self._stores:
            self._stores[name] = ClientStore(self.device, offload)
        return self._stores[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stores)

    def state_dict(self) -> dict[str, dict[int, Tensors]]:
        """Every store's entries on this rank, as CPU tensors (empty stores left out)."""
        return {name: store.state_dict() for name, store in self._stores.items() if len(store)}

    def load_state_dict(
        self, state: dict[str, dict[int, Tensors]], owns: Callable[[int], bool]
    ) -> None:
        """Load the entries of the clients this rank `owns` from a checkpoint's merged state.

        Every saved store must have been registered by then (by the algorithm's setup or a
        callback's on_fit_start), so state nothing would read is an error, not silently lost.
        """
        unknown = sorted(set(state) - set(self._stores))
        if unknown:
            raise ValueError(
                f"the checkpoint holds per-client state {unknown} that no part of this run "
                f"keeps (this run keeps {sorted(self._stores)}): resume with the algorithm and "
                "callbacks that wrote it"
            )
        for name, store in self._stores.items():
            entries = state.get(name, {})
            store.load_state_dict({int(c): e for c, e in entries.items() if owns(int(c))})


def merge_states(states: list[dict[str, dict[int, Tensors]]]) -> dict[str, dict[int, Tensors]]:
    """Every rank's `ClientState.state_dict()` as one, keyed by store and client (clients are
    owned by one rank each, so nothing overlaps)."""
    merged: dict[str, dict[int, Tensors]] = {}
    for state in states:
        for name, entries in state.items():
            merged.setdefault(name, {}).update({int(c): e for c, e in entries.items()})
    return merged
