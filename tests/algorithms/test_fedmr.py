"""FedMR: the recombination as a permutation per unit, the warm-up as FedAvg, the all-to-all's
bytes, and the same slots with 1 and 2 ranks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fedlit.algorithms import FedAvg, FedMR, weighted_average
from fedlit.algorithms.fedmr import (
    plan_exchange,
    recombine,
    slot_layout,
    unit_blocks,
    unit_permutations,
)
from fedlit.clients import owner, sample_clients
from fedlit.comm import Communicator, named_tensors
from fedlit.config import LoggerConfig, TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.engine import RunConfig, plan_round, prepare, run_round
from fedlit.models import CNN, VGG11, ResNet20
from fedlit.state import ClientState
from runs import free_port, join_as_torchrun_rank

NUM_CLIENTS, PER_ROUND = 6, 4
TINY_VGG = partial(VGG11, cfg=(8, "M", 16, "M"))  # conv+BN layers: slots carry BN statistics


def make_run(tmp_path, algorithm, rounds=2, model=TINY_VGG, callbacks=(), eval_every=1, **data):
    data_settings = dict(dataset="digits", num_clients=NUM_CLIENTS, partition="dirichlet")
    data_settings.update(alpha=0.5, min_samples=20)
    data_settings.update(data)
    return RunConfig(
        seed=3,
        run_dir=tmp_path / "run",
        trainer=TrainerConfig(
            rounds=rounds,
            devices=1,
            accelerator="cpu",
            clients_per_round=PER_ROUND,
            local_epochs=1,
            batch_size=32,
            optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.5),
            cpu_threads=1,
            eval_every=eval_every,
        ),
        data=DataConfig(**data_settings),
        model=model,
        algorithm=algorithm,
        callbacks=list(callbacks),
        logger=LoggerConfig(quiet=True),
    )


class KeepTrained:
    """Keeps each client's received and trained slot tensors (in the server's slot layout)."""

    def __init__(self) -> None:
        self.received: dict[tuple[int, int], torch.Tensor] = {}
        self.trained: dict[tuple[int, int], torch.Tensor] = {}
        self.names: list[str] = []

    def flat(self, model) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in named_tensors(model, self.names)])

    def on_client_start(self, round, client, model):
        self.received[(round, client)] = self.flat(model)

    def on_client_end(self, round, client, model):
        self.trained[(round, client)] = self.flat(model)


def trained_slots(keep: KeepTrained, round_idx: int, when: str = "trained") -> list[torch.Tensor]:
    clients = sample_clients(3, round_idx, NUM_CLIENTS, PER_ROUND)
    return [getattr(keep, when)[(round_idx, c)] for c in clients]


def held_slots(fed) -> list[torch.Tensor]:
    slots = fed.server.slots
    assert sorted(slots) == list(range(PER_ROUND))  # one rank holds every slot
    return [slots[i].clone() for i in range(PER_ROUND)]


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(first_stage_rounds=-1), "algorithm.first_stage_rounds must be an integer >= 0"),
        (dict(unit="block"), "algorithm.unit must be 'layer' or 'tensor', got 'block'"),
        (dict(partitions=0), "algorithm.partitions must be an integer >= 1"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedMR(**kwargs)


def test_more_partitions_than_units_is_refused_before_training():
    model = CNN(10, (1, 8, 8), padding=2)
    FedMR(partitions=5).build_model(model)  # 5 layers
    FedMR(unit="tensor", partitions=10).build_model(model)  # 5 weights + 5 biases
    with pytest.raises(ValueError, match=r"algorithm.partitions must be between 1 and .* \(5\)"):
        FedMR(partitions=6).build_model(model)


# --- units and permutations --------------------------------------------------------------------


def test_units_follow_the_layer_map_and_skip_integer_buffers():
    model = ResNet20(10, (3, 8, 8))
    by_layer = slot_layout(model, model.layer_map(), "layer")
    by_tensor = slot_layout(model, model.layer_map(), "tensor")
    floats = [n for n, b in model.named_buffers() if b.is_floating_point()]
    expected = sum(p.numel() for p in model.parameters())
    expected += sum(dict(model.named_buffers())[n].numel() for n in floats)
    for layout in (by_layer, by_tensor):
        assert not any(n.endswith("num_batches_tracked") for n in layout.names)
        assert layout.units[0][0] == 0 and layout.units[-1][1] == expected
        assert all(a[1] == b[0] for a, b in zip(layout.units, layout.units[1:], strict=False))
    assert by_layer.unit_names == [layer.name for layer in model.layer_map()]  # 23 layers
    assert len(by_tensor.units) == len(list(model.parameters())) + len(floats)
    # a layer unit keeps a conv with the BN that feeds it, statistics included
    first_block = by_layer.unit_names.index("s1.b0.conv1")
    start, stop = by_layer.units[first_block]
    bn, conv = model.s1.b0.bn1, model.s1.b0.conv1
    assert stop - start == conv.weight.numel() + 4 * bn.num_features


def test_permutations_are_seeded_per_round_and_shared_within_blocks():
    perms = unit_permutations(seed=0, round_idx=4, num_slots=10, num_units=7)
    assert perms.shape == (7, 10)
    for row in perms:
        assert sorted(row) == list(range(10))
    assert np.array_equal(perms, unit_permutations(0, 4, 10, 7))
    assert not np.array_equal(perms, unit_permutations(0, 5, 10, 7))
    assert len({tuple(row) for row in perms}) == 7  # a fresh permutation per unit
    assert unit_blocks(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    blocked = unit_permutations(0, 4, 10, 7, partitions=3)
    assert [len({tuple(r) for r in blocked[a:b]}) for a, b in ((0, 3), (3, 5), (5, 7))] == [1] * 3
    assert len({tuple(row) for row in blocked}) == 3
    # one block per unit is the unpartitioned draw
    assert np.array_equal(unit_permutations(0, 4, 10, 7, partitions=7), perms)


def test_the_exchange_routes_every_unit_once_and_both_ends_agree_on_the_order():
    rng = np.random.default_rng(0)
    slots, units, world = 7, 5, 3
    perms = np.stack([rng.permutation(slots) for _ in range(units)])
    now, after = [0, 0, 1, 2, 2, 1, 0], [1, 2, 2, 0, 0, 1, 1]
    numels = [3, 10, 1, 4, 6]
    plans = [plan_exchange(perms, now, after, rank, world) for rank in range(world)]
    delivered = Counter()
    for rank, plan in enumerate(plans):
        for dest, source, unit in plan.local:
            assert now[source] == after[dest] == rank and perms[unit, dest] == source
            delivered[(dest, unit)] += 1
        for peer in range(world):
            sent = plans[peer].send[rank]  # what peer sends to this rank, in wire order
            received = plan.recv[peer]
            assert [u for _, u in sent] == [u for _, u in received]
            for (source, unit), (dest, unit_r) in zip(sent, received, strict=True):
                assert perms[unit, dest] == source and now[source] == peer != rank
                delivered[(dest, unit_r)] += 1
    assert delivered == Counter({(i, u): 1 for i in range(slots) for u in range(units)})
    # the bytes: every (slot, unit) whose source and destination ranks differ, nothing else
    crossing = [
        numels[u] for i in range(slots) for u in range(units) if now[perms[u, i]] != after[i]
    ]
    assert sum(numels[u] for u in plans[0].moved_units) == sum(crossing)
    for rank, plan in enumerate(plans):
        send, recv = plan.splits(numels)
        assert send[rank] == recv[rank] == 0  # local units are copied, not sent
        expected = [
            sum(
                numels[u]
                for i in range(slots)
                for u in range(units)
                if now[perms[u, i]] == rank and after[i] == d != rank
            )
            for d in range(world)
        ]
        assert send == expected
    assert sum(sum(p.splits(numels)[0]) for p in plans) == sum(crossing)


def test_one_rank_all_to_all_is_a_local_copy_that_is_counted():
    comm = Communicator(world_size=1)
    recv = torch.zeros(3)
    comm.all_to_all_single(torch.arange(3.0), recv, [3], [3])
    assert recv.tolist() == [0.0, 1.0, 2.0]
    assert comm.calls == 1 and comm.collective_bytes == 12
    with pytest.raises(ValueError, match="one split per rank"):
        comm.all_to_all_single(torch.zeros(2), torch.zeros(2), [1, 1], [2])


# --- the server in the engine, one rank --------------------------------------------------------


@pytest.mark.parametrize(("unit", "partitions"), [("layer", 1), ("tensor", 1), ("tensor", 3)])
def test_recombination_is_a_permutation_of_each_unit(tmp_path, unit, partitions):
    keep = KeepTrained()
    algorithm = FedMR(unit=unit, partitions=partitions)
    fed = prepare(make_run(tmp_path, algorithm, rounds=2, callbacks=[keep]))
    keep.names = fed.server.layout.names
    units = fed.server.layout.units
    calls_before = fed.comm.calls
    run_round(fed, 1)
    # the mean (evaluation round), the all-to-all and the evaluation's per-batch sums
    assert fed.comm.calls - calls_before == 3
    old, new = trained_slots(keep, 1), held_slots(fed)
    perms = unit_permutations(3, 1, PER_ROUND, len(units), partitions)
    blocks = unit_blocks(len(units), partitions)
    for u, v in zip(range(len(units)), range(1, len(units)), strict=False):
        if blocks[u] == blocks[v]:  # the partitioned variant: one permutation per block
            assert np.array_equal(perms[u], perms[v])
    for u, (start, stop) in enumerate(units):
        before = Counter(tuple(s[start:stop].tolist()) for s in old)
        after = Counter(tuple(s[start:stop].tolist()) for s in new)
        assert after == before and len(before) == PER_ROUND  # trained slots all differ
        for i in range(PER_ROUND):
            assert torch.equal(new[i][start:stop], old[perms[u, i]][start:stop])
    # slots were really mixed: some new slot takes its units from several trained ones
    assert any(len({int(perms[u, i]) for u in range(len(units))}) > 1 for i in range(PER_ROUND))
    assert all(torch.equal(a, b) for a, b in zip(new, recombine(old, perms, units), strict=True))
    # the global model is the unweighted mean, which recombination does not change
    mean = torch.stack(old).double().mean(0).float()
    glob = torch.cat([t.detach().reshape(-1) for t in named_tensors(fed.global_model, keep.names)])
    torch.testing.assert_close(glob, mean, rtol=0, atol=1e-6)
    # the i-th client of round 2 starts from recombined slot i
    run_round(fed, 2)
    received = trained_slots(keep, 2, "received")
    assert all(torch.equal(a, b) for a, b in zip(received, new, strict=True))
    assert fed.server.pending and fed.server.state_dict()["round"] == 2
    # the held slots are client state, keyed by the client that trains each next
    clients = sample_clients(3, 2, NUM_CLIENTS, PER_ROUND)
    store = fed.context.state.store("fedmr/slots")
    assert store.clients() == sorted(clients)


def test_warm_up_rounds_are_fedavg_with_equal_weights(tmp_path):
    keep = KeepTrained()
    # equal sizes: FedAvg's sample weights are then equal too
    data = dict(partition="iid", samples_per_client=100)
    fed = prepare(make_run(tmp_path, FedMR(first_stage_rounds=2), 3, callbacks=[keep], **data))
    keep.names = fed.server.layout.names
    layout = fed.server.layout.layout
    for round_idx in (1, 2):
        metrics = run_round(fed, round_idx)
        trained = trained_slots(keep, round_idx)
        expected = weighted_average([(layout.views(s), 1.0) for s in trained])
        glob = named_tensors(fed.global_model, keep.names)
        for got, want in zip(glob, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for slot in held_slots(fed):  # every slot of the next round starts from the average
            assert torch.equal(slot, fed.server.flat(fed.global_model))
        assert fed.server.exchange_bytes == 0 and metrics["train/loss"] > 0
    fedavg = prepare(make_run(tmp_path / "avg", FedAvg(), 3, **data))
    for round_idx in (1, 2):
        run_round(fedavg, round_idx)
    for got, want in zip(
        named_tensors(fed.global_model, keep.names),
        named_tensors(fedavg.global_model, keep.names),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_state_dict_round_trip_and_resume_past_the_last_round(tmp_path):
    keep = KeepTrained()
    fed = prepare(make_run(tmp_path, FedMR(), 1, model=partial(CNN, padding=2), callbacks=[keep]))
    keep.names = fed.server.layout.names
    with pytest.raises(RuntimeError, match="holds the slots of round 1"):
        fed.server.start_round(plan_round(fed, 2))
    run_round(fed, 1)
    state = fed.server.state_dict()
    assert state["round"] == 1 and state["pending"]  # the last round's slots were not moved
    saved = fed.context.state.state_dict()
    held = {i: s.clone() for i, s in fed.server.slots.items()}
    # a fresh server on a fresh registry, as a resumed process has: the slots come back
    fresh_context = dataclasses.replace(fed.context, state=ClientState(torch.device("cpu")))
    fresh = FedMR().make_server(fresh_context)
    fresh_context.state.load_state_dict(saved, fresh_context.owns)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.slots[i], held[i]) for i in range(PER_ROUND))
    first = sample_clients(3, 1, NUM_CLIENTS, PER_ROUND)[0]
    del saved["fedmr/slots"][first]
    fresh_context.state.load_state_dict(saved, fresh_context.owns)
    with pytest.raises(ValueError, match=f"no FedMR slot of .* for client {first} of round 1"):
        fresh.load_state_dict(state)
    # a run extended past its last round recombines the held slots when the next round starts
    fed.run.trainer.rounds = 2
    run_round(fed, 2)
    assert fed.server.round == 2 and fed.server.pending  # round 2 is the new last round
    perms = unit_permutations(3, 1, PER_ROUND, len(fed.server.layout.units))
    expected = recombine([held[i] for i in range(PER_ROUND)], perms, fed.server.layout.units)
    received = trained_slots(keep, 2, "received")
    assert all(torch.equal(a, b) for a, b in zip(received, expected, strict=True))


# --- 1 rank against 2 ranks --------------------------------------------------------------------

ROUNDS, WARM_UP = 4, 1


def two_rank_algorithm() -> FedMR:
    return FedMR(first_stage_rounds=WARM_UP)


def run_rounds(fed, rounds: int) -> dict:
    """Slots after each round, the bytes each all-to-all sent, the final global model."""
    sent: list[int] = []  # bytes this rank put into each all-to-all
    original = fed.comm.all_to_all_single

    def recording(send, recv, send_splits, recv_splits):
        sent.append(send.numel() * send.element_size())
        return original(send, recv, send_splits, recv_splits)

    fed.comm.all_to_all_single = recording
    slots, exchanged = [], []
    for round_idx in range(1, rounds + 1):
        run_round(fed, round_idx)
        slots.append({i: s.clone() for i, s in fed.server.slots.items()})
        exchanged.append(fed.server.exchange_bytes)
    return {
        "slots": slots,
        "sent": sent,
        "exchanged": exchanged,
        "global": {k: v.clone() for k, v in fed.global_model.state_dict().items()},
    }


def _two_rank_worker(rank: int, port: int, run_dir: str) -> None:
    join_as_torchrun_rank(rank, port)
    run = make_run(Path(run_dir), two_rank_algorithm(), rounds=ROUNDS, eval_every=2)
    try:
        fed = prepare(run)
        assert fed.context.world_size == 2
        # a file, not a queue: shared-memory tensors would die with this process
        torch.save(run_rounds(fed, ROUNDS), Path(run_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.multiprocess
def test_one_and_two_ranks_give_the_same_slots_and_move_the_expected_bytes(tmp_path):
    one_rank = make_run(tmp_path / "one", two_rank_algorithm(), rounds=ROUNDS, eval_every=2)
    one = run_rounds(prepare(one_rank), ROUNDS)
    two_dir = tmp_path / "two"
    two_dir.mkdir()
    mp.start_processes(
        _two_rank_worker, args=(free_port(), str(two_dir)), nprocs=2, start_method="spawn"
    )
    two = {rank: torch.load(two_dir / f"rank{rank}.pt") for rank in (0, 1)}

    fed_model = TINY_VGG(10, (1, 8, 8))
    layout = slot_layout(fed_model, fed_model.layer_map(), "layer")
    numels = layout.unit_numels()
    for r in range(ROUNDS):
        clients = sample_clients(3, r + 2 if r < ROUNDS - 1 else r + 1, NUM_CLIENTS, PER_ROUND)
        # each rank holds exactly the slots of the clients it runs next (more slots than ranks)
        for rank in (0, 1):
            expected = [i for i, c in enumerate(clients) if owner(c, 2) == rank]
            assert sorted(two[rank]["slots"][r]) == expected
        merged = {**two[0]["slots"][r], **two[1]["slots"][r]}
        assert sorted(merged) == sorted(one["slots"][r])
        for i, slot in one["slots"][r].items():
            assert torch.equal(slot, merged[i]), (r, i)
    for key, tensor in one["global"].items():
        assert torch.equal(tensor, two[0]["global"][key]) and torch.equal(
            tensor, two[1]["global"][key]
        ), key

    # bytes: from the permutations and ownership alone
    expected_sent = {0: [], 1: []}
    expected_total = []
    for r in range(WARM_UP + 1, ROUNDS):  # recombination rounds that have a next round
        now = [owner(c, 2) for c in sample_clients(3, r, NUM_CLIENTS, PER_ROUND)]
        after = [owner(c, 2) for c in sample_clients(3, r + 1, NUM_CLIENTS, PER_ROUND)]
        perms = unit_permutations(3, r, PER_ROUND, len(numels))
        per_rank = {0: 0, 1: 0}
        for i in range(PER_ROUND):
            for u, n in enumerate(numels):
                if now[perms[u, i]] != after[i]:
                    per_rank[now[perms[u, i]]] += 4 * n
        for rank in (0, 1):
            expected_sent[rank].append(per_rank[rank])
        expected_total.append(per_rank[0] + per_rank[1])
    assert sum(expected_total) > 0  # this seed really moves units between the ranks
    for rank in (0, 1):
        assert two[rank]["sent"] == expected_sent[rank]  # one all-to-all per such round
        exchanged = two[rank]["exchanged"]
        assert exchanged[WARM_UP : ROUNDS - 1] == expected_total
        assert exchanged[:WARM_UP] == [0] * WARM_UP and exchanged[-1] == 0
    assert one["sent"] == [0] * len(expected_total) and one["exchanged"] == [0] * ROUNDS
