"""What every dataset loader returns: whole splits as tensors plus what the model and the
normaliser need to know (a module of its own so that loaders of any kind can build one without
importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    x: torch.Tensor  # images: uint8 (N, C, H, W); vectors: float32 (N, D)
    y: torch.Tensor  # int64 (N,)


@dataclass
class DataBundle:
    """A dataset in memory plus what the model and the normaliser need to know about it."""

    name: str
    train: Split
    test: Split
    num_classes: int
    classes: list[str]
    # Per-channel statistics of the training images in [0, 1] units; None for vectors.
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    # Per-client indices for datasets that come split by device (FedProx Synthetic).
    natural_train: list[np.ndarray] | None = None
    natural_test: list[np.ndarray] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Counting the 256 pixel values per channel keeps memory at one channel copy instead of a
    float copy of the whole dataset.
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        mean = (hist * values).sum() / hist.sum()
        var = (hist * (values - mean) ** 2).sum() / hist.sum()
        means.append(float(mean) / 255.0)
        stds.append(float(var.sqrt()) / 255.0)
    return tuple(means), tuple(stds)
