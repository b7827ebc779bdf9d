"""Who runs which client, which clients take part, and the seeded random streams.

Every random choice in a run is drawn from a stream keyed by (seed, purpose, round, client), so
the numbers a client sees do not depend on how many ranks there are, which rank runs it, or in
which order the ranks get there.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """Purposes of the random streams; part of every stream's key so streams never collide."""

    INIT = 1
    SAMPLE = 2
    TRAIN = 3
    RECOMBINE = 4  # FedMR's per-layer permutations, keyed by round
    SPARSITY = 5  # LIPS's random-score masks, keyed by (round, client)
    PROBE = 6  # the samples a layer-peeled probe reads, keyed by (round, client)
    SCHEDULE = 7  # FedPart's random layer order, keyed by cycle
    RECALIBRATE = 8  # the training samples BN statistics are recomputed on, by (round, client)


def stream_seed(seed: int, purpose: Stream, *keys: int) -> int:
    """A 63-bit seed for the stream (seed, purpose, *keys), identical on every rank and machine."""
    sequence = np.random.SeedSequence([seed, int(purpose), *keys])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, purpose: Stream, *keys: int, device: torch.device | str = "cpu"):
    """A torch.Generator on `device` seeded from the stream; device-side draws need no copies."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, purpose, *keys))
    return generator


def clients_per_round(num_clients: int, count: int | None, fraction: float | None) -> int:
    """Resolve the trainer's sampling settings to a count (all clients when neither is set)."""
    if count is not None and fraction is not None:
        raise ValueError(
            "set only one of trainer.clients_per_round and trainer.client_fraction, "
            f"got {count} and {fraction}"
        )
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"trainer.client_fraction must be in (0, 1], got {fraction}")
        return max(1, round(fraction * num_clients))
    if count is None:
        return num_clients
    if not 1 <= count <= num_clients:
        raise ValueError(
            f"trainer.clients_per_round must be between 1 and data.num_clients={num_clients}, "
            f"got {count}"
        )
    return count


def sample_clients(seed: int, round_idx: int, num_clients: int, count: int) -> list[int]:
    """The clients of one round, uniformly without replacement, sorted by id.

    Every rank draws the same sample from the (seed, round) stream, so no collective is needed,
    and the sample of any future round is known in advance.
    """
    if count == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng(stream_seed(seed, Stream.SAMPLE, round_idx))
    return sorted(int(c) for c in rng.choice(num_clients, size=count, replace=False))


def owner(client: int, world_size: int) -> int:
    """The rank that runs `client`: fixed for the whole run, so per-client state never moves."""
    return client % world_size


def owned_clients(clients: list[int], rank: int, world_size: int) -> list[int]:
    """The subset of `clients` that `rank` runs, in ascending order."""
    return [c for c in clients if owner(c, world_size) == rank]
