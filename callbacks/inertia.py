"""Layer-wise inertia of the global model (Xiao et al., LIPS, arXiv 2506.00932, 2025).

With small, skewed local datasets the middle layers of the global model stop moving after the
first rounds; aggregation then adds nothing there. This callback measures it for any method,
per layer of the model's layer map:

- ``cosine_to_ref``, ``l1_to_ref``, ``l2_to_ref``: cosine similarity, L1 and L2 distance of the
  layer's global weights to a snapshot taken after round ``reference_round``;
- ``rel_change``: ||W_t - W_(t-1)||_2 / ||W_(t-1)||_2, the layer's change over one round
  (W_0 is the initial model);
- ``grad_norm``: the L2 norm of the layer's gradient from each client's last local minibatch
  (what the model's ``.grad`` holds at ``on_client_end``), averaged over the round's clients that
  trained the layer.

The global model is identical on every rank, so the weight metrics need no communication; the
gradient norms land in one slot per sampled client, which one all-reduce per measured round
fills on every rank, and are summed in client order there: the same float64 sum on 1 and N
ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import nn

from fedlit.context import Context
from fedlit.models.layers import Layer

log = logging.getLogger(__name__)

# Modules whose `weight` is "the layer's weights" for the distances (BN affine parameters and
# biases are left out unless include="params").
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
METRICS = ("cosine_to_ref", "l1_to_ref", "l2_to_ref", "rel_change", "grad_norm")


def measured_tensors(
    model: nn.Module, layers: list[Layer], include: Literal["weights", "params"]
) -> dict[str, list[str]]:
    """Layer name -> the parameter names whose concatenation is measured as that layer.

    "weights": the `weight` of every conv / linear module in the layer; a layer without one
    (e.g. a lone BatchNorm) falls back to all of its parameters so that it is still measured.
    "params": every parameter of the layer (BN affine parameters and biases included).
    """
    weights = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, WEIGHT_MODULES) and getattr(module, "weight", None) is not None
    }
    chosen = {}
    for layer in layers:
        names = [p for p in layer.params if p in weights] if include == "weights" else []
        if names or layer.params:
            chosen[layer.name] = names or list(layer.params)
    return chosen


def flat_vector(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The named tensors concatenated into one detached float64 vector (a copy)."""
    return torch.cat([params[n].detach().reshape(-1) for n in names]).to(torch.float64)


def distances_to(current: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[cosine, L1, L2] between two vectors, as a float64 tensor (no host sync)."""
    diff = current - reference
    denominator = torch.linalg.vector_norm(current) * torch.linalg.vector_norm(reference)
    cosine = torch.dot(current, reference) / denominator.clamp_min(1e-300)
    return torch.stack([cosine.clamp(-1.0, 1.0), diff.abs().sum(), torch.linalg.vector_norm(diff)])


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """||current - previous|| / ||previous|| (0 when both are zero)."""
    return torch.linalg.vector_norm(current - previous) / torch.linalg.vector_norm(
        previous
    ).clamp_min(1e-300)


class LayerInertia:
    """Per-layer inertia metrics of the global model, logged every `every` rounds.

    Args:
        reference_round: the snapshot W_ref is the global model after this round's aggregation
            (0: the initial model). LIPS's official code uses "round 2". Before it, the
            `*_to_ref` metrics are not logged.
        every: measure on rounds divisible by `every` (and on the last round). The previous
            round's weights are kept every round, so `rel_change` is always a one-round change.
        include: "weights" measures each layer's conv / linear weight tensors; "params" all of
            the layer's parameters (biases and BN affine parameters too).
        plots: write heat maps (layer x round) of the cosine to the reference, the relative
            change and the gradient norm to run_dir/plots at the end of the run (rank 0).
    """

    def __init__(
        self,
        reference_round: int = 2,
        every: int = 1,
        include: Literal["weights", "params"] = "weights",
        plots: bool = True,
    ) -> None:
        if isinstance(reference_round, bool) or not isinstance(reference_round, int):
            raise ValueError(
                f"LayerInertia.reference_round must be an integer, got {reference_round!r}"
            )
        if reference_round < 0:
            raise ValueError(
                "LayerInertia.reference_round must be >= 0 (0 is the initial model), "
                f"got {reference_round}"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"LayerInertia.every must be an integer >= 1, got {every!r}")
        if include not in ("weights", "params"):
            raise ValueError(f"LayerInertia.include must be 'weights' or 'params', got {include!r}")
        self.reference_round = reference_round
        self.every = every
        self.include = include
        self.plots = plots
        self.history: list[dict[str, float]] = []
        self._context: Context | None = None
        self._names: dict[str, list[str]] = {}
        self._reference: dict[str, torch.Tensor] | None = None
        self._previous: dict[str, torch.Tensor] = {}
        self._grads: torch.Tensor | None = None  # (sampled clients, 2 x layers)
        self._slots: dict[int, int] = {}  # client -> its row of _grads

    # ---- hooks -------------------------------------------------------------------------------

    def on_fit_start(self, context: Context) -> None:
        self._context = context
        model = context.global_model
        self._names = measured_tensors(model, context.layers, self.include)
        if self.reference_round > context.rounds:
            log.warning(
                "LayerInertia.reference_round=%d is after the last round (%d): the *_to_ref "
                "metrics will not be logged",
                self.reference_round,
                context.rounds,
            )
        if not self._previous:  # not restored from a checkpoint
            self._previous = self._snapshot(model)
            if self.reference_round == 0:
                self._reference = {k: v.clone() for k, v in self._previous.items()}

    def on_round_start(self, round: int, clients: list[int]) -> None:
        if self._measures(round):
            layers = len(self._names)
            # a row per sampled client: [gradient norm per layer..., 1 per layer it trained...]
            self._slots = {client: row for row, client in enumerate(clients)}
            self._grads = torch.zeros(
                len(clients), 2 * layers, dtype=torch.float64, device=self._device()
            )

    def on_client_end(self, round: int, client: int, model: nn.Module) -> None:
        if self._grads is None or not self._measures(round):
            return
        params = dict(model.named_parameters())
        count = len(self._names)
        row = self._grads[self._slots[client]]
        for i, names in enumerate(self._names.values()):
            grads = [params[n].grad for n in names if params[n].grad is not None]
            if grads:
                squares = torch.stack(
                    [torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in grads]
                )
                row[i] = squares.sum().sqrt()
                row[count + i] = 1.0

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        current = self._snapshot(self._context.global_model)
        if self._reference is None and round == self.reference_round:
            self._reference = {k: v.clone() for k, v in current.items()}
        if self._measures(round):
            values = self._measure(current)
            metrics.update(values)
            self.history.append({"round": round, **values})
        self._previous = current

    def draw(self, plots_dir: Path) -> None:
        """The heat maps (rank 0, with figures on)."""
        if not (self.plots and self.history):
            return
        layers = list(self._names)
        plot_heatmap(self.history, layers, "cosine_to_ref", plots_dir / "inertia_cosine.png")
        plot_heatmap(
            self.history, layers, "rel_change", plots_dir / "inertia_rel_change.png", log=True
        )
        plot_heatmap(
            self.history, layers, "grad_norm", plots_dir / "inertia_grad_norm.png", log=True
        )

    # ---- state for resuming ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Snapshots (CPU tensors) and the metric history, enough to resume the measurement."""

        def cpu(vectors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if vectors is None else {k: v.cpu() for k, v in vectors.items()}

        return {
            "reference": cpu(self._reference),
            "previous": cpu(self._previous),
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self._device()

        def on_device(vectors):
            return None if vectors is None else {k: v.to(device) for k, v in vectors.items()}

        self._reference = on_device(state["reference"])
        self._previous = on_device(state["previous"]) or {}
        self.history = [dict(h) for h in state["history"]]

    # ---- internals ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self._context.device if self._context is not None else torch.device("cpu")

    def _measures(self, round: int) -> bool:
        last = self._context is not None and round == self._context.rounds
        return round % self.every == 0 or last

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        return {layer: flat_vector(params, names) for layer, names in self._names.items()}

    def _measure(self, current: dict[str, torch.Tensor]) -> dict[str, float]:
        """All metrics of one round, with one all-reduce and one device-to-host copy."""
        layers = list(self._names)
        rows = [torch.stack([relative_change(current[k], self._previous[k]) for k in layers])]
        if self._reference is not None:
            rows.append(
                torch.stack(
                    [distances_to(current[k], self._reference[k]) for k in layers]
                ).T.reshape(-1)
            )
        grads = self._grads
        if grads is None:  # on_round_start did not run (e.g. measured outside the engine)
            grads = torch.zeros(1, 2 * len(layers), dtype=torch.float64, device=self._device())
        self._context.comm.all_reduce_sum(grads)  # ONE collective per measured round
        # each slot is non-zero on one rank only, so the all-reduce is exact; the sum runs in
        # client order whatever the number of ranks
        total = torch.zeros(grads.shape[1], dtype=torch.float64, device=grads.device)
        for client_row in grads:
            total += client_row
        rows.append(total)
        values = torch.cat(rows).tolist()
        self._grads = None
        return self._named(layers, values, with_reference=self._reference is not None)

    @staticmethod
    def _named(layers: list[str], values: list[float], with_reference: bool) -> dict[str, float]:
        n = len(layers)
        out: dict[str, float] = {}
        rel, rest = values[:n], values[n:]
        for layer, value in zip(layers, rel, strict=True):
            out[f"layer/{layer}/rel_change"] = value
        if with_reference:
            refs, rest = rest[: 3 * n], rest[3 * n :]
            for j, metric in enumerate(("cosine_to_ref", "l1_to_ref", "l2_to_ref")):
                for layer, value in zip(layers, refs[j * n : (j + 1) * n], strict=True):
                    out[f"layer/{layer}/{metric}"] = value
        sums, counts = rest[:n], rest[n:]
        for layer, total, count in zip(layers, sums, counts, strict=True):
            if count > 0:  # a layer frozen for every client this round has no gradient
                out[f"layer/{layer}/grad_norm"] = total / count
        return out


def heatmap_grid(
    history: list[dict[str, float]], layers: list[str], metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """(rounds, layers x rounds grid) of `layer/<layer>/<metric>`; missing values are NaN."""
    rounds = np.array([int(h["round"]) for h in history], dtype=np.float64)
    grid = np.full((len(layers), len(history)), np.nan)
    for j, record in enumerate(history):
        for i, layer in enumerate(layers):
            value = record.get(f"layer/{layer}/{metric}")
            if value is not None:
                grid[i, j] = value
    return rounds, grid


def cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges halfway between consecutive rounds, so uneven spacing (every > 1, then the last
    round) is drawn to scale; a single round gets a cell of width 1."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middles = (centres[:-1] + centres[1:]) / 2
    first = centres[0] - (middles[0] - centres[0])
    last = centres[-1] + (centres[-1] - middles[-1])
    return np.concatenate([[first], middles, [last]])


def plot_heatmap(
    history: list[dict[str, float]], layers: list[str], metric: str, path: Path, log: bool = False
) -> Path | None:
    """Heat map of `layer/<layer>/<metric>`: layers as rows (input at the top), measured rounds
    as columns, blank where a layer has no value. Returns the path, or None (nothing written)
    when no round has the metric."""
    rounds, grid = heatmap_grid(history, layers, metric)
    finite = grid[np.isfinite(grid)]
    if finite.size == 0:
        return None
    norm = None
    if log and (finite > 0).all() and finite.min() < finite.max():
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    figure = Figure(figsize=(8, max(3.0, 0.35 * len(layers) + 1.5)), dpi=120)
    axes = figure.subplots()
    image = axes.pcolormesh(
        cell_edges(rounds),
        np.arange(len(layers) + 1) - 0.5,
        np.ma.masked_invalid(grid),
        cmap="viridis",
        norm=norm,
        shading="flat",
    )
    axes.set_ylim(len(layers) - 0.5, -0.5)  # input layer at the top
    axes.set_yticks(range(len(layers)), layers)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"layer-wise {metric.replace('_', ' ')}")
    figure.colorbar(image, ax=axes, label=metric + (" (log scale)" if norm is not None else ""))
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
