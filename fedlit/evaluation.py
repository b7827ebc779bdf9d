"""Global and personalised evaluation, with numbers that do not depend on the number of ranks.

Global: the model on the full test set, cut into batches of `eval_batch_size` in index order;
batch b is scored by rank b % world_size. Each batch's correct count and float32 loss sum land
in their own slot of a per-batch vector that one all-reduce fills (every slot has exactly one
contributor, so the sum is exact), and every rank then adds the batch sums up in batch order.
A batch is the same tensor whichever rank scores it, so test/acc and test/loss are bitwise equal
for 1 and N ranks; with one rank the arithmetic is that of a running float32 mean over batches.

Personalised: each client's number is computed on the rank that owns it and lands in the
client's slot of a per-client vector; one all-reduce, then the mean and the spread over clients
are summed in client order, again independent of who computed what.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.comm import Communicator
from fedlit.data.device import DeviceData

if TYPE_CHECKING:
    from fedlit.context import Context


@torch.no_grad()
def evaluate_global(
    model: nn.Module,
    data: DeviceData,
    comm: Communicator,
    rank: int,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager],
) -> dict[str, float]:
    """Test accuracy (a fraction) and mean cross-entropy of `model` on the whole test set.

    A collective: every rank must call it, with the same model.
    """
    device = next(model.parameters()).device
    model.eval()
    num_test = data.num_test
    num_batches = -(-num_test // batch_size)
    # rows: correct predictions, loss sum (float32 values held exactly in float64), samples
    per_batch = torch.zeros(3, num_batches, dtype=torch.float64, device=device)
    for b in range(rank, num_batches, comm.world_size):
        indices = torch.arange(b * batch_size, min(num_test, (b + 1) * batch_size), device=device)
        x, y = next(data.eval_batches("test", indices, batch_size))
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        per_batch[0, b] = (logits.argmax(dim=1) == y).sum()
        per_batch[1, b] = loss.sum()
        per_batch[2, b] = y.numel()
    comm.all_reduce_sum(per_batch)
    correct, loss_sums, counts = per_batch.cpu()
    # a running float32 sum in batch order, as a streaming mean over batches computes it
    loss_total = torch.zeros((), dtype=torch.float32)
    count_total = torch.zeros((), dtype=torch.float32)
    for loss_sum, count in zip(loss_sums, counts, strict=True):
        loss_total += loss_sum.float()
        count_total += count.float()
    accuracy = correct.sum().float() / counts.sum().float()
    return {"test/acc": float(accuracy), "test/loss": float(loss_total / count_total)}


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
    """Mean and standard deviation over clients of per-client numbers, one all-reduce for all.

    Each client's value sits in its own slot, so the reduction is exact, and the mean is summed
    in client order on every rank: the result does not depend on which rank scored whom.
    """

    def __init__(self, names: list[str], num_clients: int, device: torch.device) -> None:
        self.names = names
        self.num_clients = num_clients
        # per name: values of the clients, then a 1 where a client has a value
        self.slots = torch.zeros(len(names), 2, num_clients, dtype=torch.float64, device=device)

    def add(self, name: str, client: int, value: float) -> None:
        i = self.names.index(name)
        self.slots[i, 0, client] = value
        self.slots[i, 1, client] = 1.0

    def reduce(self, comm: Communicator, prefix: str) -> dict[str, float]:
        comm.all_reduce_sum(self.slots)
        metrics: dict[str, float] = {}
        for name, (values, present) in zip(self.names, self.slots.tolist(), strict=True):
            total = squares = count = 0.0
            for value, here in zip(values, present, strict=True):
                if here:
                    total += value
                    squares += value * value
                    count += 1.0
            if count == 0:
                continue
            mean = total / count
            metrics[f"{prefix}/{name}"] = mean
            metrics[f"{prefix}/{name}_std"] = math.sqrt(max(0.0, squares / count - mean * mean))
        return metrics


@torch.no_grad()
def final_client_accuracy(
    context: Context, receive: Callable[[int], nn.Module]
) -> tuple[list[float], str]:
    """Accuracy of the final model each client receives (`receive(client)` loads it), on its
    local test split (its training data when there is none), and that split's name. Each rank
    scores the clients it owns; one all-reduce of (correct, count) per client gives every rank
    every client's number."""
    split, parts = "test", context.client_test_indices
    if parts is None:
        split, parts = "train", context.client_indices
    n = len(parts)
    scores = torch.zeros(2 * n, dtype=torch.float64, device=context.device)
    for client in context.owned(list(range(n))):
        model = receive(client)
        model.eval()
        for x, y in context.data.eval_batches(
            split, parts[client], context.trainer.eval_batch_size
        ):
            with context.autocast():
                logits = model(x)
            scores[client] += (logits.argmax(dim=1) == y).sum()
            scores[n + client] += y.numel()
    context.comm.all_reduce_sum(scores)
    correct, count = scores[:n].tolist(), scores[n:].tolist()
    return [c / max(k, 1.0) for c, k in zip(correct, count, strict=True)], split
