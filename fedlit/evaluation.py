"""Global and personalised evaluation.

Global: the aggregated model on the full test set, each rank scoring an interleaved shard
(indices rank, rank + W, ...) and torchmetrics summing the counts over ranks.
Personalised: each client's model on its own local test split; the ranks reduce sum, sum of
squares and count so that the mean and the spread over clients come out of one all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from fedlit.comm import Communicator
from fedlit.data.device import DeviceData


@torch.no_grad()
def evaluate_global(
    model: nn.Module,
    data: DeviceData,
    rank: int,
    world_size: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, float]:
    """Test accuracy (a fraction) and mean cross-entropy of `model` on the whole test set."""
    device = next(model.parameters()).device
    accuracy = MulticlassAccuracy(num_classes=data.num_classes, average="micro").to(device)
    mean_loss = MeanMetric().to(device)
    model.eval()
    num_test = data.num_test
    shard = torch.arange(rank, num_test, world_size, device=device)
    for x, y in data.eval_batches("test", shard, batch_size):
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        accuracy.update(logits, y)
        mean_loss.update(loss)
    # compute() syncs the metric states over ranks, so every rank must reach this line.
    return {"test/acc": float(accuracy.compute()), "test/loss": float(mean_loss.compute())}


@torch.no_grad()
def client_accuracy(
    model: nn.Module,
    data: DeviceData,
    indices: torch.Tensor,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager],
) -> float:
    """Accuracy of `model` on one client's local test split."""
    model.eval()
    correct = torch.zeros((), device=indices.device)
    for x, y in data.eval_batches("test", indices, batch_size):
        with autocast():
            logits = model(x)
        correct += (logits.argmax(dim=1) == y).sum()
    return float(correct) / max(1, indices.numel())


class SpreadOverClients:
    """Mean and standard deviation of a per-client number, gathered over ranks in one call."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(3 * len(names), dtype=torch.float64, device=device)

    def add(self, name: str, value: float) -> None:
        i = 3 * self.names.index(name)
        self.sums[i] += value
        self.sums[i + 1] += value * value
        self.sums[i + 2] += 1

    def reduce(self, comm: Communicator, prefix: str) -> dict[str, float]:
        comm.all_reduce_sum(self.sums)
        metrics: dict[str, float] = {}
        for j, name in enumerate(self.names):
            total, squares, count = (float(v) for v in self.sums[3 * j : 3 * j + 3])
            if count == 0:
                continue
            mean = total / count
            metrics[f"{prefix}/{name}"] = mean
            metrics[f"{prefix}/{name}_std"] = math.sqrt(max(0.0, squares / count - mean * mean))
        return metrics
