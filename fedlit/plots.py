"""The figures of a run, as PNG files (matplotlib's object API: no global state, no display).

Written by rank 0 into run_dir/plots at the end of a fit (the W&B logger uploads them):
accuracy.png, loss.png (per round), client_accuracy.png (spread over clients),
communication.png (bytes per round), partition.png (label distribution, drawn by
fedlit.data.report), layer_<metric>.png (one curve per layer, when callbacks add
`layer/<name>/<metric>` keys); `fedlit compare` draws compare_accuracy.png.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedlit.dashboard import layer_series

MIB = 1024 * 1024
# Beyond this many layers a legend stops being readable; curves are still drawn.
MAX_LEGEND_ENTRIES = 24


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the records that have a number under `key`."""
    points = [(r["round"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    if not points:
        return [], []
    xs, ys = zip(*points, strict=True)
    return list(xs), list(ys)


def _round_axes(axes: Axes, ylabel: str) -> None:
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    handles = axes.get_legend_handles_labels()[0]
    if 0 < len(handles) <= MAX_LEGEND_ENTRIES:
        axes.legend(fontsize=8)


def save_figure(figure: Figure, path: Path, run_name: str | None = None) -> Path:
    """Write `figure` as a PNG at `path` (creating its folder): every fedlit figure goes here.
    `run_name` heads the figure, so that a PNG out of its folder still says which run it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if run_name:
        figure.suptitle(f"run {run_name}", fontsize=9, color="dimgray")
    figure.tight_layout()
    figure.savefig(path)
    return path


def accuracy_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits that fit `values` (accuracies in [0, 1]) with a margin: clients between 0.95 and
    1.0 are drawn on about 0.94-1.01, where their differences show, not on 0-1."""
    if not values:
        return 0.0, 1.02
    low, high = min(values), max(values)
    pad = max(0.01, 0.1 * (high - low))
    return max(0.0, low - pad), min(1.02, high + pad)


def plot_curves(
    records: list[dict[str, Any]], plots_dir: Path, run_name: str | None = None
) -> list[Path]:
    """accuracy.png and loss.png over rounds from the metrics records; returns the paths."""
    panels = {
        "accuracy.png": (
            "accuracy",
            [
                ("test/acc", "global test"),
                ("personal/acc_global", "personalised (global model)"),
                ("personal/acc_local", "personalised (local model)"),
            ],
        ),
        "loss.png": ("loss", [("test/loss", "global test"), ("train/loss", "local train")]),
    }
    written = []
    for filename, (ylabel, keys) in panels.items():
        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.subplots()
        for key, label in keys:
            xs, ys = series(records, key)
            if xs:
                axes.plot(xs, ys, marker="o", markersize=3, label=label)
        _round_axes(axes, ylabel)
        written.append(save_figure(figure, plots_dir / filename, run_name))
    return written


def plot_client_accuracy(
    records: list[dict[str, Any]],
    final: Sequence[float],
    split: str,
    path: Path,
    run_name: str | None = None,
) -> Path:
    return save_figure(client_accuracy_figure(records, final, split), path, run_name)


def client_accuracy_figure(
    records: list[dict[str, Any]], final: Sequence[float], split: str
) -> Figure:
    """How evenly the federation serves its clients.

    Left (with personalised evaluation): mean +- std over clients of each round's personalised
    accuracy. Right: the final global model's accuracy on every client's `split` data, sorted,
    against the global test accuracy: a good mean can hide clients the model fails.
    """
    spread = [k for k in ("personal/acc_global", "personal/acc_local") if series(records, k)[0]]
    figure = Figure(figsize=(11 if spread else 6, 4), dpi=120)
    axes = figure.subplots(1, 2 if spread else 1, squeeze=False)[0]
    if spread:
        labels = {"personal/acc_global": "global model", "personal/acc_local": "local model"}
        for key in spread:
            xs, mean = series(records, key)
            _, std = series(records, f"{key}_std")
            line = axes[0].plot(xs, mean, marker="o", markersize=3, label=labels[key])[0]
            if len(std) == len(mean):
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                axes[0].fill_between(xs, low, high, color=line.get_color(), alpha=0.2)
        axes[0].set_title("accuracy over clients (mean ± std)")
        _round_axes(axes[0], "accuracy on the clients' local test data")
    bars = axes[-1]
    order = sorted(range(len(final)), key=lambda c: final[c])
    bars.bar(range(len(final)), [final[c] for c in order], color="tab:blue", alpha=0.8)
    if len(final) <= 50:
        bars.set_xticks(range(len(final)), [str(c) for c in order], fontsize=7)
    mean = sum(final) / max(1, len(final))
    bars.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean {mean:.3f}")
    _, test_acc = series(records, "test/acc")
    if test_acc:
        bars.axhline(
            test_acc[-1], color="tab:red", linewidth=1, label=f"global test {test_acc[-1]:.3f}"
        )
    bars.set_ylim(*accuracy_limits([*final, mean, *test_acc[-1:]]))
    bars.set_xlabel("client (sorted by accuracy)")
    bars.set_ylabel(f"final accuracy on the client's {split} data")
    bars.set_title(f"final global model, per client (min {min(final, default=0):.3f})")
    bars.legend(fontsize=8, loc="lower right")
    return figure


def plot_communication(
    records: list[dict[str, Any]], path: Path, run_name: str | None = None
) -> Path:
    return save_figure(communication_figure(records), path, run_name)


def communication_figure(records: list[dict[str, Any]]) -> Figure:
    """MiB moved per round (bars: downloads and uploads of the sampled clients, stacked; one bar
    of both for runs that logged only `comm/round_bytes`) and in total, next to what
    full-network training would have moved (`comm/full_bytes`, when logged)."""
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.subplots()
    xs, down = series(records, "comm/down_bytes")
    _, up = series(records, "comm/up_bytes")
    if down and len(up) == len(down):
        axes.bar(xs, [b / MIB for b in down], color="tab:blue", alpha=0.7, label="down")
        axes.bar(
            xs,
            [b / MIB for b in up],
            bottom=[b / MIB for b in down],
            color="tab:green",
            alpha=0.7,
            label="up",
        )
    else:
        xs, per_round = series(records, "comm/round_bytes")
        axes.bar(xs, [b / MIB for b in per_round], color="tab:blue", alpha=0.7, label="per round")
    axes.set_ylabel("MiB per round")
    total_axes = axes.twinx()
    xs_total, total = series(records, "comm/bytes")
    total_axes.plot(xs_total, [b / MIB for b in total], color="tab:orange", label="cumulative")
    xs_full, full = series(records, "comm/full_bytes")
    if full:
        total_axes.plot(
            xs_full,
            [b / MIB for b in full],
            color="tab:orange",
            linestyle="--",
            label="cumulative, full network",
        )
    total_axes.set_ylabel("MiB in total")
    total_axes.set_ylim(bottom=0)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    handles = axes.get_legend_handles_labels()[0] + total_axes.get_legend_handles_labels()[0]
    labels = axes.get_legend_handles_labels()[1] + total_axes.get_legend_handles_labels()[1]
    axes.legend(handles, labels, fontsize=8, loc="upper left")
    axes.set_title("communication (client uploads + downloads)")
    return figure


def curves_figure(
    curves: dict[str, tuple[list[int], list[float]]], ylabel: str, title: str
) -> Figure:
    """One curve per entry of `curves` (label -> (rounds, values)), in the dict's order."""
    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.subplots()
    for label, (xs, ys) in curves.items():
        axes.plot(xs, ys, marker="o", markersize=2, label=label)
    axes.set_title(title)
    _round_axes(axes, ylabel)
    return figure


def plot_layer_metrics(
    records: list[dict[str, Any]], plots_dir: Path, run_name: str | None = None
) -> list[Path]:
    """layer_<metric>.png for each `layer/<name>/<metric>` metric: one curve per layer, in the
    order the layers first appear (the layer map's order when callbacks log in that order)."""
    written = []
    for metric, layers in layer_series(records).items():
        figure = curves_figure(layers, metric, f"{metric} per layer")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in metric)
        written.append(save_figure(figure, plots_dir / f"layer_{safe}.png", run_name))
    return written


def plot_comparison(
    curves: dict[str, tuple[list[int], list[float]]], path: Path, ylabel: str = "test accuracy"
) -> Path:
    """One accuracy-per-round curve per run, for `fedlit compare`."""
    return save_figure(curves_figure(curves, ylabel, f"{ylabel} per round"), path)


def plot_accuracy_vs_comm(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> Path:
    """Test accuracy against cumulative communication (GB), one curve per run: how much a method
    pays in traffic for its accuracy (FedPart's claim is the same accuracy for a third)."""
    figure = Figure(figsize=(7, 4.5), dpi=120)
    axes = figure.subplots()
    for label, (sent, acc) in curves.items():
        axes.plot([b / 1e9 for b in sent], acc, marker="o", markersize=2, label=label)
    axes.set_xlabel("cumulative communication (GB, up + down)")
    axes.set_ylabel("test accuracy")
    axes.set_title("test accuracy against communication")
    axes.grid(alpha=0.3)
    if 0 < len(curves) <= MAX_LEGEND_ENTRIES:
        axes.legend(fontsize=8)
    return save_figure(figure, path)
