"""What a run costs: bytes between clients and server, FLOPs of local training.

Every method is charged what it really moves and computes, next to what full-network training
(every layer trained and sent, FedAvg-style) would have cost with the same sampled clients and
samples, so a partial method (FedPart) reads as a ratio.

Communication. A client uploads what the server step takes from it (`StepResult.up_bytes`).
It downloads what changed since it last synchronised: `CommLedger` keeps, per layer, the round it
last changed (0: the initial model) and, per client, the round whose model it holds (-1: none
yet, so its first download is the whole model). Under FedAvg every layer changes every round,
so a sampled client downloads the whole model, as before; under FedPart a client that took part
in the previous round downloads only the layer(s) aggregated then. Only the tensors a client
receives count: parameters and floating-point buffers, except those the algorithm keeps local
(fedlit.local_tensors).

Computation. One training step's FLOPs depend on which layers are trainable: frozen layers below
the lowest trainable one get no backward at all, layers above it get an input-gradient backward
but no weight gradient. `StepFlops` counts a step with `torch.utils.flop_counter.FlopCounterMode`
(matrix products and convolutions) on a copy of the model on the "meta" device, once per set of
trainable parameters, and divides by the batch: those FLOPs are linear in the batch, and every
sample of a client is used once per epoch (`DeviceData.train_batches`), so a client's round costs
exactly FLOPs per sample x samples x local epochs. Algorithms whose loss runs extra frozen
forward passes (MOON) say how many through the optional `frozen_forwards(taken_part)`; those are
counted as forward passes of `model.features`. Element-wise work (losses, BatchNorm, FedProx's
proximal term, optimizer updates) is not counted, as the flop counter does not count it.

Everything here is a pure function of the round's plan, identical on every rank: no collective,
no device read.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedlit.comm import FlatLayout
from fedlit.hooks import call
from fedlit.local import freeze_inactive
from fedlit.models.layers import Layer
from fedlit.units import GB, TFLOP
from fedlit.wallclock import WallClock

if TYPE_CHECKING:
    from fedlit.algorithms.base import StepResult
    from fedlit.context import Context, RoundPlan

NEVER = -1  # a client's model version before its first download

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


# ---- the model on the meta device -----------------------------------------------------------


def meta_copy(model: nn.Module) -> nn.Module:
    """`model`'s structure with every parameter and buffer on the "meta" device (shapes only).

    No data is copied and nothing of `model` is touched: running it moves no BatchNorm
    statistics and draws no random number. Hooks are left out, so that callbacks watching the
    real model (forward hooks recording activations) never see the counting passes.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        if id(param) not in memo:
            meta = torch.empty_like(param, device="meta")
            memo[id(param)] = nn.Parameter(meta, requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo.setdefault(id(buffer), torch.empty_like(buffer, device="meta"))
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    return copy.deepcopy(model, memo)


def meta_batch(input_shape: Sequence[int], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros((batch, *input_shape), device="meta")
    return x, torch.zeros(batch, dtype=torch.long, device="meta")


def training_step(model: nn.Module, input_shape: Sequence[int], batch: int) -> None:
    """Forward and backward of cross-entropy, as local training runs them, on meta tensors."""
    model.train()
    x, y = meta_batch(input_shape, batch)
    loss = F.cross_entropy(model(x), y)
    if loss.requires_grad:  # a round with nothing trainable runs no backward
        loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def features_pass(model: nn.Module, input_shape: Sequence[int], batch: int) -> None:
    """A frozen forward pass to the features (MOON's global and previous models)."""
    model.eval()
    model.features(meta_batch(input_shape, batch)[0])


def counted_flops(run: Callable[[], None]) -> int:
    """FLOPs of the matrix products and convolutions `run` executes."""
    try:
        with FlopCounterMode(display=False) as counter:
            run()
    except (RuntimeError, NotImplementedError) as error:
        raise RuntimeError(
            "the cost accounting counts FLOPs by running the model on the 'meta' device "
            f"(shapes only), and this model cannot run there: {error}"
        ) from error
    return int(counter.get_total_flops())


# ---- the analytic count (a check of the flop counter) ---------------------------------------


def module_flops(module: nn.Module, in_shape: torch.Size, out_shape: torch.Size) -> int:
    """Forward FLOPs of one conv or linear module (2 per multiply-add, bias not counted).

    conv: 2 * Cout * (Cin / groups) * prod(kernel) * prod(output spatial) per sample;
    linear: 2 * in * out per row. The input-gradient and the weight-gradient of the backward
    pass each cost the same again.
    """
    if isinstance(module, nn.Linear):
        rows = in_shape.numel() // module.in_features
        return 2 * rows * module.in_features * module.out_features
    weight = module.weight.shape  # (Cout, Cin / groups, *kernel)
    return 2 * out_shape[0] * weight.numel() * out_shape[2:].numel()


def analytic_flops(
    model: nn.Module, run: Callable[[], None], backward: bool = True
) -> tuple[int, int]:
    """(forward FLOPs, backward FLOPs) of the conv and linear modules during `run`, from the
    shapes forward hooks see: a module whose input requires grad pays an input-gradient, one
    whose weight requires grad a weight-gradient (autograd's rules)."""
    seen: list[tuple[nn.Module, torch.Size, bool, torch.Size]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen.append((module, inputs[0].shape, inputs[0].requires_grad, output.shape))

    kinds = (nn.Linear, nn.modules.conv._ConvNd)
    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, kinds)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    forward = backward_flops = 0
    for module, in_shape, input_grad, out_shape in seen:
        flops = module_flops(module, in_shape, out_shape)
        forward += flops
        if backward:
            backward_flops += flops * (int(input_grad) + int(module.weight.requires_grad))
    return forward, backward_flops


# ---- FLOPs per sample, cached per set of trainable parameters -------------------------------


class StepFlops:
    """FLOPs per sample of one local step, per set of trainable parameters (counted once).

    Args:
        model: the global model (copied to the meta device here; never run).
        input_shape: one sample's shape.
        batch: the batch the count runs on (any size >= 2 gives the same per-sample numbers;
            BatchNorm in train mode refuses a batch of one).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], batch: int) -> None:
        self.model = meta_copy(model)
        self.input_shape = tuple(input_shape)
        self.batch = max(2, batch)
        self.all_params = frozenset(n for n, _ in self.model.named_parameters())
        self._steps: dict[frozenset[str], int] = {}
        self._features: int | None = None

    def step(self, trainable: Iterable[str]) -> int:
        """Forward + backward FLOPs per sample with `trainable` parameters trainable."""
        key = frozenset(trainable)
        if key not in self._steps:
            freeze_inactive(self.model, key)
            total = counted_flops(lambda: training_step(self.model, self.input_shape, self.batch))
            self._steps[key] = total // self.batch
        return self._steps[key]

    def full_step(self) -> int:
        return self.step(self.all_params)

    def features(self) -> int:
        """Forward FLOPs per sample of `model.features` (no backward)."""
        if self._features is None:
            total = counted_flops(lambda: features_pass(self.model, self.input_shape, self.batch))
            self._features = total // self.batch
        return self._features

    def analytic_step(self, trainable: Iterable[str]) -> int:
        """The same as `step`, from the analytic formulas (for tests and docs)."""
        freeze_inactive(self.model, frozenset(trainable))
        forward, backward = analytic_flops(
            self.model, lambda: training_step(self.model, self.input_shape, self.batch)
        )
        return (forward + backward) // self.batch


# ---- who has which version of which layer ---------------------------------------------------


class CommLedger:
    """Per layer the round it last changed, per client the round whose model it holds.

    Identical on every rank: it follows from the sampled clients and the aggregated layers.
    """

    def __init__(self, layer_names: Sequence[str], layer_bytes: Sequence[int], num_clients: int):
        self.layer_names = list(layer_names)
        self.layer_bytes = list(layer_bytes)
        self.changed = [0] * len(self.layer_names)  # 0: the initial model
        self.holds = [NEVER] * num_clients

    @property
    def model_bytes(self) -> int:
        return sum(self.layer_bytes)

    def bytes_of(self, layers: Iterable[str]) -> int:
        """What one client sends or receives of `layers`."""
        chosen = set(layers)
        return sum(
            b for n, b in zip(self.layer_names, self.layer_bytes, strict=True) if n in chosen
        )

    def download_bytes(self, client: int) -> int:
        """What `client` must download to hold the current global model."""
        have = self.holds[client]
        return sum(b for b, c in zip(self.layer_bytes, self.changed, strict=True) if c > have)

    def sync(self, clients: Iterable[int], round_idx: int) -> None:
        """`clients` downloaded at the start of `round_idx`: they hold the model of round - 1."""
        for client in clients:
            self.holds[client] = round_idx - 1

    def mark_changed(self, layers: Iterable[str], round_idx: int) -> None:
        index = {name: i for i, name in enumerate(self.layer_names)}
        for name in layers:
            self.changed[index[name]] = round_idx

    def state_dict(self) -> dict[str, Any]:
        return {"changed": list(self.changed), "holds": list(self.holds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["changed"]) != len(self.changed) or len(state["holds"]) != len(self.holds):
            raise ValueError(
                f"the checkpoint's cost ledger has {len(state['changed'])} layers and "
                f"{len(state['holds'])} clients, this run {len(self.changed)} and {len(self.holds)}"
            )
        self.changed = [int(c) for c in state["changed"]]
        self.holds = [int(h) for h in state["holds"]]


def layer_sent_bytes(
    model: nn.Module, layers: Sequence[Layer], local_names: Collection[str] = ()
) -> list[int]:
    """Bytes of what a client sends and receives of each layer: its parameters and its
    floating-point buffers, except the tensors the algorithm keeps local (`algorithm.local`:
    BN statistics under `buffers: local`, BN affine parameters, biases)."""
    buffers = dict(model.named_buffers())
    sizes = []
    for layer in layers:
        names = list(layer.params) + [b for b in layer.buffers if buffers[b].is_floating_point()]
        sizes.append(FlatLayout.of(model, [n for n in names if n not in local_names]).nbytes())
    return sizes


# ---- the run's totals -----------------------------------------------------------------------


class CostTracker:
    """A run's communication and computation, round by round and in total, against full-network
    training with the same clients and samples."""

    def __init__(
        self,
        ledger: CommLedger,
        flops: StepFlops,
        client_samples: Sequence[int],
        algorithm: Any,
    ) -> None:
        self.ledger = ledger
        self.flops = flops
        self.client_samples = list(client_samples)  # samples a client processes per round
        self.algorithm = algorithm
        self.taken_part = [0] * len(self.client_samples)
        self.totals = {"bytes": 0, "full_bytes": 0, "flops": 0, "full_flops": 0}
        self.wall = WallClock()  # time is a cost too, and must survive a resume like the others

    @classmethod
    def for_run(cls, context: Context, algorithm: Any, local_names: Collection[str]) -> CostTracker:
        ledger = CommLedger(
            [layer.name for layer in context.layers],
            layer_sent_bytes(context.global_model, context.layers, local_names),
            context.num_clients,
        )
        trainer = context.trainer
        flops = StepFlops(context.global_model, context.data.input_shape, trainer.batch_size)
        samples = [n * trainer.local_epochs for n in context.client_sizes]
        return cls(ledger, flops, samples, algorithm)

    @property
    def comm_bytes(self) -> int:
        return self.totals["bytes"]

    def download_bytes(self, clients: Iterable[int]) -> int:
        """What the round's sampled clients download before training (for the plan)."""
        return sum(self.ledger.download_bytes(c) for c in clients)

    def frozen_flops(self, client: int) -> int:
        """FLOPs per sample of the algorithm's frozen forward passes for `client` this round
        (MOON's global and previous models); the same whatever the client trains."""
        extra = call(self.algorithm, "frozen_forwards", taken_part=self.taken_part[client])
        return extra * self.flops.features() if extra else 0

    def ratios(self) -> tuple[float, float]:
        """(bytes, FLOPs) so far, each over what full-network training would have cost."""
        totals = self.totals
        return (
            totals["bytes"] / max(totals["full_bytes"], 1),
            totals["flops"] / max(totals["full_flops"], 1),
        )

    def record(self, round_idx: int, plan: RoundPlan, step: StepResult) -> dict[str, int | float]:
        """Account for a finished round; returns its `comm/...` and `cost/...` metrics."""
        actual, full = self.flops.step(plan.trainable), self.flops.full_step()
        flops = full_flops = 0
        for client in plan.clients:
            samples, frozen = self.client_samples[client], self.frozen_flops(client)
            flops += (actual + frozen) * samples
            full_flops += (full + frozen) * samples
        round_bytes = step.round_bytes
        totals = self.totals
        totals["bytes"] += round_bytes
        totals["full_bytes"] += 2 * len(plan.clients) * self.ledger.model_bytes
        totals["flops"] += flops
        totals["full_flops"] += full_flops
        for client in plan.clients:
            self.taken_part[client] += 1
        self.ledger.sync(plan.clients, round_idx)
        self.ledger.mark_changed(plan.active, round_idx)
        comm_ratio, flops_ratio = self.ratios()
        return {
            "comm/up_bytes": step.up_bytes,
            "comm/down_bytes": step.down_bytes,
            "comm/round_bytes": round_bytes,
            "comm/bytes": totals["bytes"],
            "comm/full_bytes": totals["full_bytes"],
            "comm/ratio": comm_ratio,
            "cost/flops": flops,
            "cost/flops_total": totals["flops"],
            "cost/full_flops_total": totals["full_flops"],
            "cost/flops_ratio": flops_ratio,
        }

    def summary(self) -> dict[str, int | float]:
        totals = self.totals
        comm_ratio, flops_ratio = self.ratios()
        return {
            "comm_bytes": totals["bytes"],
            "comm_gb": totals["bytes"] / GB,
            "comm_ratio": comm_ratio,
            "train_flops": totals["flops"],
            "train_tflops": totals["flops"] / TFLOP,
            "flops_ratio": flops_ratio,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger.state_dict(),
            "taken_part": list(self.taken_part),
            "totals": dict(self.totals),
            "wall": self.wall.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        if len(state["taken_part"]) != len(self.taken_part):
            raise ValueError(
                f"the checkpoint's cost state has {len(state['taken_part'])} clients, this run "
                f"{len(self.taken_part)}"
            )
        self.taken_part = [int(n) for n in state["taken_part"]]
        self.totals = {key: int(state["totals"][key]) for key in self.totals}
        self.wall.load_state_dict(state.get("wall"))
