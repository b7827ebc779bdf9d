"""Per local step gradient and update norms, per layer and in total (FedPart's first figure).

Wang et al., "Why Go Full? Elevating Federated Learning Through Partial Network Updates"
(FedPart, NeurIPS 2024) show that with full-network FedAvg the gradient norm jumps at the first
local step after every aggregation: averaging whole networks breaks the fit between consecutive
layers ("layer mismatch"), and the first steps of the next round repair it; training one layer
per round makes the jumps smaller. This callback records, for every local optimisation step of
every client of a recorded round,

- the gradient norm ||g|| that the optimizer stepped with (what `.grad` holds after the step),
- the update norm ||theta_after - theta_before|| that the step actually made (momentum, Adam's
  scaling and weight decay included),

in total and per layer of the model's layer map, over the trainable parameters only (a layer
frozen by `select_layers` has no gradient and does not move: it has no value that round).

Everything stays on the device during training: one multi-tensor norm per step for the gradients
and one for the update, folded into per-layer values with one small matmul and added to a
per-step buffer; at the end of a recorded round one all-reduce sums the buffer over ranks and
the mean over clients of every step is taken. Clients have different numbers of steps (their
sizes differ), so step s is averaged over the clients that reached it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from torch import nn

from fedlit.context import Context
from fedlit.data.device import batch_bounds
from fedlit.plots import MAX_LEGEND_ENTRIES, save_figure

log = logging.getLogger(__name__)

FILENAME = "gradnorm.npz"
TOTAL = "total"
QUANTITIES = ("grad_norm", "update_norm")
# Metric topics of the two quantities: `gradnorm/<stat>` and `update_norm/<stat>`.
TOPICS = {"grad_norm": "gradnorm", "update_norm": "update_norm"}


def steps_per_round(size: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a client with `size` samples: the batches DeviceData.train_batches
    makes per epoch (a lone last sample joins the batch before it), times the epochs."""
    return len(batch_bounds(size, batch_size)) * epochs


class StepNorms:
    """Gradient and update norms of one client's steps, per layer and in total, on the device.

    Built once per client from the parameters it trains; `measure()` after each optimizer step
    returns a (2, rows) float32 tensor: row i of the layer rows is sqrt(sum of the squared
    norms of that layer's trainable parameters), the last row ("total") covers all of them.
    The values are rounded to float32 on purpose: sums of float32 values in a float64 buffer
    are exact, so the all-reduced sums do not depend on how clients are spread over ranks.
    """

    def __init__(self, params: list[nn.Parameter], groups: torch.Tensor) -> None:
        self.params = params
        self.groups = groups  # (params, rows) float64: 1 where a parameter belongs to a row
        self.before = [p.detach().clone() for p in params]
        self.zero = torch.zeros((), dtype=params[0].dtype, device=params[0].device)

    def restart(self) -> None:
        """theta_before := the weights now (a client starts from what it received)."""
        with torch.no_grad():
            torch._foreach_copy_(self.before, self.params)

    @torch.no_grad()
    def measure(self) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else self.zero for p in self.params]
        grad_norms = torch.stack(torch._foreach_norm(grads))
        torch._foreach_sub_(self.before, self.params)  # before - after: the step, negated
        update_norms = torch.stack(torch._foreach_norm(self.before))
        torch._foreach_copy_(self.before, self.params)  # the next step starts from here
        squares = torch.stack([grad_norms, update_norms]).double().square()
        return (squares @ self.groups).sqrt().float()


@dataclass
class GradNormCurves:
    """The recorded rounds' mean-over-clients curves: what run_dir/gradnorm.npz holds.

    rows: the layer names (layer-map order) and "total" last (only "total" without per_layer);
    rounds: (R,) recorded rounds; grad_norm, update_norm: (R, rows, steps) mean over the
    clients that took step s with the row trainable (NaN where none did); clients: (R, rows,
    steps) how many clients that is.
    """

    rows: list[str]
    rounds: np.ndarray
    grad_norm: np.ndarray
    update_norm: np.ndarray
    clients: np.ndarray

    @classmethod
    def empty(cls, rows: list[str], steps: int) -> GradNormCurves:
        shape = (0, len(rows), steps)
        return cls(
            list(rows),
            np.zeros(0, dtype=np.int64),
            np.zeros(shape),
            np.zeros(shape),
            np.zeros(shape),
        )

    def append(self, round: int, grad: np.ndarray, update: np.ndarray, clients: np.ndarray):
        """Add one round's (rows, steps) curves; a different step count (a resumed run with a
        new batch size or cap) pads the shorter side with NaN values and zero counts."""
        steps = max(grad.shape[-1], self.grad_norm.shape[-1])
        grad, update, clients = (_pad(a, steps, fill) for a, fill in _fills(grad, update, clients))
        self.grad_norm, self.update_norm, self.clients = (
            _pad(a, steps, fill)
            for a, fill in _fills(self.grad_norm, self.update_norm, self.clients)
        )
        self.rounds = np.append(self.rounds, np.int64(round))
        self.grad_norm = np.concatenate([self.grad_norm, grad[None]])
        self.update_norm = np.concatenate([self.update_norm, update[None]])
        self.clients = np.concatenate([self.clients, clients[None]])

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:  # a file object: np.savez would otherwise append ".npz"
            np.savez(
                f,
                rows=np.array(self.rows),
                rounds=self.rounds,
                grad_norm=self.grad_norm,
                update_norm=self.update_norm,
                clients=self.clients,
            )
        return path

    @classmethod
    def load(cls, path: Path) -> GradNormCurves:
        with np.load(path, allow_pickle=False) as f:
            return cls(
                [str(r) for r in f["rows"]],
                f["rounds"],
                f["grad_norm"],
                f["update_norm"],
                f["clients"],
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "rounds": torch.from_numpy(self.rounds.copy()),
            "grad_norm": torch.from_numpy(self.grad_norm.copy()),
            "update_norm": torch.from_numpy(self.update_norm.copy()),
            "clients": torch.from_numpy(self.clients.copy()),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GradNormCurves:
        return cls(
            list(state["rows"]),
            *(state[k].numpy().copy() for k in ("rounds", "grad_norm", "update_norm", "clients")),
        )

    def series(self, quantity: str, row: str = TOTAL) -> tuple[list[np.ndarray], list[int]]:
        """One curve per recorded round (its steps taken by at least one client) of `quantity`
        for `row`, and the rounds; a round where the row was not trained gives an empty curve."""
        values = getattr(self, quantity)[:, self.rows.index(row)]
        counts = self.clients[:, self.rows.index(row)]
        return [v[c > 0] for v, c in zip(values, counts, strict=True)], [
            int(r) for r in self.rounds
        ]

    def jump(self) -> dict[str, float]:
        """`<topic>/jump` of the last recorded round: its first step divided by the last step of
        the round before, i.e. across the aggregation in between. Only when that round was
        recorded too and trained the same layers (else the two totals cover different
        parameters, as when FedPart moves to the next layer)."""
        if len(self.rounds) < 2 or self.rounds[-2] != self.rounds[-1] - 1:
            return {}
        if not np.array_equal(self.clients[-2, :, 0] > 0, self.clients[-1, :, 0] > 0):
            return {}
        out = {}
        for quantity in QUANTITIES:
            before, after = self.series(quantity)[0][-2:]
            if before.size and after.size and before[-1] > 0:
                out[f"{TOPICS[quantity]}/jump"] = float(after[0] / before[-1])
        return out

    def spikes(self, quantity: str) -> np.ndarray:
        """Per recorded round: the total curve's first step divided by its median step."""
        curves, _ = self.series(quantity)
        return np.array([spike(c) for c in curves])


def _fills(grad, update, clients):
    return ((grad, np.nan), (update, np.nan), (clients, 0.0))


def _pad(values: np.ndarray, steps: int, fill: float) -> np.ndarray:
    """`values` with its last (step) axis padded to `steps` with `fill`."""
    missing = steps - values.shape[-1]
    if missing <= 0:
        return values
    widths = [(0, 0)] * (values.ndim - 1) + [(0, missing)]
    return np.pad(values, widths, constant_values=fill)


def spike(curve: np.ndarray) -> float:
    """First step / median step of a round's curve (NaN when empty or the median is 0)."""
    if curve.size == 0:
        return float("nan")
    median = float(np.median(curve))
    return float(curve[0]) / median if median > 0 else float("nan")


def mean_curves(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grad, update) means per row and step from the summed (2, rows, steps) values and the
    (rows, steps) client counts; NaN where no client contributed."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means[0], means[1]


def round_metrics(
    rows: list[str], grad: np.ndarray, update: np.ndarray, counts: np.ndarray
) -> dict[str, float]:
    """The round's scalars: first step, last step, mean and median over the steps of the total
    curve, and the spike (first / median), for both quantities; per layer the mean over steps
    (only for layers trained this round)."""
    metrics: dict[str, float] = {}
    taken = counts[-1] > 0
    if not taken.any():
        return metrics
    for quantity, curves in zip(QUANTITIES, (grad, update), strict=True):
        curve = curves[-1][taken]
        topic = TOPICS[quantity]
        metrics[f"{topic}/first_step"] = float(curve[0])
        metrics[f"{topic}/last_step"] = float(curve[-1])
        metrics[f"{topic}/mean"] = float(curve.mean())
        metrics[f"{topic}/median"] = float(np.median(curve))
        metrics[f"{topic}/spike"] = spike(curve)
    metrics["gradnorm/steps"] = int(taken.sum())
    for i, name in enumerate(rows[:-1]):
        trained = counts[i] > 0
        if trained.any():
            metrics[f"layer/{name}/step_grad_norm"] = float(grad[i][trained].mean())
            metrics[f"layer/{name}/step_update_norm"] = float(update[i][trained].mean())
    return metrics


class GradientNorms:
    """Gradient norm and update norm of every local step, per layer and in total.

    Args:
        every: record rounds divisible by `every` (1: every round); 0 records only `rounds`.
        rounds: further rounds to record (e.g. [1, 2, 50, 51]), in addition to `every`.
        per_layer: also record each layer of the layer map (else only the total).
        max_steps: record only each client's first `max_steps` local steps of a round (None:
            all of them). The spike is at the first steps; a cap bounds the buffer and the
            per-step cost for long local training.
        plots: draw plots/gradnorm_steps.png (and gradnorm_layers.png with per_layer) at the
            end of the run (rank 0, when logger.plots is on).

    Not recording a round costs nothing: every hook returns at once. In a recorded round each
    step costs two multi-tensor norms, one copy of the trainable weights and a few tiny ops, all
    on the device; the weights each client received are kept (one copy of the trainable
    parameters) to measure the first update. Callbacks that change the weights in
    on_client_start (LIPS's sparsity) must be listed before this one, or their change counts
    as part of the first step's update.
    """

    def __init__(
        self,
        every: int = 1,
        rounds: list[int] | None = None,
        per_layer: bool = True,
        max_steps: int | None = None,
        plots: bool = True,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"GradientNorms.every must be an integer >= 0 (0: only the listed rounds), "
                f"got {every!r}"
            )
        listed = list(rounds or [])
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in listed):
            raise ValueError(f"GradientNorms.rounds must list rounds >= 1, got {rounds!r}")
        if every == 0 and not listed:
            raise ValueError(
                "GradientNorms records no round with every=0 and no rounds: set every >= 1 or "
                "list the rounds to record in GradientNorms.rounds"
            )
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise ValueError(
                f"GradientNorms.max_steps must be an integer >= 1 or null, got {max_steps!r}"
            )
        self.every = every
        self.rounds = sorted(set(listed))
        self.per_layer = per_layer
        self.max_steps = max_steps
        self.plots = plots
        self.curves: GradNormCurves | None = None
        self._fed: Context | None = None
        self._rows: list[str] = [TOTAL]
        self._row_of: dict[str, int] = {}  # parameter name -> layer row
        self._capacity = 0
        self._sums: torch.Tensor | None = None  # (2, rows, steps) float64
        self._counts: torch.Tensor | None = None  # (rows, steps) float64
        self._meters: dict[tuple[int, frozenset[str]], tuple[StepNorms, torch.Tensor]] = {}
        self._meter: StepNorms | None = None
        self._trained_rows: torch.Tensor | None = None
        self._steps = 0

    def records(self, round: int) -> bool:
        return (self.every > 0 and round % self.every == 0) or round in self.rounds

    # ---- hooks -------------------------------------------------------------------------------

    def on_fit_start(self, context: Context) -> None:
        self._fed = context
        layers = context.layers
        if self.per_layer:
            self._rows = [layer.name for layer in layers] + [TOTAL]
            self._row_of = {p: i for i, layer in enumerate(layers) for p in layer.params}
        else:
            self._rows = [TOTAL]
            self._row_of = {p: 0 for layer in layers for p in layer.params}
        trainer = context.trainer
        longest = max(
            steps_per_round(n, trainer.batch_size, trainer.local_epochs)
            for n in context.client_sizes
        )
        self._capacity = min(longest, self.max_steps or longest)
        if self.curves is None:  # not restored from a checkpoint
            self.curves = GradNormCurves.empty(self._rows, self._capacity)

    def on_round_start(self, round: int) -> None:
        if not self.records(round):
            return
        rows, device = len(self._rows), self._device()
        self._sums = torch.zeros(2, rows, self._capacity, dtype=torch.float64, device=device)
        self._counts = torch.zeros(rows, self._capacity, dtype=torch.float64, device=device)

    def on_client_start(self, round: int, model: nn.Module) -> None:
        if self._sums is None or not self.records(round):
            return
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            return
        key = (id(model), frozenset(n for n, _ in named))
        if key not in self._meters:
            self._meters[key] = self._new_meter(named)
        self._meter, self._trained_rows = self._meters[key]
        self._meter.restart()
        self._steps = 0

    def on_train_batch_end(self, step: int) -> None:
        if self._meter is None or step >= self._capacity:
            return
        self._sums[:, :, step] += self._meter.measure()
        self._steps = step + 1

    def on_client_end(self) -> None:
        if self._meter is None:
            return
        self._counts[self._trained_rows, : self._steps] += 1.0
        self._meter = None

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        if self._sums is None or not self.records(round):
            return
        # ONE collective per recorded round: the per-step sums and counts of every rank
        flat = torch.cat([self._sums.reshape(-1), self._counts.reshape(-1)])
        self._fed.comm.all_reduce_sum(flat)
        values = flat.cpu().numpy()
        rows, steps = len(self._rows), self._capacity
        sums = values[: 2 * rows * steps].reshape(2, rows, steps)
        counts = values[2 * rows * steps :].reshape(rows, steps)
        grad, update = mean_curves(sums, counts)
        self.curves.append(round, grad, update, counts)
        metrics.update(round_metrics(self._rows, grad, update, counts))
        metrics.update(self.curves.jump())
        self._sums = self._counts = None

    def save(self, run_dir: Path) -> None:
        """run_dir/gradnorm.npz (rank 0, at the end)."""
        if self.curves is not None and len(self.curves.rounds):
            self.curves.save(run_dir / FILENAME)

    def draw(self, plots_dir: Path) -> None:
        """The per-step figures (rank 0, figures on)."""
        if not self.plots or self.curves is None or not len(self.curves.rounds):
            return
        plot_gradnorm_steps(self.curves, plots_dir / "gradnorm_steps.png")
        if self.per_layer:
            plot_gradnorm_layers(self.curves, plots_dir / "gradnorm_layers.png")

    # ---- state for resuming ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The recorded curves (identical on every rank), as CPU tensors."""
        return {"curves": None if self.curves is None else self.curves.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["curves"]
        self.curves = None if saved is None else GradNormCurves.from_state(saved)

    # ---- internals ---------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self._fed.device if self._fed is not None else torch.device("cpu")

    def _new_meter(self, named: list[tuple[str, nn.Parameter]]) -> tuple[StepNorms, torch.Tensor]:
        """A StepNorms for this set of trainable parameters, and the rows it trains (its layers
        and the total), cached: a FedPart run has one per layer plus the full network."""
        rows = len(self._rows)
        device = named[0][1].device
        groups = torch.zeros(len(named), rows, dtype=torch.float64, device=device)
        for i, (name, _) in enumerate(named):
            groups[i, self._row_of[name]] = 1.0
        groups[:, -1] = 1.0  # the total row covers every trainable parameter
        trained = groups.sum(dim=0) > 0
        return StepNorms([p for _, p in named], groups), trained


# ---- plots ------------------------------------------------------------------------------------


def concatenated(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(x, y, round starts) of rounds' curves laid end to end along one local-step axis."""
    starts, xs, ys, offset = [], [], [], 0
    for curve in curves:
        starts.append(offset)
        xs.append(offset + np.arange(len(curve)))
        ys.append(curve)
        offset += len(curve)
    if not xs:
        return np.zeros(0), np.zeros(0), []
    return np.concatenate(xs), np.concatenate(ys), starts


def _mark_aggregations(axes: Axes, starts: list[int], color: str = "grey") -> None:
    """A dashed line where each recorded round starts, i.e. right after an aggregation."""
    for i, start in enumerate(starts[1:]):
        axes.axvline(
            start - 0.5,
            color=color,
            linestyle="--",
            linewidth=0.7,
            alpha=0.6,
            label="aggregation" if i == 0 else None,
        )


def _log_if_positive(axes: Axes, values: list[np.ndarray]) -> None:
    """Log scale when the values are positive and span more than a factor 3, with plain tick
    labels at 1, 2 and 5 times the powers of ten (every power alone over wide spans)."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if not (finite.size and (finite > 0).all() and finite.max() > 3 * finite.min()):
        return
    axes.set_yscale("log")
    wide = finite.max() > 1000 * finite.min()
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())


def _round_ticks(axes: Axes, starts: list[int], rounds: list[int], lengths: list[int]) -> None:
    """Round numbers on a top axis, at the middle of each round (at most ~12 labels)."""
    if not starts:
        return
    keep = max(1, -(-len(starts) // 12))
    top = axes.secondary_xaxis("top")
    top.set_xticks(
        [s + (n - 1) / 2 for s, n in zip(starts, lengths, strict=True)][::keep],
        [str(r) for r in rounds][::keep],
    )
    top.set_xlabel("round", fontsize=8)
    top.tick_params(labelsize=7)


def plot_gradnorm_steps(curves: GradNormCurves, path: Path) -> Path | None:
    """The paper's first figure for one run: total gradient norm (top) and update norm
    (bottom) of every local step, mean over clients, rounds laid end to end with the
    aggregations marked. None (nothing written) when no round was recorded."""
    if not len(curves.rounds):
        return None
    figure = Figure(figsize=(10, 6), dpi=120)
    panels = figure.subplots(2, 1, sharex=True)
    for axes, quantity, ylabel in zip(
        panels, QUANTITIES, ("gradient norm", "update norm"), strict=True
    ):
        per_round, rounds = curves.series(quantity)
        x, y, starts = concatenated(per_round)
        axes.plot(x, y, linewidth=0.9, color="tab:blue", label=f"{ylabel} (total)")
        _mark_aggregations(axes, starts)
        _log_if_positive(axes, per_round)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, loc="upper right")
        if axes is panels[0]:
            _round_ticks(axes, starts, rounds, [len(c) for c in per_round])
    panels[-1].set_xlabel("local step (recorded rounds end to end; mean over clients)")
    return save_figure(figure, path)


def plot_gradnorm_layers(curves: GradNormCurves, path: Path) -> Path | None:
    """Per-layer gradient norm (top) and update norm (bottom) of every local step, one line per
    layer, rounds end to end; a layer has no line in the rounds it was frozen."""
    layers = curves.rows[:-1]
    if not layers or not len(curves.rounds):
        return None
    figure = Figure(figsize=(10, 6), dpi=120)
    panels = figure.subplots(2, 1, sharex=True)
    _, _, starts = concatenated(curves.series("grad_norm")[0])
    for axes, quantity, ylabel in zip(
        panels, QUANTITIES, ("gradient norm", "update norm"), strict=True
    ):
        values = getattr(curves, quantity)
        taken = curves.clients[:, -1] > 0  # steps of each round, as laid out on the x axis
        drawn = []
        for i, layer in enumerate(layers):
            y = np.concatenate([values[r, i][taken[r]] for r in range(len(curves.rounds))])
            drawn.append(y)
            axes.plot(np.arange(len(y)), y, linewidth=0.8, label=layer)
        _mark_aggregations(axes, starts)
        _log_if_positive(axes, drawn)
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if len(layers) <= MAX_LEGEND_ENTRIES:
            axes.legend(fontsize=7, loc="upper right", ncol=2)
    panels[-1].set_xlabel("local step (recorded rounds end to end; mean over clients)")
    return save_figure(figure, path)


def plot_gradnorm_comparison(run_dirs: list[Path], labels: list[str], path: Path) -> Path | None:
    """Several runs' total gradient and update norms per local step on one figure (FedPart's
    Figure 1: FedAvg against FedPart), plus each recorded round's spike (first step / median
    step), which compares runs whose norms differ in scale (a FedPart round measures one layer).

    Runs without run_dir/gradnorm.npz are skipped with a warning; None (nothing written) when
    no run has one.
    """
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} run directories but {len(labels)} labels")
    loaded = []
    for run_dir, label in zip(run_dirs, labels, strict=True):
        file = Path(run_dir) / FILENAME
        if file.is_file():
            loaded.append((label, GradNormCurves.load(file)))
        else:
            log.warning("%s has no %s (no GradientNorms callback?): left out", run_dir, FILENAME)
    if not loaded:
        return None
    figure = Figure(figsize=(10, 9), dpi=120)
    panels = figure.subplots(3, 1)
    colours = [f"C{i}" for i in range(len(loaded))]
    layouts = [concatenated(curves.series("grad_norm")[0])[2] for _, curves in loaded]
    shared = all(starts == layouts[0] for starts in layouts)
    for axes, quantity, ylabel in zip(
        panels[:2], QUANTITIES, ("gradient norm", "update norm"), strict=True
    ):
        drawn = []
        for (label, curves), colour in zip(loaded, colours, strict=True):
            per_round, _ = curves.series(quantity)
            x, y, starts = concatenated(per_round)
            axes.plot(x, y, linewidth=0.8, color=colour, label=label)
            if not shared:  # each run's own round boundaries, in its colour
                _mark_aggregations(axes, starts, colour)
            drawn.extend(per_round)
        if shared:
            _mark_aggregations(axes, layouts[0])
        _log_if_positive(axes, drawn)
        axes.set_xlabel("local step (recorded rounds end to end; mean over clients)")
        axes.set_ylabel(f"{ylabel} (total)")
        axes.grid(alpha=0.3)
        handles, names = axes.get_legend_handles_labels()
        unique = dict(zip(names, handles, strict=True))  # one "aggregation" entry
        axes.legend(unique.values(), unique.keys(), fontsize=8, loc="upper right")
    spikes = panels[2]
    for (label, curves), colour in zip(loaded, colours, strict=True):
        spikes.plot(
            curves.rounds,
            curves.spikes("grad_norm"),
            marker="o",
            markersize=3,
            color=colour,
            label=label,
        )
    spikes.axhline(1.0, color="black", linewidth=0.7)
    spikes.set_xlabel("round")
    spikes.set_ylabel("first step / median step")
    spikes.set_title("gradient-norm spike after aggregation", fontsize=9)
    spikes.grid(alpha=0.3)
    spikes.legend(fontsize=8)
    return save_figure(figure, path)
