"""What rank 0 shows and writes about a run: the rank-0 observers of the round loop.

The engine tells each observer what happened (`on_fit_start`, `on_client_done`,
`on_round_end`, `on_fit_end`, `on_abort`) through fedlit.hooks, on rank 0 only; other ranks
have no observers. So neither the round loop nor a callback ever writes a rank-0 guard:
- `RunFilesObserver`: config.yaml, metrics.jsonl, summary.json, then each callback's
  `save(run_dir)` (its own files);
- `ConsoleObserver`: the start-up panel, the planned layer schedule, progress, the summary;
- `PlotsObserver`: the run's figures in run_dir/plots, then each callback's
  `draw(plots_dir, history)`;
- `DashboardObserver`: the W&B run (wandb is imported only when a run is logged).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import yaml

from fedlit.config import RunConfig
from fedlit.console import ConsoleReport
from fedlit.context import Context
from fedlit.dashboard import Dashboard, NoDashboard, open_dashboard
from fedlit.data.report import plot_label_heatmap
from fedlit.hooks import call_all
from fedlit.launch import launch_settings
from fedlit.loggers import RunFiles, method_label
from fedlit.plots import plot_client_accuracy, plot_communication, plot_curves, plot_layer_metrics
from fedlit.schedule import planned_layers, schedule_table, segments, selects_layers, write_schedule
from fedlit.threads import describe_threads
from fedlit.units import human_bytes


def train_label_counts(context: Context, batch_size: int) -> np.ndarray:
    """(clients, classes) training-sample counts of the partition, read from the device data."""
    num_classes = context.data.num_classes
    counts = torch.zeros(len(context.client_indices), num_classes, dtype=torch.long)
    for client, indices in enumerate(context.client_indices):
        for _, y in context.data.eval_batches("train", indices, batch_size):
            counts[client] += torch.bincount(y, minlength=num_classes).cpu()
    return counts.numpy()


def describe(run: RunConfig, context: Context, counts: np.ndarray) -> dict[str, str]:
    """The start-up panel's rows: what runs where, on which split (`counts`: clients x classes)."""
    data = run.data
    params = list(context.global_model.parameters())
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sizes = sorted(context.client_sizes)
    partition = data.partition
    if data.partition.startswith("dirichlet"):
        partition += f"(alpha={data.alpha})"
    local_test = "" if data.local_test == "none" else f"; local test splits: {data.local_test}"
    world, clients = context.world_size, run.data.num_clients
    return {
        "algorithm": method_label(yaml.safe_load(run.config_yaml or "") or {}, run.algorithm),
        "dataset": (
            f"{data.dataset}: {context.data.num_train:,} train / {context.data.num_test:,} test, "
            f"{context.data.num_classes} classes, "
            f"input {'x'.join(map(str, context.data.input_shape))}"
        ),
        "partition": (
            f"{partition} over {clients} clients: {sizes[0]}-{sizes[-1]} samples per client "
            f"(median {sizes[len(sizes) // 2]}), {(counts > 0).sum(axis=1).mean():.1f} of "
            f"{counts.shape[1]} classes per client on average{local_test}"
        ),
        "model": (
            f"{type(context.global_model).__name__}: {n_params:,} parameters "
            f"({human_bytes(param_bytes)}), {len(context.layers)} layers"
        ),
        "ranks": (
            f"{world} on {context.device.type}, {-(-clients // world)} clients per rank "
            f"(client c on rank c % {world}), up to {-(-context.per_round // world)} per round"
        ),
        "rounds": (
            f"{run.trainer.rounds}, {context.per_round} of {clients} clients each, "
            f"{run.trainer.local_epochs} local epoch(s) of batch {run.trainer.batch_size}"
        ),
        "threads": describe_threads(context.device.type, launch_settings(run.trainer)[0]),
        "run_dir": str(run.run_dir),
    }


class RunFilesObserver:
    """config.yaml, metrics.jsonl (evaluated rounds) and summary.json."""

    def __init__(self, run: RunConfig) -> None:
        self.run = run
        self.files: RunFiles | None = None

    def on_fit_start(self, history: list[dict[str, Any]]) -> None:
        self.files = RunFiles(self.run.run_dir)
        self.files.write_config(self.run.config_yaml)
        # a resumed run: the evaluated rounds up to its checkpoint; a fresh one: none
        self.files.write_metrics([m for m in history if "test/acc" in m])

    def on_round_end(self, metrics: dict[str, Any]) -> None:
        if "test/acc" in metrics:
            self.files.append_metrics(metrics)

    def on_fit_end(self, summary: dict[str, Any]) -> None:
        self.files.write_summary(summary)
        call_all(self.run.callbacks, "save", run_dir=self.run.run_dir)  # callbacks' own files


class ConsoleObserver:
    """The start-up panel, the planned layer schedule, progress bars and the closing table
    (silent with logger.quiet, apart from schedule.json, which is a file)."""

    def __init__(self, run: RunConfig, context: Context, bytes_of: Any, counts: Any) -> None:
        self.run, self.context, self.bytes_of, self.counts = run, context, bytes_of, counts
        first_round = int(run.resume["round"]) + 1 if run.resume is not None else 1
        self.report = ConsoleReport(
            enabled=not run.logger.quiet, total_rounds=run.trainer.rounds, first_round=first_round
        )

    def on_fit_start(self) -> None:
        run, report = self.run, self.report
        if report.enabled:
            rows = describe(run, self.context, self.counts)
            report.startup(rows, title=f"fedlit fit: {run.run_dir.name}")
        if selects_layers(run.callbacks):
            names = [layer.name for layer in self.context.layers]
            plan = planned_layers(run.callbacks, names, run.trainer.rounds)
            write_schedule(plan, run.run_dir / "schedule.json")
            report.print(schedule_table(segments(plan), names, self.bytes_of))
        report.__enter__()

    def print(self, *objects: Any) -> None:
        self.report.print(*objects)

    def notice(self, text: str) -> None:
        self.report.notice(text)

    def on_client_step(self, step: int, steps: int) -> None:
        self.report.client_step(step, steps)

    def on_client_done(self, done: int, total: int) -> None:
        self.report.client_done(done, total)

    def on_phase(self, label: str) -> None:
        self.report.phase(label)

    def on_round_end(self, metrics: dict[str, Any]) -> None:
        self.report.round_done(metrics)

    def on_rounds_end(self) -> None:
        self.report.__exit__()

    def on_fit_end(self, summary: dict[str, Any]) -> None:
        self.report.summary(summary)

    def on_abort(self) -> None:
        self.report.__exit__()


class PlotsObserver:
    """The run's figures in run_dir/plots, then every callback's own (`draw(plots_dir)`)."""

    def __init__(self, run: RunConfig, counts: np.ndarray) -> None:
        self.run, self.counts = run, counts
        self.history: list[dict[str, Any]] = []

    def on_round_end(self, metrics: dict[str, Any]) -> None:
        self.history.append(metrics)

    def on_fit_start(self, history: list[dict[str, Any]]) -> None:
        self.history = list(history)

    def on_fit_end(self, client_accuracy: tuple[list[float], str]) -> None:
        plots_dir = self.run.run_dir / "plots"
        evaluated = [m for m in self.history if "test/acc" in m]
        accuracy, split = client_accuracy
        classes = [str(c) for c in range(self.counts.shape[1])]
        name = self.run.run_dir.name
        plot_curves(evaluated, plots_dir, name)
        plot_client_accuracy(evaluated, accuracy, split, plots_dir / "client_accuracy.png", name)
        plot_communication(self.history, plots_dir / "communication.png", name)
        title = f"{name}: label distribution over {self.counts.shape[0]} clients"
        plot_label_heatmap(self.counts, classes, plots_dir / "partition.png", title)
        plot_layer_metrics(self.history, plots_dir, name)
        call_all(self.run.callbacks, "draw", plots_dir=plots_dir, history=self.history)


class DashboardObserver:
    """The W&B run: opened at the start (or continued on resume), fed every round, given the
    summary and every figure at the end (after the other observers drew them)."""

    def __init__(self, run: RunConfig, console: ConsoleObserver) -> None:
        self.run, self.console = run, console
        self.dashboard: Dashboard = NoDashboard()

    @property
    def run_id(self) -> str | None:
        return self.dashboard.run_id

    def on_fit_start(self) -> None:
        run = self.run
        wandb_config = run.logger.wandb
        saved_id = run.resume.get("wandb_id") if run.resume is not None else None
        if saved_id and wandb_config.id is None:  # the resumed run continues its W&B run
            wandb_config = dataclasses.replace(wandb_config, id=saved_id)
        self.dashboard = open_dashboard(
            wandb_config, run.run_dir, run.config_yaml, run.logger.quiet, self.console.notice
        )

    def on_round_end(self, metrics: dict[str, Any]) -> None:
        self.dashboard.log_round(metrics)

    def on_fit_end(self, summary: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self.dashboard.finish(summary, history, self.run.run_dir / "plots")

    def on_abort(self) -> None:
        self.dashboard.abort()


def make_observers(run: RunConfig, context: Context, bytes_of: Any) -> list[Any]:
    """Rank 0's observers, in the order they are told things (files first, W&B last, so that
    W&B uploads the figures the others drew)."""
    counts = None
    if not run.logger.quiet or run.logger.plots:  # the start-up panel and the heat map
        counts = train_label_counts(context, run.trainer.eval_batch_size)
    console = ConsoleObserver(run, context, bytes_of, counts)
    observers: list[Any] = [RunFilesObserver(run), console]
    if run.logger.plots:
        observers.append(PlotsObserver(run, counts))
    observers.append(DashboardObserver(run, console))
    return observers


def dashboard_id(observers: list[Any]) -> str | None:
    """The W&B run id to save in checkpoints (None on ranks other than 0, or without W&B)."""
    ids = [o.run_id for o in observers if isinstance(o, DashboardObserver)]
    return ids[0] if ids else None
