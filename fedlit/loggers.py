"""What a run writes: run_dir files (rank 0 only) and the rich console.

run_dir/config.yaml   the resolved config, as `--print_config` would show it
run_dir/metrics.jsonl one JSON object per evaluated round, appended and flushed as it happens
run_dir/summary.json  best and final accuracy, rounds, wall time, bytes communicated

The console (rank 0, unless `logger.quiet`): a start-up panel describing the run, a progress
bar over rounds carrying the latest metrics and one over rank 0's clients of the current round,
and a closing table. W&B lives in fedlit.dashboard, the figures in fedlit.plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table

from fedlit.checkpoint import atomic_write_bytes, write_error


def _finite(value: Any) -> Any:
    """JSON has no NaN or inf; write them as null rather than emit an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _metrics_line(metrics: dict[str, Any]) -> str:
    return json.dumps({k: _finite(v) for k, v in metrics.items()}) + "\n"


class RunFiles:
    """The run directory's text outputs. A failed write is a WriteError naming the file and
    the cause (fedlit.checkpoint), never a traceback."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        run_dir.mkdir(parents=True, exist_ok=True)  # made by fedlit.rundir before a fit

    def write_config(self, text: str) -> None:
        atomic_write_bytes(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))

    def write_metrics(self, records: list[dict[str, Any]]) -> None:
        """metrics.jsonl := `records` (a fresh run: none; a resumed one: its checkpoint's),
        replaced atomically, so a failure leaves the previous file as it was."""
        text = "".join(_metrics_line(m) for m in records)
        atomic_write_bytes(self.metrics_path, lambda f: f.write(text.encode()))

    def append_metrics(self, metrics: dict[str, Any]) -> None:
        try:
            with self.metrics_path.open("a") as file:
                file.write(_metrics_line(metrics))
        except OSError as error:
            raise write_error(self.metrics_path, error, existed=True) from error

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2) + "\n"
        atomic_write_bytes(self.summary_path, lambda f: f.write(text.encode()))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': communication reads better in binary units than as raw counts."""
    units = ("B", "KiB", "MiB", "GiB")
    step = 0
    while abs(n) >= 1024 and step < len(units) - 1:
        n, step = n / 1024, step + 1
    return f"{n:.0f} B" if step == 0 else f"{n:.1f} {units[step]}"


def human_flops(n: float) -> str:
    """21865392000 -> '21.9 GFLOP' (decimal prefixes, as FLOP counts are quoted)."""
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} FLOP"


# What the round bar shows, in order: (metric key, label, format). Test metrics persist between
# evaluations so the bar always carries the latest known value.
STATUS_FIELDS = (
    ("test/acc", "acc", "{:.3f}"),
    ("train/loss", "loss", "{:.3f}"),
    ("test/loss", "test loss", "{:.3f}"),
    ("personal/acc_global", "personal", "{:.3f}"),
)


def status_line(latest: dict[str, Any]) -> str:
    parts = [
        f"{label} {fmt.format(latest[key])}"
        for key, label, fmt in STATUS_FIELDS
        if isinstance(latest.get(key), (int, float))
    ]
    if "comm/bytes" in latest:
        parts.append(f"comm {human_bytes(latest['comm/bytes'])}")
    return "  ".join(parts)


class ConsoleReport:
    """Start-up panel, progress over rounds and clients, closing table; rank 0 only."""

    def __init__(self, enabled: bool, total_rounds: int, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        # Fixed-width label and count columns; the status column takes what is left and is
        # the one truncated on a narrow terminal.
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(width=7, no_wrap=True)),
            MofNCompleteColumn(table_column=Column(width=7, no_wrap=True)),
            BarColumn(bar_width=20),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, ratio=1)),
            console=self.console,
            disable=not enabled,
            expand=True,
        )
        self.rounds = self.progress.add_task("round", total=total_rounds, status="")
        # Rank 0 sees only the clients it trains itself (its share of the round's sample).
        self.clients = self.progress.add_task("clients", total=None, status="on rank 0")
        self.latest: dict[str, Any] = {}

    def __enter__(self) -> ConsoleReport:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def print(self, *objects: Any) -> None:
        if self.enabled:
            self.console.print(*objects)

    def startup(self, rows: dict[str, str], title: str = "fedlit") -> None:
        """The run at a glance, before the first round: one row per aspect of the set-up."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        for key, value in rows.items():
            grid.add_row(key, value)
        self.print(Panel(grid, title=f"[bold]{title}[/bold]", expand=False))

    def client_done(self, done: int, total: int) -> None:
        self.progress.update(self.clients, completed=done, total=total)

    def round_done(self, metrics: dict[str, Any]) -> None:
        self.latest.update(metrics)
        self.progress.update(self.rounds, advance=1, status=status_line(self.latest))
        self.progress.reset(self.clients, total=None, status="on rank 0")

    def summary(self, summary: dict[str, Any]) -> None:
        self.print(summary_table(summary))


def summary_table(summary: dict[str, Any]) -> Table:
    """The closing table: accuracies as fractions, bytes and seconds in readable units."""
    table = Table(title="fedlit run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key.endswith("bytes") and isinstance(value, (int, float)):
            shown = human_bytes(value)
        elif key.endswith("seconds") and isinstance(value, (int, float)):
            shown = f"{value:.1f} s"
        elif key.endswith("flops") and isinstance(value, (int, float)):
            shown = human_flops(value)
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        table.add_row(key, shown)
    return table


def method_label(config: dict[str, Any], algorithm: object | None = None) -> str:
    """'FedAvg(buffers=average)': the algorithm of a resolved config (its class_path and
    init_args), or of the `algorithm` object when the config does not name one."""
    section = config.get("algorithm")
    section = section if isinstance(section, dict) else {}
    path = section.get("class_path")
    if isinstance(path, str):
        name = path.rpartition(".")[2]
    else:
        name = type(algorithm).__name__ if algorithm is not None else "unknown"
    args = section.get("init_args") or {}
    if not args and hasattr(algorithm, "buffers"):
        args = {"buffers": algorithm.buffers}
    return f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})"
