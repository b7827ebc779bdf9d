"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020): normalised averaging.

Clients that run more local steps (more data, more epochs) pull a plain average towards their
own objective. FedNova divides each client's update by how much its local steps accumulate,
||a_i||_1, and rescales the average by the effective number of steps tau_eff:
    d_i = (theta - y_i) / ||a_i||_1,   tau_eff = sum_i p_i ||a_i||_1,
    theta <- theta - tau_eff * sum_i p_i d_i,                p_i = n_i / sum_P n_j.
For SGD with momentum rho over tau_i steps (plain SGD: rho = 0, ||a_i||_1 = tau_i):
    ||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho).
Each client uploads theta - d_i in place of y_i (the average of those is theta - sum p_i d_i)
and ||a_i||_1 as one weighted scalar: one extra number over FedAvg's bytes. BN statistics are
averaged as usual. Weighting is by samples, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import RoundSums, Upload
from fedlit.context import Context
from fedlit.optim import probe_optimizer

Tensors = dict[str, torch.Tensor]
A_NORM = "fednova/a_norm"


def accumulated_steps(steps: int, momentum: float) -> float:
    """||a||_1 for `steps` SGD steps with heavy-ball momentum (FedNova, Section 4)."""
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


class FedNova:
    """Normalised averaging for SGD (with or without momentum) on the clients."""

    weighting = "samples"

    def setup(self, context: Context) -> None:
        built = probe_optimizer(context.trainer.optimizer)
        group = built.param_groups[0]
        if type(built) is not torch.optim.SGD or group.get("nesterov") or group.get("dampening"):
            raise ValueError(
                "FedNova normalises by the accumulated steps of SGD with heavy-ball momentum; "
                f"trainer.optimizer is {type(built).__name__} "
                f"(nesterov={group.get('nesterov')}, dampening={group.get('dampening')}): use "
                "torch.optim.SGD without nesterov or dampening"
            )
        self._received: Tensors = {}
        self._params = {n for n, _ in context.global_model.named_parameters()}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def client_start(self, model: nn.Module) -> None:
        self._received = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    def client_end(self, model: nn.Module, steps: int, optimizer: torch.optim.Optimizer) -> Upload:
        """Upload theta - (theta - y) / ||a||_1 for the trained parameters, and ||a||_1."""
        a_norm = accumulated_steps(steps, optimizer.param_groups[0].get("momentum", 0.0))
        params = dict(model.named_parameters())
        with torch.no_grad():
            normalised = {
                n: theta - (theta - params[n].detach()) / a_norm
                for n, theta in self._received.items()
            }
        return Upload(model=normalised, extras={A_NORM: torch.tensor(a_norm)})

    def upload_spec(self, trained: dict[str, torch.Size]) -> dict[str, tuple[tuple, str]]:
        return {A_NORM: ((), "weighted")}

    def server_update(self, global_tensors: Tensors, average: Tensors, sums: RoundSums) -> Tensors:
        """theta <- theta + tau_eff * (mean_p(theta - d_i) - theta) for the trained parameters
        (those with a normalised upload); buffers take their average."""
        tau_eff = float(sums.weighted[A_NORM])
        new = dict(average)
        for name in average:
            if name in self._params:
                theta = global_tensors[name]
                new[name] = theta + tau_eff * (average[name].to(theta.dtype) - theta)
        return new
