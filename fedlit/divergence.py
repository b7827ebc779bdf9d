"""Stopping a run whose loss or weights are no longer finite, naming round, client and layer."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from fedlit.context import Context
from fedlit.models.layers import Layer

NO_CLIENT = 2**62  # the marker of "no client had a non-finite loss" in the device tensor


class DivergenceError(FloatingPointError):
    """Training produced a NaN or inf loss or weight."""


def first_nonfinite_layer(layers: list[Layer], model: torch.nn.Module) -> str | None:
    """The first layer of the layer map with a NaN or inf parameter or float buffer."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    floats = [t for t in tensors.values() if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):  # one device read
        return None
    for layer in layers:
        for name in (*layer.params, *layer.buffers):
            t = tensors[name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{layer.name} ({name})"
    return None


def check_finite(
    context: Context,
    round_idx: int,
    train_loss: float,
    first_bad: torch.Tensor,
    weights: bool,
    kept: str = "",
) -> None:
    """Stop the run when the round's loss, or (when `weights`: before a checkpoint) the
    aggregated model, is not finite.

    The loss is already on the host (no sync); the weights cost one device read, so they are
    checked only before a checkpoint, which therefore never holds a non-finite weight (a
    non-finite weight in between shows as a non-finite loss one round later). Loss and model
    are identical on every rank, so every rank takes the same branch, and the extra all-reduce
    (which client: `first_bad` holds this rank's first, or NO_CLIENT) runs only then. `kept`
    says what there is to resume from (the engine knows whether a checkpoint was written).
    """
    finite_loss = bool(np.isfinite(train_loss))
    if finite_loss and not weights:
        return
    layer = first_nonfinite_layer(context.layers, context.global_model)
    if layer is None and finite_loss:
        return
    if context.comm.distributed:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    client = int(first_bad.item())
    who = f"client {client}" if client != NO_CLIENT else "no client had a non-finite loss"
    where = f"first non-finite layer {layer}" if layer else "the weights are finite"
    kept = f"{kept}; " if kept else ""
    raise DivergenceError(
        f"training diverged in round {round_idx}: train/loss is {train_loss} ({who}); "
        f"{where} after aggregation. {kept}lower the learning rate or check the data"
    )
