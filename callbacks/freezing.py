"""FedPart's layer schedule (Wang et al., "Why Go Full? Elevating Federated Learning Through
Partial Network Updates", NeurIPS 2024): train and communicate one layer per round.

Averaging full networks after every round breaks the fit between consecutive layers ("layer
mismatch"), which shows as a spike of the gradient norm right after each aggregation. FedPart
trains only one layer of the layer map per round, shallow to deep, `rounds_per_layer` rounds
each, with `warmup_rounds` full-network rounds before every cycle. One cycle of a model with L
layers therefore lasts W + L * R rounds (ResNet-8: 5 + 10 * 2 = 25).

The engine does the rest: it asks `select_layers` before each round, freezes every other layer
(requires_grad=False, so no weight gradient is computed and backward stops below the chosen
layer), builds the optimizer over the chosen layer only and reduces only its tensors.

The schedule is a pure function of the round number (random orders are drawn from a stream keyed
by (seed, cycle)), so it is the same on every rank, can be printed before training and needs no
state in a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure

from fedlit.clients import Stream, stream_seed
from fedlit.context import Context
from fedlit.models.layers import Layer
from fedlit.plots import save_figure

Order = Literal["forward", "reverse", "random"]
ORDERS = ("forward", "reverse", "random")


class FedPartSchedule:
    """Which layers each round trains and sends: FedPart's cyclic one-layer-at-a-time schedule.

    Args:
        rounds_per_layer: R, consecutive rounds each layer is trained (official code: 2).
        warmup_rounds: W, full-network rounds at the start of every cycle (official code: 5);
            the first block is the warm-up, later ones are the full rounds between cycles. 0
            skips them (the paper's warm-up ablation).
        cycles: C, how many cycles to run; rounds after the last cycle train the full network.
            None repeats cycles until trainer.rounds (the official code's behaviour); the paper
            trains C cycles of W + L * R rounds, so set trainer.rounds to C * (W + L * R).
        order: "forward" (shallow to deep, the paper's method), "reverse" (deep to shallow) or
            "random" (a fresh permutation per cycle): the paper's training-sequence ablation.
        layers: the layer-map names to cycle through, in this order before `order` applies;
            None uses every layer of the model's map.
    """

    def __init__(
        self,
        rounds_per_layer: int = 2,
        warmup_rounds: int = 5,
        cycles: int | None = None,
        order: Order = "forward",
        layers: list[str] | None = None,
    ) -> None:
        if rounds_per_layer < 1:
            raise ValueError(
                f"FedPartSchedule.rounds_per_layer must be >= 1, got {rounds_per_layer}"
            )
        if warmup_rounds < 0:
            raise ValueError(f"FedPartSchedule.warmup_rounds must be >= 0, got {warmup_rounds}")
        if cycles is not None and cycles < 1:
            raise ValueError(f"FedPartSchedule.cycles must be >= 1 or null, got {cycles}")
        if order not in ORDERS:
            raise ValueError(f"FedPartSchedule.order must be one of {ORDERS}, got {order!r}")
        if layers is not None and len(layers) == 0:
            raise ValueError("FedPartSchedule.layers must name at least one layer, or be null")
        if layers is not None and len(set(layers)) != len(layers):
            raise ValueError(f"FedPartSchedule.layers lists a layer twice: {layers}")
        self.rounds_per_layer = rounds_per_layer
        self.warmup_rounds = warmup_rounds
        self.cycles = cycles
        self.order = order
        self.layers = list(layers) if layers is not None else None
        self.seed = 0
        self._map: list[str] | None = None
        self._rounds = 0

    def check_layers(self, layers: list[Layer]) -> None:
        """Before any rank starts: `layers` must name layers the model has."""
        names = [layer.name for layer in layers]
        unknown = [name for name in self.layers or [] if name not in names]
        if unknown:
            raise ValueError(
                f"FedPartSchedule.layers names {unknown}, which the model's layer map does not "
                f"have; its layers are {names}"
            )

    def on_fit_start(self, context: Context) -> None:
        self.seed = context.seed
        self._map = [layer.name for layer in context.layers]
        self._rounds = context.rounds

    def cycle_length(self, num_layers: int) -> int:
        """W + L * R rounds."""
        return self.warmup_rounds + num_layers * self.rounds_per_layer

    def cycle_order(self, cycle: int, names: list[str]) -> list[str]:
        """The layers of cycle `cycle` (0-based) in the order they are trained."""
        if self.order == "forward":
            return list(names)
        if self.order == "reverse":
            return names[::-1]
        rng = np.random.default_rng(stream_seed(self.seed, Stream.SCHEDULE, cycle))
        return [names[i] for i in rng.permutation(len(names))]

    def layer_at(self, round: int, names: list[str]) -> str | None:
        """The one layer trained in `round` (1-based), or None for a full-network round."""
        scheduled = self.layers if self.layers is not None else names
        period = self.cycle_length(len(scheduled))
        cycle, position = divmod(round - 1, period)
        if self.cycles is not None and cycle >= self.cycles:
            return None
        if position < self.warmup_rounds:
            return None
        index = (position - self.warmup_rounds) // self.rounds_per_layer
        return self.cycle_order(cycle, scheduled)[index]

    def select_layers(self, round: int, layers: list[str]) -> list[str] | None:
        """The engine's question: this round's layers (None keeps every layer)."""
        chosen = self.layer_at(round, self._map or layers)
        return None if chosen is None else [chosen]

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        """`fedpart/layer`: the index in the layer map of the layer trained (-1: all of them),
        so dashboards can line curves up with the schedule."""
        names = self._map or []
        chosen = self.layer_at(round, names) if names else None
        metrics["fedpart/layer"] = -1 if chosen is None else names.index(chosen)

    def draw(self, plots_dir: Path, history: list[dict[str, Any]]) -> None:
        """plots/fedpart_schedule.png (rank 0, figures on): test accuracy over the trained
        layer, round by round, over the whole history (a resumed run's too)."""
        if self._map is None:
            return
        records = [m for m in history if "test/acc" in m]
        trained = [self.layer_at(r, self._map) for r in range(1, self._rounds + 1)]
        plot_schedule(records, self._map, trained, plots_dir)


def plot_schedule(
    records: list[dict[str, Any]], names: list[str], trained: list[str | None], plots_dir: Path
) -> Path:
    """Test accuracy per round above the layer each round trained (full rounds shaded)."""
    figure = Figure(figsize=(8, 5.5), dpi=120)
    acc_axes, layer_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    rounds = list(range(1, len(trained) + 1))
    for r, layer in zip(rounds, trained, strict=True):
        if layer is None:
            for axes in (acc_axes, layer_axes):
                axes.axvspan(r - 0.5, r + 0.5, color="0.9", lw=0)
    evaluated = [m for m in records if isinstance(m.get("test/acc"), float)]
    acc_axes.plot(
        [m["round"] for m in evaluated], [m["test/acc"] for m in evaluated], marker="o", ms=2
    )
    acc_axes.set_ylabel("test accuracy")
    acc_axes.set_title("FedPart: accuracy and the layer trained each round (grey: all layers)")
    acc_axes.grid(alpha=0.3)
    full = len(names)
    levels = [full if layer is None else names.index(layer) for layer in trained]
    layer_axes.step(rounds, levels, where="mid")
    layer_axes.set_yticks(range(full + 1), [*names, "all"], fontsize=7)
    layer_axes.set_xlabel("round")
    layer_axes.grid(alpha=0.3)
    return save_figure(figure, plots_dir / "fedpart_schedule.png")
