"""One client's local training: the loop every algorithm shares.

Algorithms differ only in `algorithm.loss`; the loop, the optimizer and the batches are the same
for all of them, so a new regulariser is a new loss, not a new loop.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn

from fedlit.algorithms.base import Algorithm


def freeze_inactive(model: nn.Module, trainable: Collection[str]) -> None:
    """Parameters outside this round's layers get requires_grad=False: autograd then computes no
    weight gradient for them and backward stops below the lowest trainable layer.

    Gradients left on the reused working model by the previous client are dropped: a frozen
    parameter must not carry another client's gradient into callbacks that read `.grad`.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        param.grad = None


def train_client(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    algorithm: Algorithm,
    autocast: Callable[[], AbstractContextManager],
    on_batch_end: Callable[[int, torch.Tensor], None] | None = None,
    before_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Run the client's optimisation steps; returns (summed loss as a device tensor, steps).

    `before_step()` runs between each backward and its optimizer step (gradient corrections,
    SCAFFOLD). The summed loss stays on the device so the loop never waits for the GPU; the
    caller reads it once per round.
    """
    model.train()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    steps = 0
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = algorithm.loss(model, x, y)
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        loss_sum += loss.detach().float()
        if on_batch_end is not None:
            on_batch_end(steps, loss.detach())
        steps += 1
    return loss_sum, steps


def seed_device_generator(device: torch.device, seed: int) -> None:
    """Seed the default generator of `device` only (dropout and other layers draw from it).

    torch.manual_seed also seeds every other backend; on a machine where CUDA is never
    initialised it queues that call with a formatted stack trace each time, which costs 0.4 ms
    and grows a list per client per round.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
