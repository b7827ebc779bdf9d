"""Showing a split: a label-count table for the terminal and a heat map for the run directory.

A non-IID experiment is only interpretable next to the split it ran on, so both are cheap to
produce from the (clients, classes) count matrix of `partition.label_counts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

# Beyond this many classes one column per class no longer fits a terminal; the table then lists
# each client's largest classes instead.
MAX_CLASS_COLUMNS = 20
TOP_CLASSES = 3
# Beyond these the heat map drops per-tick labels, which would overlap into a black bar.
MAX_CLASS_TICKS = 40
MAX_CLIENT_TICKS = 50


def label_count_table(
    counts: np.ndarray, classes: Sequence[str], title: str | None = None
) -> Table:
    """One row per client, one column per class (or its top classes when there are many)."""
    counts = np.asarray(counts)
    table = Table(title=title or "training samples per client and class")
    table.add_column("client", justify="right")
    wide = len(classes) <= MAX_CLASS_COLUMNS
    if wide:
        for name in classes:
            table.add_column(_short(name), justify="right")
    else:
        table.add_column("classes", justify="right")
        table.add_column(f"top {TOP_CLASSES} (count)")
    table.add_column("total", justify="right", style="bold")
    for k, row in enumerate(counts):
        if wide:
            cells = [str(v) if v else "[dim]0[/dim]" for v in row]
        else:
            top = np.argsort(-row, kind="stable")[:TOP_CLASSES]
            top_text = ", ".join(f"{_short(classes[c])} ({row[c]})" for c in top if row[c])
            cells = [str(int(np.count_nonzero(row))), top_text]
        table.add_row(str(k), *cells, str(int(row.sum())))
    return table


def plot_label_heatmap(
    counts: np.ndarray, classes: Sequence[str], path: str | Path, title: str | None = None
) -> Path:
    """PNG heat map: clients on x, classes on y, colour = samples. Returns the written path."""
    from matplotlib.figure import Figure  # only when drawing: the table needs no matplotlib

    counts = np.asarray(counts)
    num_clients, num_classes = counts.shape
    # pyplot is avoided on purpose: a bare Figure needs no GUI backend and leaks no global state.
    fig = Figure(figsize=(min(4 + 0.12 * num_clients, 20), min(2.5 + 0.2 * num_classes, 14)))
    ax = fig.add_subplot()
    image = ax.imshow(
        counts.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    ax.set_title(title or f"label distribution over {num_clients} clients")
    if num_classes <= MAX_CLASS_TICKS:
        ax.set_yticks(range(num_classes), [_short(c) for c in classes])
    if num_clients <= MAX_CLIENT_TICKS:
        ax.set_xticks(range(num_clients))
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _short(name: str, width: int = 12) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
