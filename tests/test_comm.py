import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fedlit.algorithms.fedavg import WeightedSum, weighted_average
from fedlit.comm import Communicator, FlatLayout, copy_into, named_tensors
from runs import free_port


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_flat_layout_views_alias_the_buffer():
    model = small_model()
    names = ["0.weight", "1.running_mean", "2.bias"]
    layout = FlatLayout.of(model, names)
    assert layout.numel == 12 + 4 + 2
    assert layout.nbytes() == 4 * 18
    flat = layout.zeros(torch.device("cpu"), extra=1)
    views = layout.views(flat)
    assert [v.shape for v in views] == [torch.Size([4, 3]), torch.Size([4]), torch.Size([2])]
    copy_into(views, named_tensors(model, names))
    assert torch.equal(flat[:12], model[0].weight.detach().reshape(-1))
    assert flat[-1] == 0


def test_named_tensors_rejects_unknown_names():
    with pytest.raises(KeyError, match="no parameter or buffer named 'nope'"):
        named_tensors(small_model(), ["nope"])


def test_weighted_sum_matches_the_reference_average_on_one_rank():
    models = [small_model() for _ in range(3)]
    for i, m in enumerate(models):
        for p in m.parameters():
            p.data.add_(float(i))
    names = [n for n, _ in models[0].named_parameters()]
    weights = [10.0, 30.0, 60.0]
    layout = FlatLayout.of(models[0], names)
    summed = WeightedSum(layout, torch.device("cpu"))
    for m, w in zip(models, weights, strict=True):
        summed.add(named_tensors(m, names), w, loss=2.0)
    comm = Communicator(world_size=1)
    averaged, total, loss_sum, _, _ = summed.reduce(comm)
    expected = weighted_average(
        [(named_tensors(m, names), w) for m, w in zip(models, weights, strict=True)]
    )
    assert total == 100.0 and loss_sum == 200.0
    for a, e in zip(averaged, expected, strict=True):
        torch.testing.assert_close(a.float(), e)
    # the mean of (p + i) with weights .1/.3/.6 is p + 1.5
    torch.testing.assert_close(averaged[0].float(), models[0][0].weight.detach() + 1.5)
    assert comm.calls == 1 and comm.collective_bytes == 8 * (layout.numel + 2)  # float64 sums


def test_weighted_average_rejects_zero_weight():
    with pytest.raises(ValueError, match="positive total weight"):
        weighted_average([([torch.ones(2)], 0.0)])


def _two_rank_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layout = FlatLayout(["w"], [torch.Size([4])])
        summed = WeightedSum(layout, torch.device("cpu"))
        # rank 0 holds clients 0 and 2, rank 1 holds client 1
        for client in (0, 2) if rank == 0 else (1,):
            summed.add([torch.full((4,), float(client))], weight=client + 1.0, loss=0.5)
        comm = Communicator(world_size=2)
        averaged, total, loss_sum, _, _ = summed.reduce(comm)
        queue.put((rank, averaged[0].tolist(), total, loss_sum, comm.calls))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_weighted_sum_over_two_gloo_ranks_is_one_all_reduce():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_two_rank_worker, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    # weights 1, 2, 3 on values 0, 1, 2: (0 + 2 + 6) / 6
    for _rank, values, total, loss_sum, calls in results:
        assert values == pytest.approx([8 / 6] * 4)
        assert total == 6.0 and loss_sum == 3.0 and calls == 1
