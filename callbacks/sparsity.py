"""LIPS's transient sparsity (Xiao et al., arXiv 2506.00932, 2025).

Every `period` rounds, each client zeroes the lowest-scoring fraction of the eligible conv
weights of the model it has just received, then trains as usual: the zeroed weights regrow under
local SGD from the first step (the mask is never enforced). Regrowing them forces updates in the
middle layers that otherwise barely move after the first rounds ("layer-wise inertia").

Rounds: the official code counts rounds from 0 and sparsifies when i mod P == 0 (0, 5, 10, ...);
fedlit counts from 1, and fedlit round r is official round i = r - 1, so the scheduled rounds are
r = 1, 1 + P, 1 + 2P, ... and the density there is d = min(1, u + (1 - u) * (r - 1) / T), with T
the density horizon (`horizon`, by default the run's trainer.rounds; the official code keeps
T = 300 whatever the run's length).

Timing (`timing`):
- "client_start" (the default, the paper's description): at a scheduled round r each client
  sparsifies the model it has just received, then trains it in round r; the first event hits the
  initial model. FedProx anchors at the weights as received, before sparsity.
- "after_aggregation" (the official code): the event of scheduled round r happens after round r's
  aggregation, to the copy of the aggregated model each client receives, scored with the
  gradients of its round-r training; the sparse model is what the client is evaluated with after
  round r (personalised accuracy) and what it trains in round r + 1. The initial model is never
  sparsified, and FedProx anchors at the sparse model the client received.

Everything happens on the client's own rank: the gradient used for scoring is the client's own,
kept in a per-client store there, and the masks are never sent anywhere.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import nn

from fedlit.clients import Stream
from fedlit.context import Context
from fedlit.models.layers import Layer
from fedlit.state import ClientStore

log = logging.getLogger(__name__)

Score = Literal["grad_weight", "magnitude", "random"]
SCORES = ("grad_weight", "magnitude", "random")


def is_scheduled(round: int, period: int) -> bool:
    """Whether fedlit round `round` (1-based) is a sparsity round: official (round - 1) % P == 0."""
    return (round - 1) % period == 0


Timing = Literal["client_start", "after_aggregation"]
TIMINGS = ("client_start", "after_aggregation")


def density_at(round: int, total_rounds: int, initial_density: float) -> float:
    """d_i = min(1, u + (1 - u) * i / T) with i = round - 1, the official 0-based round."""
    i = round - 1
    return min(1.0, initial_density + (1.0 - initial_density) * i / total_rounds)


def kept_count(numel: int, density: float) -> int:
    """floor(numel * density), robust to the product landing a hair below an integer
    (0.29 * 100 is 28.999999999999996 in floating point, and 29 weights are meant)."""
    return min(numel, math.floor(numel * density + 1e-9))


def eligible_tensors(model: nn.Module, layers: list[Layer]) -> dict[str, str]:
    """Parameter name -> layer name of every weight LIPS may sparsify, in layer-map order.

    Eligible: the `weight` of each nn.Conv2d module, except in the stem (the first layer of the
    map that holds a conv weight) and in the classifier (the last layer of the map). Linear
    layers, biases and BatchNorm parameters are never eligible.
    """
    conv_weights = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)
    }
    per_layer = [(layer, [p for p in layer.params if p in conv_weights]) for layer in layers]
    stem = next((layer.name for layer, names in per_layer if names), None)
    classifier = layers[-1].name if layers else None
    return {
        name: layer.name
        for layer, names in per_layer
        if layer.name not in (stem, classifier)
        for name in names
    }


def zero_lowest(weight: torch.Tensor, scores: torch.Tensor, density: float) -> None:
    """Zero, in place, all entries of `weight` but the floor(numel * density) highest scores.

    The count is exact whatever the ties: a stable sort orders equal scores by position (lower
    flat indices are zeroed first), so the result is also deterministic on every device.
    """
    drop = weight.numel() - kept_count(weight.numel(), density)
    if drop <= 0:
        return
    lowest = torch.sort(scores.reshape(-1), stable=True).indices[:drop]
    with torch.no_grad():
        weight.view(-1).index_fill_(0, lowest, 0.0)


class TransientSparsity:
    """Zero part of the received conv weights every `period` rounds, per client (LIPS).

    Args:
        period: P; rounds 1, 1 + P, 1 + 2P, ... are sparsity rounds (official 0, P, 2P, ...).
        initial_density: u, the fraction of each eligible tensor kept at the first round
            (LIPS: 0.5 on CIFAR-10, 0.3 on CIFAR-100); the density grows linearly to 1 at the
            last round.
        score: "grad_weight" |g_k * w| with g_k the client's gradient from the last minibatch
            of its previous local training (|w| for a tensor the client has no gradient for
            yet, e.g. at its first participation); "magnitude" |w|; "random" uniform scores
            from the (seed, SPARSITY, round, client) stream.
        offload: keep the stored gradients on the CPU instead of the device (they take one
            copy of the eligible weights per client).
        timing: "client_start" (default) or "after_aggregation" (the official code; see the
            module docstring).
        horizon: T of the density schedule; None (default) uses trainer.rounds. The official
            code's T is 300 in every reported setting.
    """

    def __init__(
        self,
        period: int = 5,
        initial_density: float = 0.5,
        score: Score = "grad_weight",
        offload: bool = False,
        timing: Timing = "client_start",
        horizon: int | None = None,
    ) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"TransientSparsity.period must be an integer >= 1, got {period!r}")
        if not 0.0 < initial_density <= 1.0:
            raise ValueError(
                "TransientSparsity.initial_density must be in (0, 1] (the fraction of weights "
                f"kept at the first sparsity round; LIPS: 0.5 or 0.3), got {initial_density}"
            )
        if score not in SCORES:
            raise ValueError(
                f"TransientSparsity.score must be one of {list(SCORES)}, got {score!r}"
            )
        if timing not in TIMINGS:
            raise ValueError(
                f"TransientSparsity.timing must be one of {list(TIMINGS)}, got {timing!r}"
            )
        if horizon is not None and (
            isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1
        ):
            raise ValueError(
                "TransientSparsity.horizon must be null (trainer.rounds) or an integer >= 1 "
                f"(the official code: 300), got {horizon!r}"
            )
        self.timing = timing
        self.horizon = horizon
        self.period = period
        self.initial_density = float(initial_density)
        self.score = score
        self.offload = offload
        self._context: Context | None = None
        self._eligible: dict[str, str] = {}
        self._layers: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._grads: ClientStore | None = None
        self._counts: torch.Tensor | None = None

    # ---- hooks -------------------------------------------------------------------------------

    def on_fit_start(self, context: Context) -> None:
        self._context = context
        model = context.global_model
        self._eligible = eligible_tensors(model, context.layers)
        self._layers = list(dict.fromkeys(self._eligible.values()))
        self._layer_index = {layer: i for i, layer in enumerate(self._layers)}
        # each client's gradient from its last local minibatch, on its own rank
        self._grads = context.state.store("sparsity/grads", offload=self.offload)
        if not self._eligible:
            log.warning(
                "TransientSparsity: %s has no eligible conv weight (conv weights outside the "
                "stem and the classifier); nothing will be sparsified",
                type(model).__name__,
            )

    def density(self, round: int) -> float:
        """The density of the event of `round` (1 on rounds that are not sparsity rounds)."""
        if not is_scheduled(round, self.period):
            return 1.0
        horizon = self.horizon or self._context.rounds
        return density_at(round, horizon, self.initial_density)

    def event_trained_in(self, round: int) -> int | None:
        """The sparsity event whose model is trained in `round`: that round's own
        ("client_start") or the previous round's ("after_aggregation"); None when none."""
        event = round if self.timing == "client_start" else round - 1
        return event if event >= 1 and is_scheduled(event, self.period) else None

    def on_round_start(self, round: int) -> None:
        if self.event_trained_in(round) is not None:
            # [kept per layer..., numel per layer..., clients, clients scored by their gradient]
            size = 2 * len(self._layers) + 2
            self._counts = torch.zeros(size, dtype=torch.float64, device=self._context.device)

    def on_client_receive(self, round: int, client: int, model: nn.Module) -> None:
        """After round `round`'s aggregation (timing "after_aggregation"): sparsify the copy of
        the aggregated model `client` receives."""
        if self.timing == "after_aggregation" and round >= 1 and is_scheduled(round, self.period):
            self._sparsify(round, client, model)

    def on_client_start(self, round: int, client: int, model: nn.Module) -> None:
        event = self.event_trained_in(round)
        if event is None or self._counts is None:
            return
        if self.timing == "client_start":
            self._sparsify(event, client, model)
        params = dict(model.named_parameters())
        n = len(self._layers)
        for name, layer in self._eligible.items():
            weight = params[name]
            if not weight.requires_grad:
                continue
            index = self._layer_index[layer]
            self._counts[index] += torch.count_nonzero(weight.detach())
            self._counts[n + index] += weight.numel()
        self._counts[2 * n] += 1.0
        self._counts[2 * n + 1] += float(client in self._grads)

    def _sparsify(self, round: int, client: int, model: nn.Module) -> None:
        """Zero the lowest-scoring weights of every eligible tensor of `model`, to the density
        of the event of `round`, with `client`'s scores."""
        density = self.density(round)
        params = dict(model.named_parameters())
        stored = self._grads.get(client) if self.score == "grad_weight" else None
        generator = None
        if self.score == "random":
            generator = self._context.generator(Stream.SPARSITY, round, client)
        for name in self._eligible:
            weight = params[name]
            # A frozen weight (partial training) could not regrow and is not sent back: leave it.
            if not weight.requires_grad:
                continue
            gradient = stored.get(name) if stored is not None else None
            zero_lowest(weight, self._scores(weight, gradient, generator), density)

    def on_client_end(self, client: int, model: nn.Module) -> None:
        if self.score != "grad_weight" or not self._eligible:
            return
        params = dict(model.named_parameters())
        grads = {n: params[n].grad for n in self._eligible if params[n].grad is not None}
        if len(grads) < len(self._eligible):
            # Tensors frozen this round keep the gradient of the last round that trained them.
            grads = {**(self._grads.get(client) or {}), **grads}
        if grads:
            self._grads.put(client, grads)

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        event = self.event_trained_in(round)
        if event is None or self._counts is None:
            return
        counts = self._context.comm.all_reduce_sum(self._counts).tolist()  # one collective
        self._counts = None
        metrics.update(self._metrics(event, counts))

    # ---- internals ---------------------------------------------------------------------------

    def _scores(
        self,
        weight: torch.Tensor,
        gradient: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        w = weight.detach()
        if self.score == "random":
            return torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)
        if self.score == "grad_weight" and gradient is not None:
            return (gradient.to(w.dtype) * w).abs()
        return w.abs()

    def _metrics(self, round: int, counts: list[float]) -> dict[str, float]:
        n = len(self._layers)
        metrics = {"sparsity/target_density": self.density(round)}
        kept, total = counts[:n], counts[n : 2 * n]
        if sum(total) > 0:
            metrics["sparsity/density"] = sum(kept) / sum(total)
        for layer, k, t in zip(self._layers, kept, total, strict=True):
            if t > 0:
                metrics[f"layer/{layer}/density"] = k / t
        clients, scored = counts[2 * n], counts[2 * n + 1]
        if self.score == "grad_weight" and clients > 0:
            metrics["sparsity/grad_scored"] = scored / clients
        return metrics
