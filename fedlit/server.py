"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the server
treats the round's average as a step and takes its own optimizer step instead.

With x the global model and t the round's target (the clients' average, or what the
algorithm's `server_update` made of it), the pseudo-gradient is d = t - x, a descent direction.
Every optimizer keeps its state per parameter name and touches only the parameters it is given
(a FedPart round passes only the trained layer's); buffers (BN statistics) take the target.

- `ServerSGD(lr, momentum)`: m = momentum * m + d; x <- x + lr * m. lr 1, momentum 0 is FedAvg
  bit for bit (the step is written as t + (lr * m - d), which is exactly t there); momentum > 0
  is FedAvgM (Hsu et al., 2019).
- `FedAdagrad`, `FedAdam`, `FedYogi`: m = b1 * m + (1 - b1) * d, then
  v = v + d^2 (Adagrad), v = b2 * v + (1 - b2) * d^2 (Adam),
  v = v - (1 - b2) * d^2 * sign(v - d^2) (Yogi); x <- x + lr * m / (sqrt(v) + tau), with v
  starting at tau^2 and no bias correction, as in the paper's Algorithm 2. The paper's defaults:
  b1 = 0.9, b2 = 0.99, tau = 1e-3; lr is tuned per task (the paper's grid is 10^-3 .. 10^0).

Every rank computes the same step from the same all-reduced average, so the state is identical
on every rank and is checkpointed once. A step is a pure function of (state, x, t): tested
without processes.
"""

from __future__ import annotations

from typing import Any

import torch

Tensors = dict[str, torch.Tensor]


class ServerOptimizer:
    """The shared bookkeeping: per-parameter state tensors, created as zeros on first use."""

    state_names: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"server_optimizer lr must be > 0, got {lr}")
        self.lr = float(lr)
        self.state: dict[str, Tensors] = {name: {} for name in self.state_names}

    def _slot(self, kind: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        slots = self.state[kind]
        if name not in slots:
            slots[name] = torch.full_like(like, fill)
        return slots[name]

    def step(self, params: Tensors, target: Tensors) -> Tensors:
        """The new values of `params` (the global model's), moved towards `target`."""
        with torch.no_grad():
            return {name: self._update(name, params[name], target[name]) for name in params}

    def _update(self, name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Copies of the per-parameter state (the optimizer updates its own in place)."""
        return {
            kind: {n: v.detach().cpu().clone() for n, v in slots.items()}
            for kind, slots in self.state.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {
            kind: {n: v.clone() for n, v in state.get(kind, {}).items()}
            for kind in self.state_names
        }

    def to(self, device: torch.device) -> None:
        self.state = {k: {n: v.to(device) for n, v in s.items()} for k, s in self.state.items()}


class ServerSGD(ServerOptimizer):
    """Server SGD with momentum (FedAvgM when momentum > 0); lr 1, momentum 0 is FedAvg.

    Args:
        lr: the server learning rate (eta_g of SCAFFOLD and of Reddi et al.).
        momentum: beta of FedAvgM (Hsu et al., 2019: 0.9 typical), 0 for none.
    """

    state_names = ("momentum",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        super().__init__(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server_optimizer momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def _update(self, name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = t - x
        if self.momentum:
            m = self._slot("momentum", name, x)
            m.mul_(self.momentum).add_(d)
        else:
            m = d
        # x + lr * m, written so that lr 1 and momentum 0 give t exactly
        return t + (self.lr * m - d)


class _Adaptive(ServerOptimizer):
    state_names = ("m", "v")

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"server_optimizer {key} must be in [0, 1), got {value}")
        if not tau > 0:
            raise ValueError(f"server_optimizer tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        raise NotImplementedError

    def _update(self, name: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        d = t - x
        m = self._slot("m", name, x)
        v = self._slot("v", name, x, fill=self.tau**2)
        m.mul_(self.beta1).add_(d, alpha=1.0 - self.beta1)
        self._second_moment(v, d * d)
        return x + self.lr * m / (v.sqrt() + self.tau)


class FedAdagrad(_Adaptive):
    """v <- v + d^2 (Reddi et al., 2021)."""

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


class FedAdam(_Adaptive):
    """v <- b2 * v + (1 - b2) * d^2 (Reddi et al., 2021)."""

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(d2, alpha=1.0 - self.beta2)


class FedYogi(_Adaptive):
    """v <- v - (1 - b2) * d^2 * sign(v - d^2) (Reddi et al., 2021)."""

    def __init__(
        self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(lr, beta1, beta2, tau)

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_(d2 * torch.sign(v - d2), alpha=1.0 - self.beta2)
