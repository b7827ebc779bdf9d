"""`fedlit compare RUN_DIR...`: several runs side by side, as a table and figures.

Reads what every fit writes into its run_dir (metrics.jsonl, summary.json, config.yaml), so it
works on runs from any machine, and on a run still in progress (no summary.json yet: its
numbers come from the rounds logged so far and its wall time is unknown). Costs are shown in
the summary's units: communication in GB (10^9 bytes) and training FLOPs in TFLOPs (10^12), each
with its ratio to full-network training over the same rounds (`fedlit.costs`); runs written
before fedlit counted FLOPs show "-" there.

Accuracy is only comparable under one evaluation protocol of the BatchNorm statistics
(`trainer.eval_bn`, fedlit.eval_bn): the table shows each run's protocol, and refuses runs whose
`test/acc` comes from different protocols unless `protocol` names one every run logged.

Nothing here imports torch, and matplotlib is imported only once the table is printed and a
figure is drawn, so the table appears within about a second.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from fedlit.loggers import method_label, read_metrics
from fedlit.protocols import parse_protocols
from fedlit.units import GB, TFLOP, human_duration

UNBOUNDED = 10_000  # columns: a width at which a table takes its natural size
GRADNORM_FILE = "gradnorm.npz"  # callbacks.gradnorm.FILENAME, read without importing it


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
    comm_ratio: float | None  # comm_bytes / what full-network training would have moved
    train_flops: int | None  # FLOPs of local training (None: the run did not count them)
    flops_ratio: float | None  # train_flops / those of full-network training
    wall_seconds: float | None  # None while the run has no summary.json, or cut at a round
    curve: tuple[list[int], list[float]]  # (round, test accuracy) of every evaluated round
    comm_curve: tuple[list[float], list[float]]  # (cumulative bytes, test accuracy)
    running: bool = False  # no summary.json yet
    protocol: str = "averaged"  # the eval_bn protocol of the accuracies shown
    protocols: list[str] = field(default_factory=lambda: ["averaged"])  # all the run logged


def run_protocols(
    config: dict[str, Any] | None, summary: dict[str, Any], records: list[dict[str, Any]]
) -> list[str]:
    """The names of the eval_bn protocols a run logged, its test/acc protocol first: from the
    summary or the config (runs from before protocols existed logged `averaged`), the others
    from the test/acc@<name> keys of its metrics."""
    first = summary.get("eval_bn")
    if not isinstance(first, str):
        trainer = (config or {}).get("trainer") or {}
        first = parse_protocols(trainer.get("eval_bn") or ["averaged"])[0].name
    others = {k.partition("@")[2] for r in records for k in r if k.startswith("test/acc@")}
    return [first, *sorted(others - {first})]


def load_run(
    run_dir: Path, label: str, upto: int | None = None, protocol: str | None = None
) -> RunResult:
    """Read one run directory; ValueError naming the directory when it is not a fedlit run.

    `upto` reads the run as if it had stopped after that round: best accuracy among the rounds
    up to it, costs accumulated until then. Every draw of a run is keyed by the round, so this
    is what a run with `trainer.rounds: upto` gives (FedPart's C cycles are the first 25 C
    rounds of a longer run). `protocol` reads the accuracy of that eval_bn protocol (default:
    the run's first, i.e. test/acc).
    """
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl here; is it a fedlit run_dir?")
    config_path, summary_path = run_dir / "config.yaml", run_dir / "summary.json"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    written = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    every = read_metrics(metrics_path)
    logged = run_protocols(config, written, every)
    protocol = protocol or logged[0]
    if protocol not in logged:
        raise ValueError(
            f"{run_dir}: has no accuracy under the eval_bn protocol {protocol!r}; it logged "
            f"{', '.join(logged)} (trainer.eval_bn)"
        )
    key = "test/acc" if protocol == logged[0] else f"test/acc@{protocol}"
    suffix = key.removeprefix("test/acc")
    records = [{**r, "test/acc": r[key]} for r in every if isinstance(r.get(key), float)]
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no evaluated round yet")
    if upto is not None:
        records = [r for r in records if r["round"] <= upto]
        if not records:
            raise ValueError(f"{run_dir}: no evaluated round at or before round {upto}")
    summary: dict[str, Any] = {}
    running = not summary_path.is_file()
    if upto is None:  # the summary describes the whole run
        summary = written
    best = max(records, key=lambda r: r["test/acc"])
    last = records[-1]
    return RunResult(
        label=label,
        method=method_label(config or {}),
        best_acc=summary.get(f"best_test_acc{suffix}", best["test/acc"]),
        best_round=best["round"],
        final_acc=summary.get(f"final_test_acc{suffix}", last["test/acc"]),
        rounds=summary.get("rounds", last["round"]),
        comm_bytes=summary.get("comm_bytes", last.get("comm/bytes", 0)),
        comm_ratio=summary.get("comm_ratio", last.get("comm/ratio")),
        train_flops=summary.get("train_flops", last.get("cost/flops_total")),
        flops_ratio=summary.get("flops_ratio", last.get("cost/flops_ratio")),
        wall_seconds=summary.get("wall_seconds"),
        curve=([r["round"] for r in records], [r["test/acc"] for r in records]),
        comm_curve=([r.get("comm/bytes", 0) for r in records], [r["test/acc"] for r in records]),
        running=running and upto is None,
        protocol=protocol,
        protocols=logged,
    )


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or the path as given where two runs share a name."""
    names = Counter(p.name for p in run_dirs)
    return [p.name if names[p.name] == 1 else str(p) for p in run_dirs]


def _number(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def _wall(result: RunResult) -> str:
    if result.wall_seconds is not None:
        return human_duration(result.wall_seconds)
    return "running" if result.running else "-"


def _title(results: list[RunResult]) -> str:
    protocols = sorted({r.protocol for r in results})
    return f"fedlit compare (test accuracy with BN statistics: {', '.join(protocols)})"


def comparison_table(results: list[RunResult]) -> Table:
    """One row per run, one column per figure; the best final accuracy in bold."""
    table = Table(title="fedlit compare")
    table.add_column("run", overflow="fold")
    table.add_column("method", overflow="fold")
    table.add_column("eval BN")
    columns = ("best acc", "round", "final acc", "rounds", "comm GB", "comm ratio")
    for name in (*columns, "TFLOPs", "FLOPs ratio", "time"):
        table.add_column(name, justify="right", no_wrap=True)
    top = max(r.final_acc for r in results)
    for r in results:
        final = f"{r.final_acc:.4f}"
        table.add_row(
            r.label,
            r.method,
            r.protocol,
            f"{r.best_acc:.4f}",
            str(r.best_round),
            f"[bold]{final}[/bold]" if r.final_acc == top else final,
            str(r.rounds),
            _number(r.comm_bytes, ".3g", GB),
            _number(r.comm_ratio, ".3f"),
            _number(r.train_flops, ".3g", TFLOP),
            _number(r.flops_ratio, ".3f"),
            _wall(r),
        )
    return table


def narrow_table(results: list[RunResult]) -> Table:
    """The same figures in two lines per run, for terminals narrower than `comparison_table`
    (80 columns): the method under the run's name, the round of the best accuracy and the
    ratios to full-network training under their values, the eval_bn protocol in the title."""
    table = Table(
        title=_title(results), box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True
    )
    table.add_column("run\nmethod", overflow="fold", ratio=1)
    headers = ("best acc\n@round", "final\nacc", "rounds", "comm GB\nratio", "TFLOPs\nratio")
    for name in (*headers, "time"):
        table.add_column(name, justify="right", no_wrap=True)
    top = max(r.final_acc for r in results)
    for r in results:
        final = f"{r.final_acc:.4f}"
        table.add_row(
            f"{r.label}\n[dim]{r.method}[/dim]",
            f"{r.best_acc:.4f}\n@{r.best_round}",
            f"[bold]{final}[/bold]" if r.final_acc == top else final,
            str(r.rounds),
            f"{_number(r.comm_bytes, '.3g', GB)}\n{_number(r.comm_ratio, '.3f')}",
            f"{_number(r.train_flops, '.3g', TFLOP)}\n{_number(r.flops_ratio, '.3f')}",
            _wall(r),
        )
    return table


def print_table(results: list[RunResult], console: Console | None = None) -> None:
    """The comparison at the console's width: one line per run when it fits (always when the
    output is a file or a pipe, so that rows stay whole), else two lines per run."""
    console = console or Console()
    wide = comparison_table(results)
    needed = console.measure(wide, options=console.options.update_width(UNBOUNDED)).maximum
    if not console.is_terminal:
        console.width = max(console.width, needed)
    console.print(wide if needed <= console.width else narrow_table(results))


def check_one_protocol(results: list[RunResult]) -> None:
    """Refuse a table whose accuracy column would mix eval_bn protocols, naming a way out."""
    if len({r.protocol for r in results}) <= 1:
        return
    shared = set.intersection(*(set(r.protocols) for r in results))
    each = ", ".join(f"{r.label}: {r.protocol}" for r in results)
    way_out = (
        f"pass --eval_bn with one that every run logged: {', '.join(sorted(shared))}"
        if shared
        else "no protocol was logged by every run; rerun them with a common trainer.eval_bn"
    )
    raise ValueError(
        f"the runs report test/acc under different BatchNorm evaluation protocols ({each}); "
        f"numbers of different protocols are not comparable in one column: {way_out}"
    )


def load_runs(
    run_dirs: list[Path], at_rounds: list[int] | None = None, protocol: str | None = None
) -> list[RunResult]:
    """Every run's numbers, under one eval_bn protocol; with `at_rounds`, one result per run
    and round, each as if the run had stopped there."""
    labels = run_labels(run_dirs)
    pairs = list(zip(run_dirs, labels, strict=True))
    results = [load_run(p, label, protocol=protocol) for p, label in pairs]
    check_one_protocol(results)
    if at_rounds:
        results = [
            load_run(p, f"{label} @{n}", upto=n, protocol=protocol)
            for p, label in pairs
            for n in at_rounds
        ]
    return results


@dataclass
class Figures:
    """What a comparison drew: (what, path) of each written figure, and notes for the reader
    (runs left out of a figure)."""

    written: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def figure_paths(run_dirs: list[Path], plot_path: Path | None) -> dict[str, Path]:
    """Where each figure goes: `plot_path` (default compare_accuracy.png next to the first run)
    and beside it the same name with _vs_comm and, when some run recorded gradient norms,
    _gradnorm."""
    plot_path = plot_path or run_dirs[0].parent / "compare_accuracy.png"
    paths = {
        "accuracy per round": plot_path,
        "accuracy against communication": plot_path.with_name(plot_path.stem + "_vs_comm.png"),
    }
    if any((p / GRADNORM_FILE).is_file() for p in run_dirs):
        paths["gradient norms per step"] = plot_path.with_name(plot_path.stem + "_gradnorm.png")
    return paths


def check_free(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse to replace figures an earlier comparison wrote, unless asked to."""
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken and not overwrite:
        raise ValueError(
            f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''} (an earlier "
            "compare?); pass --overwrite true to replace them, or --plot PATH to write the "
            "figures elsewhere"
        )


def draw_comparison(
    results: list[RunResult],
    run_dirs: list[Path],
    plot_path: Path | None = None,
    overwrite: bool = False,
) -> Figures:
    """Accuracy per round, accuracy against cumulative communication and, when runs recorded
    them (callbacks.gradnorm.GradientNorms), their per-step gradient norms overlaid."""
    from fedlit.plots import plot_accuracy_vs_comm, plot_comparison

    paths = figure_paths(run_dirs, plot_path)
    check_free(paths, overwrite)
    figures = Figures()
    curves = {r.label: r.curve for r in results}
    plot_comparison(curves, paths["accuracy per round"])
    plot_accuracy_vs_comm(
        {r.label: r.comm_curve for r in results}, paths["accuracy against communication"]
    )
    figures.written = [(what, paths[what]) for what in list(paths)[:2]]
    gradnorm_path = paths.get("gradient norms per step")
    if gradnorm_path is not None:
        from callbacks.gradnorm import plot_gradnorm_comparison

        labels = run_labels(run_dirs)
        recorded = [(p, n) for p, n in zip(run_dirs, labels, strict=True) if has_gradnorm(p)]
        missing = [n for p, n in zip(run_dirs, labels, strict=True) if not has_gradnorm(p)]
        dirs, names = [p for p, _ in recorded], [n for _, n in recorded]
        plot_gradnorm_comparison(dirs, names, gradnorm_path)
        figures.written.append(("gradient norms per step", gradnorm_path))
        if missing:
            figures.notes.append(
                f"gradient norms: {', '.join(missing)} left out (no {GRADNORM_FILE}: run "
                "without callbacks.gradnorm.GradientNorms)"
            )
    return figures


def has_gradnorm(run_dir: Path) -> bool:
    return (run_dir / GRADNORM_FILE).is_file()


def compare_runs(
    run_dirs: list[Path],
    plot_path: Path | None = None,
    at_rounds: list[int] | None = None,
    protocol: str | None = None,
    overwrite: bool = False,
) -> tuple[Table, Figures]:
    """The table and the figures of `fedlit compare`, for use from Python.

    `at_rounds` gives one row per run and round, each as if the run had stopped there (the
    figures show the whole runs). `protocol` compares every run under that eval_bn protocol;
    without it the runs' test/acc must all come from the same protocol.
    """
    results = load_runs(run_dirs, protocol=protocol)
    figures = draw_comparison(results, run_dirs, plot_path, overwrite)
    if at_rounds:
        results = load_runs(run_dirs, at_rounds, protocol)
    return comparison_table(results), figures
