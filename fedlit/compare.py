"""`fedlit compare RUN_DIR...`: several runs side by side, as a table and one accuracy plot.

Reads what every fit writes into its run_dir (metrics.jsonl, summary.json, config.yaml), so it
works on runs from any machine, and on a run still in progress (no summary.json yet: its
numbers come from the rounds logged so far and its wall time is unknown).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from fedlit.loggers import human_bytes, method_label, read_metrics
from fedlit.plots import plot_comparison


@dataclass
class RunResult:
    """One run's numbers as the comparison shows them."""

    label: str
    method: str
    best_acc: float
    best_round: int
    final_acc: float
    rounds: int
    comm_bytes: int
    wall_seconds: float | None  # None while the run has no summary.json
    curve: tuple[list[int], list[float]]  # (round, test accuracy) of every evaluated round


def load_run(run_dir: Path, label: str) -> RunResult:
    """Read one run directory; ValueError naming the directory when it is not a fedlit run."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl here; is it a fedlit run_dir?")
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("test/acc"), float)]
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no evaluated round yet")
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    summary: dict[str, Any] = {}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    best = max(records, key=lambda r: r["test/acc"])
    last = records[-1]
    return RunResult(
        label=label,
        method=method_label(config or {}),
        best_acc=summary.get("best_test_acc", best["test/acc"]),
        best_round=summary.get("best_round", best["round"]),
        final_acc=summary.get("final_test_acc", last["test/acc"]),
        rounds=summary.get("rounds", last["round"]),
        comm_bytes=summary.get("comm_bytes", last.get("comm/bytes", 0)),
        wall_seconds=summary.get("wall_seconds"),
        curve=([r["round"] for r in records], [r["test/acc"] for r in records]),
    )


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or the path as given where two runs share a name."""
    names = Counter(p.name for p in run_dirs)
    return [p.name if names[p.name] == 1 else str(p) for p in run_dirs]


def comparison_table(results: list[RunResult]) -> Table:
    """One row per run; the best final accuracy in bold."""
    table = Table(title="fedlit compare")
    table.add_column("run", overflow="fold")
    table.add_column("method", max_width=36)
    for name in ("best acc", "round", "final acc", "rounds", "comm", "time"):
        table.add_column(name, justify="right", no_wrap=True)
    top = max(r.final_acc for r in results)
    for r in results:
        final = f"{r.final_acc:.4f}"
        wall = "running" if r.wall_seconds is None else f"{r.wall_seconds:.1f} s"
        table.add_row(
            r.label,
            r.method,
            f"{r.best_acc:.4f}",
            str(r.best_round),
            f"[bold]{final}[/bold]" if r.final_acc == top else final,
            str(r.rounds),
            human_bytes(r.comm_bytes),
            wall,
        )
    return table


def compare_runs(run_dirs: list[Path], plot_path: Path | None = None) -> tuple[Table, Path]:
    """The table and the accuracy plot (default: compare_accuracy.png next to the first run)."""
    results = [load_run(p, label) for p, label in zip(run_dirs, run_labels(run_dirs), strict=True)]
    plot_path = plot_path or run_dirs[0].parent / "compare_accuracy.png"
    plot_comparison({r.label: r.curve for r in results}, plot_path)
    return comparison_table(results), plot_path
