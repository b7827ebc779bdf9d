"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), with option II control variates.

Server control variate c, client control variates c_i (zero at first), local learning rate
eta_l (the optimizer's lr), K local steps:
- each local step corrects the gradient:  g <- g - c_i + c;
- after training, with x the received and y the trained weights:
      c_i+ = c_i - c + (x - y) / (K * eta_l)      (option II),
  and the client uploads y and delta_c_i = c_i+ - c_i;
- the server: x <- x + eta_g * mean_S(y_i - x) (the average, then the server optimizer with lr
  eta_g: `server_optimizer: {class_path: fedlit.server.ServerSGD, init_args: {lr: eta_g}}`),
  c <- c + (1 / N) * sum_S delta_c_i.
The clients are weighted uniformly, as in the paper (`weighting`), and train with plain SGD
(option II's estimate assumes K steps of lr; another optimizer is refused before round 1). Each client downloads x and
c and uploads y and delta_c: twice FedAvg's bytes. With the first round's zero control variates
the correction is exactly zero, so round 1 is FedAvg's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms.base import RoundSums, Upload, Weighting, check_weighting
from fedlit.context import Context
from fedlit.optim import probe_optimizer

Tensors = dict[str, torch.Tensor]


class SCAFFOLD:
    """Control variates against client drift; option II; uniform weights by default.

    Args:
        weighting: "uniform" (the paper) or "samples".
    """

    def __init__(self, weighting: Weighting = "uniform") -> None:
        check_weighting(weighting)
        self.weighting = weighting
        self.c: Tensors = {}  # the server control variate, the same on every rank
        self._correction: Tensors = {}
        self._received: Tensors = {}
        self._own: Tensors = {}

    def setup(self, context: Context) -> None:
        built = probe_optimizer(context.trainer.optimizer)
        group = built.param_groups[0]
        if type(built) is not torch.optim.SGD or group.get("momentum") or group.get("nesterov"):
            raise ValueError(
                "SCAFFOLD's option II control variates, (x - y) / (K * lr), assume K plain SGD "
                f"steps of lr; trainer.optimizer is {type(built).__name__} "
                f"(momentum={group.get('momentum')}): use torch.optim.SGD with momentum 0"
            )
        self.c = {n: torch.zeros_like(p) for n, p in context.global_model.named_parameters()}
        self.controls = context.state.store("scaffold/control")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y)

    def client_start(self, client: int, model: nn.Module) -> None:
        """Remember the received weights; the correction c - c_i of the trained parameters."""
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._received = {n: p.detach().clone() for n, p in trained.items()}
        own = self.controls.get(client) or {}
        self._own = {n: own.get(n, torch.zeros_like(p)) for n, p in trained.items()}
        self._correction = {n: self.c[n] - self._own[n] for n in trained}

    def before_step(self, model: nn.Module) -> None:
        """g <- g + (c - c_i): the drift correction of every local step."""
        params = dict(model.named_parameters())
        for name, correction in self._correction.items():
            grad = params[name].grad
            if grad is not None:
                grad.add_(correction)

    def client_end(
        self, client: int, model: nn.Module, steps: int, optimizer: torch.optim.Optimizer
    ) -> Upload:
        """Option II: c_i+ = c_i - c + (x - y) / (K eta_l); upload delta c_i."""
        lr = optimizer.param_groups[0]["lr"]
        params = dict(model.named_parameters())
        updated, delta = {}, {}
        with torch.no_grad():
            for name, received in self._received.items():
                drift = (received - params[name]) / (max(steps, 1) * lr)
                updated[name] = self._own[name] - self.c[name] + drift
                delta[name] = updated[name] - self._own[name]
        self.controls.put(client, {**(self.controls.get(client) or {}), **updated})
        return Upload(extras={f"delta_c/{n}": d for n, d in delta.items()})

    def upload_spec(self, trained: dict[str, torch.Size]) -> dict[str, tuple[torch.Size, str]]:
        """Each client sums delta c_i of the parameters it trained into the all-reduce."""
        return {f"delta_c/{n}": (shape, "summed") for n, shape in trained.items()}

    def downloads(self) -> Tensors:
        """Each sampled client downloads c with the model."""
        return self.c

    def server_update(self, average: Tensors, sums: RoundSums) -> Tensors:
        """c <- c + sum_S delta c_i / N; the model's target is the clients' average."""
        for key, total in sums.summed.items():
            name = key.removeprefix("delta_c/")
            self.c[name] = self.c[name] + total.to(self.c[name].dtype) / sums.num_clients
        return average

    def state_dict(self) -> dict[str, Tensors]:
        return {"c": {n: t.detach().cpu() for n, t in self.c.items()}}

    def load_state_dict(self, state: dict[str, Tensors]) -> None:
        device = next(iter(self.c.values())).device
        self.c = {n: t.to(device) for n, t in state["c"].items()}
