"""Collectives over named subsets of a model's tensors, with byte accounting.

The server of a federated round is a collective: every rank packs what its clients send into
one flat buffer and reduces it with a single call. torch.distributed is used directly, because
Fabric's all_reduce on a collection issues a barrier and one call per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def named_tensors(model: nn.Module, names: Sequence[str]) -> list[torch.Tensor]:
    """The parameters and buffers of `model` called `names`, in that order (no copies)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tensors = []
    for name in names:
        tensor = params.get(name)
        if tensor is None:
            tensor = buffers.get(name)
        if tensor is None:
            raise KeyError(f"{type(model).__name__} has no parameter or buffer named {name!r}")
        tensors.append(tensor)
    return tensors


class FlatLayout:
    """Where each named tensor sits in one flat float buffer, for single-call collectives."""

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
        self.names = list(names)
        self.shapes = list(shapes)
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> FlatLayout:
        return cls(names, [t.shape for t in named_tensors(model, names)])

    def zeros(self, device: torch.device, dtype: torch.dtype = torch.float32, extra: int = 0):
        """A zero buffer for this layout plus `extra` trailing slots (e.g. the total weight)."""
        return torch.zeros(self.numel + extra, device=device, dtype=dtype)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat` shaped like the layout's tensors (writing a view writes the buffer)."""
        chunks = torch.split(flat[: self.numel], self.numels)
        return [c.view(s) for c, s in zip(chunks, self.shapes, strict=True)]

    def nbytes(self, dtype: torch.dtype = torch.float32) -> int:
        return self.numel * torch.empty((), dtype=dtype).element_size()


def add_scaled(views: list[torch.Tensor], tensors: list[torch.Tensor], weight: float) -> None:
    """views += weight * tensors, tensor by tensor (accumulates in the views' dtype)."""
    for view, tensor in zip(views, tensors, strict=True):
        view.add_(tensor.detach().to(view.dtype), alpha=weight)


def copy_into(tensors: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Write `sources` into `tensors` in place (keeps parameters' identity for optimizers)."""
    with torch.no_grad():
        for tensor, source in zip(tensors, sources, strict=True):
            tensor.copy_(source)


class Communicator:
    """The collectives a rank takes part in, counting the bytes it puts into them."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.collective_bytes = 0
        self.calls = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum `flat` over all ranks in place, in one call; a no-op with one rank."""
        self.calls += 1
        self.collective_bytes += flat.numel() * flat.element_size()
        if self.distributed:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    def all_to_all_single(
        self,
        send: torch.Tensor,
        recv: torch.Tensor,
        send_splits: Sequence[int],
        recv_splits: Sequence[int],
    ) -> torch.Tensor:
        """Send `send[split d]` to rank d and receive rank s's part into `recv[split s]`, in one
        call; with one rank the only part is this rank's own, so it is copied locally.

        Counts the bytes this rank puts in (`send`), as `all_reduce_sum` does; a part a rank
        addresses to itself is counted too, so callers that copy local data themselves leave
        their own split at 0.
        """
        if len(send_splits) != self.world_size or len(recv_splits) != self.world_size:
            raise ValueError(
                f"all_to_all_single needs one split per rank ({self.world_size}), got "
                f"{len(send_splits)} send and {len(recv_splits)} receive splits"
            )
        if sum(send_splits) != send.numel() or sum(recv_splits) != recv.numel():
            raise ValueError(
                f"splits sum to {sum(send_splits)} sent / {sum(recv_splits)} received elements "
                f"but the buffers hold {send.numel()} / {recv.numel()}"
            )
        self.calls += 1
        self.collective_bytes += send.numel() * send.element_size()
        if self.distributed:
            dist.all_to_all_single(
                recv,
                send,
                output_split_sizes=list(recv_splits),
                input_split_sizes=list(send_splits),
            )
        elif self.world_size == 1:
            recv.copy_(send)
        else:
            raise RuntimeError(
                f"all_to_all_single over {self.world_size} ranks needs an initialised process group"
            )
        return recv
