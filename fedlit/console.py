"""What a run shows on the console (rank 0, stderr): live bars on a terminal, log lines elsewhere.

On a terminal: a start-up panel, a round bar (elapsed, ETA, seconds per round, the latest
metrics) and below it one line for what rank 0 is doing now (its clients, the steps of the
client in training, or a labelled evaluation), then the closing table. Every line fits 80
columns; the activity line is removed when the rounds end, so no stale `clients 0/5` remains.

Elsewhere (a file, a pipe, a batch system's log) nothing redraws: each round is one plain
`key=value` line, written when the round ends, and a long client adds a line at most every
`PlainLog.every` seconds, so a log shows progress while the run is alive and parses with a split.

`logger.quiet` turns all of it off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Column, Table
from rich.text import Text

from fedlit.units import human_bytes, human_duration, human_flops

# What the round bar shows, in order: (metric key, label, format). Test metrics persist between
# evaluations so the bar always carries the latest known value.
STATUS_FIELDS = (
    ("test/acc", "acc", "{:.3f}"),
    ("train/loss", "loss", "{:.3f}"),
    ("comm/bytes", "comm", "{}"),
    ("test/loss", "test loss", "{:.3f}"),
    ("personal/acc_global", "personal", "{:.3f}"),
)
# The plain log's round line: (metric key, log key, format).
LOG_FIELDS = (
    ("train/loss", "train_loss", "{:.4f}"),
    ("test/acc", "test_acc", "{:.4f}"),
    ("test/loss", "test_loss", "{:.4f}"),
    ("personal/acc_global", "personal_acc", "{:.4f}"),
    ("comm/bytes", "comm_bytes", "{:d}"),
)


def status_line(latest: dict[str, Any]) -> str:
    """The round bar's metrics: the latest known value of each."""
    parts = []
    for key, label, fmt in STATUS_FIELDS:
        value = latest.get(key)
        if isinstance(value, (int, float)):
            shown = human_bytes(value) if key == "comm/bytes" else fmt.format(value)
            parts.append(f"{label} {shown}")
    return " ".join(parts)


def clock_time(seconds: float) -> str:
    """754 -> '12:34', 5025 -> '1:23:45', unknown -> '-:--': the bar's elapsed and ETA."""
    if not math.isfinite(seconds):
        return "-:--"
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Pace:
    """Rounds done in this segment of the run and their pace: the ETA of the rest."""

    def __init__(self, first_round: int, total: int, clock: Callable[[], float]) -> None:
        self.first_round, self.total, self.clock = first_round, total, clock
        self.started = clock()
        self.done = first_round - 1

    def elapsed(self) -> float:
        return self.clock() - self.started

    def per_round(self) -> float:
        rounds = self.done - self.first_round + 1
        return self.elapsed() / rounds if rounds > 0 else math.nan

    def eta(self) -> float:
        return self.per_round() * (self.total - self.done)


class PaceColumn(ProgressColumn):
    """`0:12<0:30 4.1s/rd`: elapsed, remaining and seconds per round of the round bar."""

    def __init__(self, pace: Pace) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.pace = pace

    def render(self, task: Any) -> Text:
        if task.fields.get("kind") != "rounds":
            return Text(clock_time(task.elapsed or 0.0), style="progress.elapsed")
        pace = self.pace
        per = pace.per_round()
        rate = "" if math.isnan(per) else f" {per:.1f}s/rd"
        return Text(
            f"{clock_time(pace.elapsed())}<{clock_time(pace.eta())}{rate}",
            style="progress.remaining",
        )


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The closing table's rows: each figure once, bytes in binary units, FLOPs in decimal
    ones, durations as clock time. summary.json keeps comm_gb and train_tflops beside the raw
    counts for scripts; the table shows the counts only."""
    rows = []
    for key, value in summary.items():
        if key == "comm_gb" and "comm_bytes" in summary:
            continue
        if key == "train_tflops" and "train_flops" in summary:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and key.endswith("bytes"):
            shown = human_bytes(value)
        elif number and key.endswith("seconds"):
            shown = human_duration(value)
            segments = summary.get("segments", 1)
            if key == "wall_seconds" and isinstance(segments, int) and segments > 1:
                shown += f" ({segments} segments)"
        elif number and key.endswith("tflops"):
            shown = human_flops(value * 1e12)
        elif number and key.endswith("flops"):
            shown = human_flops(value)
        elif key == "segments":
            continue
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        rows.append((key, shown))
    return rows


def summary_table(summary: dict[str, Any]) -> Table:
    """The closing table: accuracies as fractions, bytes, FLOPs and seconds in readable units."""
    table = Table(title="fedlit run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, shown in summary_rows(summary):
        table.add_row(key, shown)
    return table


class PlainLog:
    """The non-terminal form of progress: one `key=value` line per round, and for a client
    training longer than `every` seconds one line per `every` seconds of it."""

    def __init__(
        self, console: Console, pace: Pace, every: float, clock: Callable[[], float]
    ) -> None:
        self.console, self.pace, self.every, self.clock = console, pace, every, clock
        self.last_line = clock()

    def line(self, **fields: Any) -> None:
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.last_line = self.clock()

    def round_done(self, metrics: dict[str, Any]) -> None:
        pace = self.pace
        fields: dict[str, Any] = {"round": f"{pace.done}/{pace.total}"}
        for key, name, fmt in LOG_FIELDS:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                fields[name] = fmt.format(int(value) if fmt == "{:d}" else value)
        fields["elapsed_s"] = f"{pace.elapsed():.1f}"
        fields["s_per_round"] = f"{pace.per_round():.2f}"
        fields["eta_s"] = f"{pace.eta():.0f}"
        self.line(**fields)

    def client_step(self, client: str, step: int, steps: int) -> None:
        if self.clock() - self.last_line >= self.every:
            round_ = f"{self.pace.done + 1}/{self.pace.total}"
            self.line(round=round_, client=client, step=f"{step}/{steps}")

    def phase(self, label: str) -> None:
        if self.clock() - self.last_line >= self.every:
            self.line(round=f"{self.pace.done}/{self.pace.total}", phase=label.replace(" ", "_"))


class ConsoleReport:
    """Start-up panel, progress over rounds, clients and steps, closing table; rank 0 only.

    `first_round` > 1 for a resumed run: the bar starts there, and the ETA counts only the
    rounds of this segment. `every`: seconds between two lines of a long client in a log.
    """

    def __init__(
        self,
        enabled: bool,
        total_rounds: int,
        console: Console | None = None,
        first_round: int = 1,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.pace = Pace(first_round, total_rounds, clock)
        self.log = PlainLog(self.console, self.pace, every, clock) if enabled else None
        self.clock = clock
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(width=6, no_wrap=True)),
            TextColumn("{task.fields[count]}", table_column=Column(width=7, no_wrap=True)),
            BarColumn(bar_width=10),
            PaceColumn(self.pace),
            TextColumn(
                "{task.fields[status]}",
                table_column=Column(no_wrap=True, ratio=1, overflow="ellipsis"),
            ),
            console=self.console,
            disable=not self.live,
            expand=True,
            refresh_per_second=4,
        )
        self.rounds = self.progress.add_task(
            "round",
            total=total_rounds,
            completed=first_round - 1,
            status="",
            kind="rounds",
            count=f"{first_round - 1}/{total_rounds}",
        )
        # Rank 0 sees only the clients it trains itself (its share of the round's sample).
        self.activity: int | None = None
        self.clients_done, self.clients_total = 0, 0
        self.latest: dict[str, Any] = {}
        self.last_step_update = -math.inf

    def __enter__(self) -> ConsoleReport:
        self.progress.start()
        self.pace.started = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self._drop_activity()
        self.progress.stop()

    def print(self, *objects: Any) -> None:
        if self.enabled:
            self.console.print(*objects)

    def notice(self, text: str) -> None:
        """A message the reader may copy (a path, a command): never folded across lines."""
        if self.enabled:
            self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def startup(self, rows: dict[str, str], title: str = "fedlit") -> None:
        """The run at a glance, before the first round: one row per aspect of the set-up."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        for key, value in rows.items():
            grid.add_row(key, value)
        self.print(Panel(grid, title=f"[bold]{title}[/bold]", expand=False))

    def _show_activity(self, description: str, completed: int, total: int | None, status: str):
        count = f"{completed}/{total}" if total else ""
        if self.activity is None:
            self.activity = self.progress.add_task(description, status=status, count=count)
        self.progress.update(
            self.activity,
            description=description,
            completed=completed,
            total=total,
            status=status,
            count=count,
        )

    def _drop_activity(self) -> None:
        if self.activity is not None:
            self.progress.remove_task(self.activity)
            self.activity = None

    def client_step(self, step: int, steps: int) -> None:
        """Step `step` of `steps` of the client in training (updated a few times a second)."""
        if not self.enabled:
            return
        now = self.clock()
        if step < steps and now - self.last_step_update < 0.25:
            return
        self.last_step_update = now
        client = f"{self.clients_done + 1}/{self.clients_total or '?'}"
        if self.live:
            self._show_activity("client", self.clients_done, self.clients_total or None,
                                f"step {step}/{steps}")  # fmt: skip
        else:
            self.log.client_step(client, step, steps)

    def client_done(self, done: int, total: int) -> None:
        self.clients_done, self.clients_total = done, total
        if self.live:
            self._show_activity("client", done, total, "on rank 0")

    def phase(self, label: str) -> None:
        """A labelled stretch of work outside local training, e.g. `final evaluation`."""
        if not self.enabled:
            return
        if self.live:
            self._show_activity("eval", 0, None, label)
        else:
            self.log.phase(label)

    def round_done(self, metrics: dict[str, Any]) -> None:
        self.latest.update(metrics)
        self.pace.done = int(metrics.get("round", self.pace.done + 1))
        self.clients_done, self.clients_total = 0, 0
        self.progress.update(
            self.rounds,
            completed=self.pace.done,
            status=status_line(self.latest),
            count=f"{self.pace.done}/{self.pace.total}",
        )
        self._drop_activity()
        if self.enabled and not self.live:
            self.log.round_done(metrics)

    def summary(self, summary: dict[str, Any]) -> None:
        self.print(summary_table(summary))
