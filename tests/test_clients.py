import pytest
import torch

from fedlit.clients import (
    Stream,
    clients_per_round,
    owned_clients,
    owner,
    sample_clients,
    stream_seed,
    torch_generator,
)


def test_stream_seed_depends_on_every_key_and_nothing_else():
    base = stream_seed(0, Stream.TRAIN, 3, 7)
    assert base == stream_seed(0, Stream.TRAIN, 3, 7)
    others = {
        stream_seed(1, Stream.TRAIN, 3, 7),
        stream_seed(0, Stream.SAMPLE, 3, 7),
        stream_seed(0, Stream.TRAIN, 4, 7),
        stream_seed(0, Stream.TRAIN, 3, 8),
    }
    assert base not in others and len(others) == 4
    assert 0 <= base < 2**63


def test_torch_generator_streams_are_reproducible():
    a = torch.rand(5, generator=torch_generator(0, Stream.TRAIN, 1, 2))
    b = torch.rand(5, generator=torch_generator(0, Stream.TRAIN, 1, 2))
    c = torch.rand(5, generator=torch_generator(0, Stream.TRAIN, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_clients_is_a_seeded_sorted_subset():
    sample = sample_clients(seed=0, round_idx=1, num_clients=100, count=10)
    assert len(sample) == 10 == len(set(sample))
    assert sample == sorted(sample) and all(0 <= c < 100 for c in sample)
    assert sample == sample_clients(0, 1, 100, 10)
    assert sample != sample_clients(0, 2, 100, 10)
    assert sample_clients(0, 5, 7, 7) == list(range(7))


def test_sampling_is_uniform_over_many_rounds():
    counts = torch.zeros(20)
    for r in range(2000):
        for c in sample_clients(3, r, 20, 5):
            counts[c] += 1
    expected = 2000 * 5 / 20
    assert (counts - expected).abs().max() < 0.15 * expected


def test_ownership_splits_clients_across_ranks():
    clients = list(range(11))
    for world in (1, 2, 3, 4):
        parts = [owned_clients(clients, r, world) for r in range(world)]
        assert sorted(c for p in parts for c in p) == clients
        assert all(owner(c, world) == r for r, p in enumerate(parts) for c in p)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_clients_per_round_resolution_and_errors():
    assert clients_per_round(40, None, None) == 40
    assert clients_per_round(100, 10, None) == 10
    assert clients_per_round(100, None, 0.1) == 10
    assert clients_per_round(3, None, 0.01) == 1
    with pytest.raises(
        ValueError, match="trainer.clients_per_round must be between 1 and data.num_clients=10"
    ):
        clients_per_round(10, 11, None)
    with pytest.raises(ValueError, match="set only one of"):
        clients_per_round(10, 5, 0.5)
    with pytest.raises(ValueError, match=r"trainer.client_fraction must be in \(0, 1\]"):
        clients_per_round(10, None, 1.5)
