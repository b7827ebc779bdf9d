"""FedDyn (Acar et al., "Federated Learning Based on Dynamic Regularization", ICLR 2021).

Client k keeps g_k, the gradient of its loss at its last local model (zero at first), and
minimises, from the received weights theta:
    L_k(w) - <g_k, w> + (alpha / 2) ||w - theta||^2;
after training to w_k it updates g_k <- g_k - alpha (w_k - theta). The server keeps h (zero at
first) and, with P the round's clients and m all clients:
    h <- h - alpha (1 / m) sum_P (w_k - theta)
    theta <- mean_P(w_k) - h / alpha.
The mean over P is uniform, as in the paper (`weighting`); nothing is sent besides the models.
The paper's alpha is in {0.1, 0.01, 0.001}; 0.01 is the default here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import RoundSums, Weighting, check_weighting
from fedlit.context import Context

Tensors = dict[str, torch.Tensor]


def feddyn_penalty(params: Tensors, anchor: Tensors, linear: Tensors, alpha: float) -> torch.Tensor:
    """-<g_k, w> + (alpha / 2) ||w - theta||^2 over the given parameters."""
    total = next(iter(params.values())).new_zeros(())
    for name, w in params.items():
        total = total - (linear[name] * w).sum() + (alpha / 2) * (w - anchor[name]).pow(2).sum()
    return total


class FedDyn:
    """Dynamic regularisation: each client's objective is corrected by its own gradient
    history so that the server's fixed point is a stationary point of the global loss.

    Args:
        alpha: the regularisation strength (paper: 0.1, 0.01, 0.001).
        weighting: "uniform" (the paper's mean over the round's clients) or "samples".
    """

    def __init__(self, alpha: float = 0.01, weighting: Weighting = "uniform") -> None:
        if not alpha > 0:
            raise ValueError(f"algorithm.alpha must be > 0, got {alpha}")
        check_weighting(weighting)
        self.alpha = float(alpha)
        self.weighting = weighting
        self.h: Tensors = {}  # the server state, the same on every rank
        self._params: Tensors = {}
        self._anchor: Tensors = {}
        self._linear: Tensors = {}

    def setup(self, context: Context) -> None:
        self.h = {n: torch.zeros_like(p) for n, p in context.global_model.named_parameters()}
        self.gradients = context.state.store("feddyn/gradient")

    def client_start(self, client: int, model: nn.Module) -> None:
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._anchor = {n: p.detach().clone() for n, p in self._params.items()}
        own = self.gradients.get(client) or {}
        self._linear = {n: own.get(n, torch.zeros_like(p)) for n, p in self._params.items()}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task = F.cross_entropy(model(x), y)
        return task + feddyn_penalty(self._params, self._anchor, self._linear, self.alpha)

    def client_end(self, client: int) -> None:
        """g_k <- g_k - alpha (w_k - theta)."""
        with torch.no_grad():
            updated = {
                n: self._linear[n] - self.alpha * (w - self._anchor[n])
                for n, w in self._params.items()
            }
        self.gradients.put(client, {**(self.gradients.get(client) or {}), **updated})

    def server_update(self, global_tensors: Tensors, average: Tensors, sums: RoundSums) -> Tensors:
        """h <- h - alpha |P| / m (mean_P w_k - theta); theta <- mean_P w_k - h / alpha."""
        new = dict(average)
        share = self.alpha * sums.clients / sums.num_clients
        for name, mean in average.items():
            if name not in self.h:  # a buffer (BN statistics): their average
                continue
            theta = global_tensors[name]
            mean = mean.to(theta.dtype)
            self.h[name] = self.h[name] - share * (mean - theta)
            new[name] = mean - self.h[name] / self.alpha
        return new

    def state_dict(self) -> dict[str, Tensors]:
        return {"h": {n: t.detach().cpu() for n, t in self.h.items()}}

    def load_state_dict(self, state: dict[str, Tensors]) -> None:
        device = next(iter(self.h.values())).device
        self.h = {n: t.to(device) for n, t in state["h"].items()}
