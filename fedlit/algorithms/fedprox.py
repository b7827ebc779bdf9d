"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

A client minimises its task loss plus a proximal term that keeps it near the weights it received:

    squared (the paper):            (mu / 2) * sum_t ||w_t - w_g,t||_2^2
    unsquared (FedPart's code base):  mu     * sum_t ||w_t - w_g,t||_2

over the tensors t trained this round. The server step is FedAvg's, so FedProx is only a loss
term on top of the shared local-training loop (fedlit/local.py). With partial training (FedPart)
the engine freezes the layers outside the round's selection before `client_start`, and only the
parameters that still require gradients are anchored and penalised: the frozen ones cannot move,
so a term over them would be a constant that costs a subtraction per step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import BufferPolicy, check_buffers
from fedlit.local_tensors import LocalClass, check_local

Variant = Literal["squared", "unsquared"]
VARIANTS = ("squared", "unsquared")


def proximal_term(
    params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float, variant: Variant
) -> torch.Tensor:
    """The proximal penalty of `params` around `anchor` (pure function, tested on its own).

    Its gradient is mu * (w - w_g) for the squared form and mu * (w - w_g) / ||w - w_g|| per
    tensor for the unsquared one (0 where the tensor has not moved, as torch's norm defines it).
    """
    total = params[0].new_zeros(()) if params else torch.zeros(())
    for param, ref in zip(params, anchor, strict=True):
        diff = param - ref
        if variant == "squared":
            total = total + diff.pow(2).sum()
        else:
            total = total + torch.linalg.vector_norm(diff)
    return total * (mu / 2 if variant == "squared" else mu)


class FedProx:
    """FedAvg with a proximal term in each client's loss.

    Args:
        mu: strength of the proximal term (the paper's mu; it tunes mu in {0.001, 0.01, 0.1, 1},
            Synthetic(1,1) uses 1). 0 gives FedAvg exactly (the term is not even computed).
        variant: "squared" (the paper's (mu/2)||w - w_g||^2) or "unsquared" (mu times the sum
            over tensors of ||w - w_g||_2, FedPart's code base, where mu = 0.01).
        buffers: BatchNorm statistics policy, as for FedAvg ("average" or "local").
        local: tensor classes each client keeps to itself, as for FedAvg.
    """

    def __init__(
        self,
        mu: float = 0.01,
        variant: Variant = "squared",
        buffers: BufferPolicy = "average",
        local: list[LocalClass] | None = None,
    ) -> None:
        if not mu >= 0:
            raise ValueError(f"algorithm.mu must be >= 0, got {mu}")
        if variant not in VARIANTS:
            raise ValueError(f"algorithm.variant must be one of {list(VARIANTS)}, got {variant!r}")
        check_buffers(buffers)
        self.mu = float(mu)
        self.variant = variant
        self.buffers = buffers
        self.local = check_local(local, buffers)
        self._params: list[nn.Parameter] = []
        self._anchor: list[torch.Tensor] = []

    def client_start(self, model: nn.Module) -> None:
        """Anchor the parameters this client trains at the weights it has just received.

        The anchor tensors are reused from one client to the next when the shapes match (the
        usual case: the same layers train for every client of a round), so a round costs no
        allocation beyond one copy of the trained parameters.
        """
        self._params = [p for p in model.parameters() if p.requires_grad]
        same_shapes = len(self._anchor) == len(self._params) and all(
            a.shape == p.shape and a.device == p.device
            for a, p in zip(self._anchor, self._params, strict=True)
        )
        with torch.no_grad():
            if same_shapes:
                for ref, param in zip(self._anchor, self._params, strict=True):
                    ref.copy_(param)
            else:
                self._anchor = [p.detach().clone() for p in self._params]

    def penalty(self) -> torch.Tensor:
        """The proximal term for the current weights of the anchored parameters."""
        return proximal_term(self._params, self._anchor, self.mu, self.variant)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task = F.cross_entropy(model(x), y)
        if self.mu == 0:
            return task
        if not self._params:
            raise RuntimeError(
                "FedProx.loss needs an anchor: call client_start(model) after the client has "
                "received its weights (the engine does)"
            )
        return task + self.penalty()
