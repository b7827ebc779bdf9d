"""What a run writes: run_dir files (rank 0 only) and the rich console.

run_dir/config.yaml   the resolved config, as `--print_config` would show it
run_dir/metrics.jsonl one JSON object per evaluated round, appended and flushed as it happens
run_dir/summary.json  best and final accuracy, rounds, wall time, bytes communicated
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedlit.checkpoint import atomic_write_bytes


def _finite(value: Any) -> Any:
    """JSON has no NaN or inf; write them as null rather than emit an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunFiles:
    """The run directory's text outputs."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")

    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as file:
            file.write(json.dumps({k: _finite(v) for k, v in metrics.items()}) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2) + "\n"
        atomic_write_bytes(self.summary_path, lambda f: f.write(text.encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ConsoleReport:
    """Progress bar over rounds with the latest accuracy, and a closing table; rank 0 only."""

    def __init__(self, enabled: bool, total_rounds: int) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]round"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("rounds", total=total_rounds, status="")

    def __enter__(self) -> ConsoleReport:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def print(self, *objects: Any) -> None:
        if self.enabled:
            self.console.print(*objects)

    def round_done(self, metrics: dict[str, Any]) -> None:
        status = f"train loss {metrics['train/loss']:.4f}"
        if "test/acc" in metrics:
            status += f"  test acc {metrics['test/acc']:.4f}"
        self.progress.update(self.task, advance=1, status=status)

    def summary(self, summary: dict[str, Any]) -> None:
        table = Table(title="fedlit run summary", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in summary.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(key, shown)
        self.print(table)
