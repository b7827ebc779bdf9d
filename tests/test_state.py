"""fedlit.state: per-client stores, one registry per rank, checkpoints keyed by client."""

import pytest
import torch

from fedlit.clients import owner
from fedlit.state import ClientState, ClientStore, merge_states


def test_a_store_copies_what_it_is_given_and_offloads():
    store = ClientStore(torch.device("cpu"), offload=True)
    t = torch.ones(3)
    store.put(4, {"bn.running_mean": t})
    t.add_(1)
    assert torch.equal(store.get(4)["bn.running_mean"], torch.ones(3))
    assert 4 in store and 5 not in store and len(store) == 1 and store.clients() == [4]
    assert store.get(5) is None
    restored = ClientStore(torch.device("cpu"))
    restored.load_state_dict(store.state_dict())
    assert torch.equal(restored.get(4)["bn.running_mean"], torch.ones(3))
    handed = torch.zeros(2)
    restored.put(1, {"slot": handed}, copy=False)  # handed over: the same memory
    handed.add_(3)
    assert torch.equal(restored.get(1)["slot"], torch.full((2,), 3.0))
    assert restored.pop(1)["slot"].data_ptr() == handed.data_ptr() and 1 not in restored


def test_checkpoints_merge_every_rank_and_each_rank_reloads_the_clients_it_owns():
    """Two ranks' registries merge into one keyed by (store, client); on three ranks, each
    rank loads exactly the clients it now owns."""
    ranks = [ClientState(torch.device("cpu")) for _ in range(2)]
    for rank, state in enumerate(ranks):
        for client in range(6):
            if owner(client, 2) == rank:
                state.store("local").put(client, {"w": torch.full((2,), float(client))})
                state.store("moon/previous_0").put(client, {"x": torch.tensor(client)})
    merged = merge_states([s.state_dict() for s in ranks])
    assert sorted(merged) == ["local", "moon/previous_0"]
    assert sorted(merged["local"]) == list(range(6))
    for rank in range(3):
        state = ClientState(torch.device("cpu"))
        state.store("local")
        state.store("moon/previous_0")
        state.load_state_dict(merged, lambda c, r=rank: owner(c, 3) == r)
        mine = [c for c in range(6) if owner(c, 3) == rank]
        assert state.store("local").clients() == mine
        assert all(
            torch.equal(state.store("local").get(c)["w"], torch.full((2,), float(c))) for c in mine
        )


def test_state_no_part_of_the_run_keeps_is_refused():
    state = ClientState(torch.device("cpu"))
    state.store("local")
    with pytest.raises(ValueError, match=r"per-client state \['scaffold/control'\] that no part"):
        state.load_state_dict({"local": {}, "scaffold/control": {0: {}}}, lambda c: True)
