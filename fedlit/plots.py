"""Learning curves as PNG files (matplotlib's object API: no global state, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_curves(records: list[dict[str, Any]], plots_dir: Path) -> list[Path]:
    """accuracy.png and loss.png over rounds from the metrics records; returns the paths."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    rounds = [r["round"] for r in records]
    written = []
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
    for filename, (ylabel, series) in panels.items():
        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.subplots()
        for key, label in series:
            points = [
                (x, r[key]) for x, r in zip(rounds, records, strict=True) if r.get(key) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", markersize=3, label=label)
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
        figure.tight_layout()
        path = plots_dir / filename
        figure.savefig(path)
        written.append(path)
    return written
