"""Splitting a dataset across clients: pure, seeded functions over label arrays.

Every function takes an explicit `np.random.Generator` and returns per-client index arrays
(int64, sorted), so a split is a function of the seed alone. `make_partition` derives its
generator from the run seed and a fixed stream constant, never from a rank, so every rank
computes the same split on its own and no partition ever has to be communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle

# Second entry of the SeedSequence: keeps the partition stream apart from the other uses of the
# run seed (model init, batch order), so changing one never reshuffles the others.
PARTITION_STREAM = 0x70617274  # "part"


class PartitionError(ValueError):
    """A requested split that cannot be produced (instead of looping forever or going empty)."""


@dataclass
class Partition:
    train: list[np.ndarray]  # per-client indices into bundle.train (int64)
    test: list[np.ndarray] | None  # per-client indices into bundle.test, or None

    def sizes(self) -> list[int]:
        """Training samples per client: the FedAvg aggregation weights n_k."""
        return [len(indices) for indices in self.train]


def iid(
    n: int, num_clients: int, rng: np.random.Generator, samples_per_client: int | None = None
) -> list[np.ndarray]:
    """Shuffle and split evenly (sizes differ by at most one), each sample used once.

    With `samples_per_client` each client gets exactly that many disjoint samples and the rest
    of the data set is left out (LIPS' small-client setting).
    """
    order = rng.permutation(n)
    if samples_per_client is None:
        return [np.sort(part) for part in np.array_split(order, num_clients)]
    if num_clients * samples_per_client > n:
        raise PartitionError(
            f"iid: {num_clients} clients x {samples_per_client} disjoint samples needs "
            f"{num_clients * samples_per_client}, the training set has {n}; lower "
            "data.samples_per_client or data.num_clients, or use data.partition=iid_overlap"
        )
    blocks = order[: num_clients * samples_per_client].reshape(num_clients, samples_per_client)
    return [np.sort(block) for block in blocks]


def iid_overlap(
    n: int, num_clients: int, samples_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Each client draws its samples independently, so clients may share samples (FedPart)."""
    if samples_per_client > n:
        raise PartitionError(
            f"iid_overlap: data.samples_per_client={samples_per_client} exceeds the "
            f"{n} training samples"
        )
    return [np.sort(rng.choice(n, samples_per_client, replace=False)) for _ in range(num_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int,
    samples_per_client: int | None = None,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split with Dirichlet(alpha) proportions; disjoint clients.

    Without `samples_per_client` (Hsu et al. 2019): every class is divided among the clients in
    proportions drawn from Dir(alpha); the whole draw is repeated until every client has at
    least `min_samples`. Sample counts are settled before any index is touched, so a redraw
    costs one Dirichlet draw.

    With `samples_per_client` (LIPS: 100 each): each client draws its own label mix q_k from
    Dir(alpha) over the classes, its per-class counts are samples_per_client * q_k rounded to
    integers that sum exactly to samples_per_client (largest remainder), and the samples are
    taken without replacement from per-class pools shared by all clients. A draw that asks a
    class for more samples than it has is redrawn.
    """
    labels = np.asarray(labels)
    n, num_classes = len(labels), int(labels.max()) + 1
    needed = num_clients * (samples_per_client or min_samples)
    if needed > n:
        what = "data.samples_per_client" if samples_per_client else "data.min_samples"
        raise PartitionError(
            f"dirichlet: {num_clients} clients x {what}={samples_per_client or min_samples} "
            f"needs {needed} training samples, the training set has {n}; lower {what} or "
            "data.num_clients"
        )
    if samples_per_client is not None and samples_per_client < min_samples:
        raise PartitionError(
            f"dirichlet: data.samples_per_client={samples_per_client} is below "
            f"data.min_samples={min_samples}"
        )
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    class_sizes = np.array([len(pool) for pool in pools])
    if samples_per_client is None:
        counts = _class_split_counts(
            class_sizes, num_clients, alpha, rng, min_samples, max_attempts
        )
    else:
        counts = _client_mix_counts(
            class_sizes, num_clients, alpha, rng, samples_per_client, max_attempts
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, pool in enumerate(pools):
        bounds = np.concatenate([[0], np.cumsum(counts[:, c])])
        for k in range(num_clients):
            parts[k].append(pool[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def _class_split_counts(
    class_sizes: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int,
    max_attempts: int,
) -> np.ndarray:
    """(clients, classes) counts: each class cut by Dir(alpha), redrawn until min_samples hold."""
    best = 0
    for _ in range(max_attempts):
        proportions = rng.dirichlet(np.full(num_clients, alpha), size=len(class_sizes))
        bounds = np.rint(np.cumsum(proportions, axis=1) * class_sizes[:, None]).astype(np.int64)
        bounds[:, -1] = class_sizes  # guard against float round-off losing the last sample
        counts = np.diff(bounds, axis=1, prepend=0).T
        smallest = int(counts.sum(axis=1).min())
        if smallest >= min_samples:
            return counts
        best = max(best, smallest)
    raise PartitionError(
        f"dirichlet: could not give each of the {num_clients} clients >= data.min_samples="
        f"{min_samples} training samples in data.max_attempts={max_attempts} draws with "
        f"data.alpha={alpha} (best draw: smallest client had {best}); lower data.min_samples, "
        "raise data.alpha, use fewer clients (data.num_clients) or raise data.max_attempts"
    )


def dirichlet_capped(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_samples: int,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """FedMR's label-skewed split (Hu et al., KDD 2024; `separate_data` in its official code).

    Classes are dealt in order 0, 1, ...: each class's samples are shuffled and cut among the
    clients in proportions drawn from Dir(alpha), except that a client already holding at least
    N / num_clients samples (N the training set's size) gets no share of this class or any later
    one; the other proportions are renormalised and the cut points are
    floor(cumsum(p) * class size). The whole draw is repeated until every client has at least
    `min_samples` (official: 10). The cap keeps the largest clients smaller than `dirichlet`'s.
    """
    labels = np.asarray(labels)
    n, num_classes = len(labels), int(labels.max()) + 1
    if num_clients * min_samples > n:
        raise PartitionError(
            f"dirichlet_capped: {num_clients} clients x data.min_samples={min_samples} needs "
            f"{num_clients * min_samples} training samples, the training set has {n}; lower "
            "data.min_samples or data.num_clients"
        )
    best = 0
    for _ in range(max_attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for c in range(num_classes):
            pool = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            proportions = proportions * (sizes < n / num_clients)
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(pool)).astype(np.int64)[:-1]
            for k, piece in enumerate(np.split(pool, cuts)):
                parts[k].append(piece)
                sizes[k] += len(piece)
        smallest = int(sizes.min())
        if smallest >= min_samples:
            return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        best = max(best, smallest)
    raise PartitionError(
        f"dirichlet_capped: could not give each of the {num_clients} clients >= "
        f"data.min_samples={min_samples} training samples in data.max_attempts={max_attempts} "
        f"draws with data.alpha={alpha} (best draw: smallest client had {best}); lower "
        "data.min_samples, raise data.alpha, use fewer clients or raise data.max_attempts"
    )


def _client_mix_counts(
    class_sizes: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    samples_per_client: int,
    max_attempts: int,
) -> np.ndarray:
    """(clients, classes) counts: rows sum to samples_per_client, columns fit the classes."""
    present = np.flatnonzero(class_sizes)
    for _ in range(max_attempts):
        mix = rng.dirichlet(np.full(len(present), alpha), size=num_clients)
        counts = np.zeros((num_clients, len(class_sizes)), dtype=np.int64)
        counts[:, present] = _round_to_total(mix * samples_per_client, samples_per_client)
        if (counts.sum(axis=0) <= class_sizes).all():
            return counts
    raise PartitionError(
        f"dirichlet: in data.max_attempts={max_attempts} draws with data.alpha={alpha}, "
        f"{num_clients} clients x data.samples_per_client={samples_per_client} always asked "
        "some class for more samples than it has; lower data.samples_per_client or "
        "data.num_clients, or raise data.alpha"
    )


def _round_to_total(values: np.ndarray, total: int) -> np.ndarray:
    """Round each row of non-negative `values` to integers summing to `total` (largest remainder)."""
    values = np.atleast_2d(values)
    floor = np.floor(values).astype(np.int64)
    missing = total - floor.sum(axis=1)
    order = np.argsort(-(values - floor), axis=1, kind="stable")
    for row, extra in enumerate(missing):
        floor[row, order[row, :extra]] += 1
    return floor


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """McMahan et al.'s pathological split: sort by label, cut into equal shards, deal them out.

    With 2 shards per client most clients see only two classes. Samples of a class are shuffled
    before sorting, so which samples land in a shard is random too.
    """
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise PartitionError(
            f"shards: {num_clients} clients x data.shards_per_client={shards_per_client} "
            f"shards needs at least {num_shards} training samples, the training set has "
            f"{len(labels)}"
        )
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def label_mix_test(
    train_labels_per_client: Sequence[np.ndarray],
    test_labels: np.ndarray,
    size: int,
    rng: np.random.Generator,
    num_classes: int,
) -> list[np.ndarray]:
    """Per-client test indices whose label mix follows the client's training mix (LIPS).

    Class counts are `size` * training proportions, rounded to sum to `size`. Within a client a
    class is drawn without replacement while the test set has enough of it; beyond that, whole
    copies of the class are used before any sample repeats a third time. Clients draw
    independently, so they may share test samples (100 clients x 400 exceeds CIFAR's 10,000).
    """
    test_labels = np.asarray(test_labels)
    pools = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    result = []
    for k, train_labels in enumerate(train_labels_per_client):
        if len(train_labels) == 0:
            raise PartitionError(f"label_mix test split: client {k} has no training samples")
        mix = np.bincount(train_labels, minlength=num_classes) / len(train_labels)
        counts = _round_to_total(mix * size, size)[0]
        parts = []
        for c in np.flatnonzero(counts):
            pool = pools[c]
            if len(pool) == 0:
                raise PartitionError(
                    f"label_mix test split: client {k} trains on class {c}, which has no test "
                    "samples; use data.local_test=none"
                )
            copies, rest = divmod(int(counts[c]), len(pool))
            parts.extend([pool] * copies)
            parts.append(rng.choice(pool, rest, replace=False))
        result.append(np.sort(np.concatenate(parts)).astype(np.int64))
    return result


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) sample counts, for tables, heat maps and skew metrics."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]).astype(np.int64)


def make_partition(config: DataConfig, bundle: DataBundle, seed: int) -> Partition:
    """The split named by `config.partition` (+ `config.local_test`), a function of `seed` only."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, PARTITION_STREAM]))
    labels = bundle.train.y.numpy()
    n, clients = len(labels), config.num_clients
    if config.partition == "iid":
        train = iid(n, clients, rng, config.samples_per_client)
    elif config.partition == "iid_overlap":
        assert config.samples_per_client is not None  # enforced by DataConfig
        train = iid_overlap(n, clients, config.samples_per_client, rng)
    elif config.partition == "dirichlet":
        train = dirichlet(
            labels,
            clients,
            config.alpha,
            rng,
            config.min_samples,
            config.samples_per_client,
            config.max_attempts,
        )
    elif config.partition == "dirichlet_capped":
        train = dirichlet_capped(
            labels, clients, config.alpha, rng, config.min_samples, config.max_attempts
        )
    elif config.partition == "shards":
        train = shards(labels, clients, config.shards_per_client, rng)
    else:
        train = _natural(bundle.natural_train, bundle.name, clients, "train")
    empty = [k for k, indices in enumerate(train) if len(indices) == 0]
    if empty:
        raise PartitionError(
            f"{len(empty)} of data.num_clients={clients} clients got no training samples "
            f"(first: client {empty[0]}) from the {n}-sample training set with "
            f"data.partition={config.partition}; lower data.num_clients"
        )
    test = None
    if config.local_test == "label_mix":
        test = label_mix_test(
            [labels[t] for t in train],
            bundle.test.y.numpy(),
            config.local_test_size,
            rng,
            bundle.num_classes,
        )
    elif config.local_test == "natural":
        test = _natural(bundle.natural_test, bundle.name, clients, "test")
    return Partition(train=train, test=test)


def _natural(
    parts: list[np.ndarray] | None, name: str, num_clients: int, split: str
) -> list[np.ndarray]:
    if parts is None:
        raise PartitionError(f"dataset {name} has no natural per-client {split} split")
    if len(parts) != num_clients:
        raise PartitionError(
            f"dataset {name} has a natural split into {len(parts)} clients, "
            f"data.num_clients={num_clients}; set data.num_clients={len(parts)}"
        )
    return [np.asarray(p, dtype=np.int64) for p in parts]
