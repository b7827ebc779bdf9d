"""Federated partitions: coverage, sizes, determinism, skew and the errors for impossible splits."""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pytest
import torch

from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, Split, load_dataset
from fedlit.data.partition import (
    Partition,
    PartitionError,
    dirichlet,
    dirichlet_capped,
    iid,
    iid_overlap,
    label_counts,
    label_mix_test,
    make_partition,
    shards,
)
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import CNN
from runs import tiny_run


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def balanced_labels(num_classes: int = 10, per_class: int = 100) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    counts = label_counts(labels, parts, num_classes)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return float(terms.sum(axis=1).mean())


def label_bundle(train_labels: np.ndarray, test_labels: np.ndarray) -> DataBundle:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    return DataBundle(
        name="labels",
        train=Split(torch.zeros(len(train_labels), 2), torch.from_numpy(train_labels)),
        test=Split(torch.zeros(len(test_labels), 2), torch.from_numpy(test_labels)),
        num_classes=num_classes,
        classes=[str(c) for c in range(num_classes)],
        mean=None,
        std=None,
    )


def test_iid_covers_every_index_exactly_once_in_even_parts():
    parts = iid(103, 10, rng())
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(103))
    assert {len(p) for p in parts} == {10, 11}
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_with_samples_per_client_is_disjoint_and_exact():
    parts = iid(1000, 8, rng(), samples_per_client=100)
    assert [len(p) for p in parts] == [100] * 8
    assert len(np.unique(np.concatenate(parts))) == 800
    with pytest.raises(PartitionError, match="data.samples_per_client"):
        iid(1000, 11, rng(), samples_per_client=100)


def test_iid_overlap_draws_each_client_independently():
    parts = iid_overlap(100, 6, 60, rng())
    assert [len(p) for p in parts] == [60] * 6
    assert all(len(np.unique(p)) == 60 for p in parts)  # no repeats within a client
    assert len(np.intersect1d(parts[0], parts[1])) > 0  # 60+60 > 100: clients must overlap
    with pytest.raises(PartitionError, match="exceeds"):
        iid_overlap(100, 2, 101, rng())


def test_dirichlet_respects_min_samples_and_covers_the_data():
    labels = balanced_labels()
    parts = dirichlet(labels, 20, 0.1, rng(), min_samples=15)
    assert min(len(p) for p in parts) >= 15
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_dirichlet_is_a_function_of_the_seed():
    labels = balanced_labels()
    first = dirichlet(labels, 10, 0.5, rng(1), min_samples=10)
    again = dirichlet(labels, 10, 0.5, rng(1), min_samples=10)
    other = dirichlet(labels, 10, 0.5, rng(2), min_samples=10)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_lower_alpha_gives_more_label_skew():
    labels = balanced_labels(per_class=200)
    entropy = {
        alpha: np.mean(
            [
                mean_label_entropy(labels, dirichlet(labels, 20, alpha, rng(s), 5), 10)
                for s in range(3)
            ]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * np.log(10)  # near IID: almost uniform labels
    assert entropy[0.1] < 0.5 * np.log(10)


def test_impossible_dirichlet_fails_fast_with_advice():
    labels = balanced_labels()
    with pytest.raises(PartitionError, match="needs 1100 training samples"):
        dirichlet(labels, 11, 0.5, rng(), min_samples=100)
    start = time.perf_counter()
    with pytest.raises(PartitionError) as error:
        # Possible in principle (exactly 100 each), but Dir(0.05) never draws it.
        dirichlet(labels, 10, 0.05, rng(), min_samples=100, max_attempts=1000)
    assert time.perf_counter() - start < 2.0
    message = str(error.value)
    assert "data.max_attempts=1000" in message
    for advice in ("lower data.min_samples", "raise data.alpha", "data.num_clients"):
        assert advice in message


def test_dirichlet_with_samples_per_client_gives_exact_disjoint_sizes():
    labels = balanced_labels(per_class=300)
    parts = dirichlet(labels, 20, 0.1, rng(), min_samples=10, samples_per_client=100)
    assert [len(p) for p in parts] == [100] * 20
    assert len(np.unique(np.concatenate(parts))) == 2000
    # alpha=0.1: each client is dominated by very few classes.
    dominant = label_counts(labels, parts, 10).max(axis=1)
    assert np.median(dominant) > 50
    with pytest.raises(PartitionError, match="data.samples_per_client"):
        dirichlet(labels, 31, 0.1, rng(), min_samples=10, samples_per_client=100)


def test_shards_give_each_client_shards_per_client_label_blocks():
    labels = rng(5).permutation(balanced_labels(num_classes=10, per_class=20))
    parts = shards(labels, 10, 2, rng())  # 20 shards of 10: every shard holds one label
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(200))
    counts = label_counts(labels, parts, 10)
    assert (counts % 10 == 0).all() and (counts.sum(axis=1) == 20).all()
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert ((counts > 0).sum(axis=1) == 2).sum() >= 5  # most clients see two classes
    parts3 = shards(labels, 5, 4, rng())
    assert (label_counts(labels, parts3, 10) % 10 == 0).all()
    with pytest.raises(PartitionError, match="data.shards_per_client"):
        shards(labels[:10], 10, 2, rng())


def test_label_mix_test_follows_each_clients_training_mix():
    train_labels = balanced_labels(per_class=100)
    test_labels = rng(3).permutation(balanced_labels(per_class=30))
    parts = dirichlet(train_labels, 8, 0.3, rng(), min_samples=20)
    tests = label_mix_test([train_labels[p] for p in parts], test_labels, 50, rng(), 10)
    train_mix = label_counts(train_labels, parts, 10)
    train_mix = train_mix / train_mix.sum(axis=1, keepdims=True)
    test_counts = label_counts(test_labels, tests, 10)
    assert (test_counts.sum(axis=1) == 50).all()
    assert np.abs(test_counts - 50 * train_mix).max() < 1.0  # rounding only
    assert all(len(np.unique(t)) == len(t) for t in tests)  # enough test data: no repeats


def test_label_mix_test_reuses_samples_only_when_a_class_runs_out():
    train = [np.zeros(10, dtype=np.int64)]  # the client only knows class 0
    test_labels = np.array([0, 0, 0, 1, 1])
    (indices,) = label_mix_test(train, test_labels, 7, rng(), 2)
    assert len(indices) == 7 and set(indices.tolist()) == {0, 1, 2}
    assert np.bincount(indices).max() == 3  # two whole copies plus one without replacement


def test_label_counts_shape_and_totals():
    labels = np.array([0, 1, 1, 2, 2, 2])
    counts = label_counts(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    assert counts.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_make_partition_depends_only_on_the_seed():
    bundle = load_dataset(DataConfig())
    config = DataConfig(
        partition="dirichlet", alpha=0.3, local_test="label_mix", local_test_size=20
    )
    first = make_partition(config, bundle, seed=7)
    again = make_partition(config, bundle, seed=7)
    other = make_partition(config, bundle, seed=8)
    assert isinstance(first, Partition) and len(first.train) == len(first.test) == 10
    assert first.sizes() == [len(p) for p in first.train] and sum(first.sizes()) == 1437
    for a, b in zip(first.train + first.test, again.train + again.test, strict=True):
        assert np.array_equal(a, b)
    assert first.sizes() != other.sizes()
    assert all(len(t) == 20 for t in first.test)


def test_make_partition_dispatches_every_scheme():
    bundle = load_dataset(DataConfig())
    sizes = {
        "iid": make_partition(DataConfig(num_clients=7), bundle, 0).sizes(),
        "iid_overlap": make_partition(
            DataConfig(num_clients=7, partition="iid_overlap", samples_per_client=300), bundle, 0
        ).sizes(),
        "shards": make_partition(DataConfig(num_clients=7, partition="shards"), bundle, 0).sizes(),
    }
    assert sum(sizes["iid"]) == 1437 and sizes["iid_overlap"] == [300] * 7
    assert sum(sizes["shards"]) == 1437
    assert make_partition(DataConfig(num_clients=7), bundle, 0).test is None


def test_natural_partition_uses_the_datasets_own_split():
    config = DataConfig(
        dataset="synthetic", num_clients=5, partition="natural", local_test="natural"
    )
    bundle = load_dataset(config)
    partition = make_partition(config, bundle, seed=0)
    for mine, theirs in zip(partition.train, bundle.natural_train, strict=True):
        assert np.array_equal(mine, theirs)
    assert len(partition.test) == 5
    with pytest.raises(PartitionError, match="set data.num_clients=5"):
        make_partition(
            DataConfig(dataset="synthetic", num_clients=6, partition="natural"), bundle, 0
        )


def test_every_client_needs_a_training_sample():
    bundle = label_bundle(np.arange(5) % 2, np.array([0, 1]))
    with pytest.raises(PartitionError, match="data.num_clients=8"):
        make_partition(DataConfig(num_clients=8), bundle, 0)


# ---- FedMR's capped Dirichlet split -----------------------------------------------------------


def test_capped_dirichlet_gives_no_later_class_to_a_full_client():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    rng.shuffle(labels)
    clients = 20
    parts = dirichlet_capped(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))  # a partition
    assert min(len(p) for p in parts) >= 10
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    cap = len(labels) / clients
    held = np.zeros(clients)
    for c in range(10):  # classes are dealt in order; full clients get none of class c
        assert np.all(counts[held >= cap, c] == 0), c
        held += counts[:, c]
    # the cap keeps the largest client far below the uncapped rule's
    uncapped = dirichlet(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert max(len(p) for p in parts) < max(len(p) for p in uncapped)
    again = dirichlet_capped(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_capped_dirichlet_fails_with_a_message_instead_of_looping():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(PartitionError, match="dirichlet_capped: 30 clients x data.min_samples"):
        dirichlet_capped(labels, 30, 0.1, np.random.default_rng(0), min_samples=10)
    with pytest.raises(PartitionError, match="could not give each of the 5 clients"):
        dirichlet_capped(labels, 5, 0.01, np.random.default_rng(0), min_samples=4, max_attempts=3)


def test_capped_dirichlet_is_a_partition_setting(tmp_path):
    data = DataConfig(num_clients=10, partition="dirichlet_capped", alpha=0.3, min_samples=10)
    fit(tiny_run(tmp_path, model=partial(CNN, padding=2), data=data, rounds=1))
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["test/acc"] > 0
    with pytest.raises(ValueError, match="data.samples_per_client is only used by"):
        DataConfig(partition="dirichlet_capped", samples_per_client=20)
