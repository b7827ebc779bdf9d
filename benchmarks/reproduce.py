"""`make results PAPER=fedpart|fedmr|lips|probes|all`: run the rows of docs/results.md and
redraw its tables and figures.

Each paper is a list of rows (config files applied in order, usually a paper's official config
from configs/official/ plus the CPU-scale overlays of configs/results/, and a seed) plus the
figures and the table drawn from their run directories into docs/results/. A row whose run directory already
holds its rounds is not run again, and one that stopped early resumes from its last checkpoint,
so an interrupted reproduction picks up where it stopped. `--figures_only` redraws from the runs
that are there (rows without a run are left out of the tables), and `--jobs` runs that many rows
at once, each on one CPU thread as its config says.

A run directory lives only on the machine that made it. The numbers of every finished row
(metrics.jsonl, config.yaml, summary.json: no checkpoints) are therefore copied into
docs/results/runs/, which is committed: tables and figures are read from there wherever the run
directory is missing, so they redraw on a fresh clone and a lost machine loses no finished row.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from fedlit.compare import RunResult, load_run
from fedlit.loggers import read_metrics
from fedlit.plots import save_figure, series

CONFIGS = Path("configs/results")
OFFICIAL = Path("configs/official")
RUNS = Path("runs/results")
FIGURES = Path("docs/results")


@dataclass(frozen=True)
class Row:
    """One run of the results: `name` (its run directory's stem), the config files it applies
    in order (later ones override earlier keys: a paper's official config, then the overlays
    that reduce it to CPU scale), under one seed, for `rounds` rounds (None: the configs')."""

    name: str
    configs: tuple[Path, ...]
    seed: int = 0
    rounds: int | None = None

    @property
    def run_dir(self) -> Path:
        return RUNS / f"{self.name}_s{self.seed}"

    def wanted_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        rounds = None
        for path in self.configs:
            trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
            rounds = trainer.get("rounds", rounds)
        if rounds is None:
            raise ValueError(f"row {self.name}: no config sets trainer.rounds")
        return int(rounds)

    @property
    def archive_dir(self) -> Path:
        """The committed copy of the finished run's numbers (see `archive`)."""
        return FIGURES / "runs" / self.run_dir.name

    @property
    def results_dir(self) -> Path:
        """Where the row's numbers are read from: the run directory, or its archived copy
        where that holds more rounds (on a clone that never ran the row, the run directory
        holds none)."""
        if rounds_in(self.archive_dir) > rounds_in(self.run_dir):
            return self.archive_dir
        return self.run_dir

    def finished_rounds(self) -> int:
        """Rounds the run directory or its archived copy holds (0: none yet)."""
        return max(rounds_in(self.run_dir), rounds_in(self.archive_dir))

    def command(self, resume: bool = True) -> list[str]:
        """The `fedlit fit` command line that (re)produces this row; with `resume`, one that
        goes on from the run's last checkpoint when there is one."""
        args = ["fedlit", "fit"]
        for path in self.configs:
            args += ["--config", str(path)]
        args += ["--seed", str(self.seed), "--run_dir", str(self.run_dir)]
        if self.rounds is not None:
            args += ["--trainer.rounds", str(self.rounds)]
        if resume and (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--resume", "auto"]
        return args


def rounds_in(run_dir: Path) -> int:
    """The last round a run directory's metrics.jsonl holds (0: none, or no such file)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return max((int(r["round"]) for r in read_metrics(metrics)), default=0)


ARCHIVED_FILES = ("metrics.jsonl", "config.yaml", "summary.json")


def archive(rows: Sequence[Row]) -> None:
    """Copy the numbers of every row whose run directory holds all its rounds into
    docs/results/runs/<row>_s<seed>/: the files the tables and figures read, without the
    checkpoints. A row still running is not copied, so the archive only ever holds finished
    rows."""
    for row in rows:
        if rounds_in(row.run_dir) < row.wanted_rounds():
            continue
        row.archive_dir.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (row.run_dir / name).is_file():
                shutil.copyfile(row.run_dir / name, row.archive_dir / name)


@dataclass
class Paper:
    """The rows of one paper's table and the function that draws its figures and table."""

    rows: list[Row]
    report: Callable[[list[Row]], str]


def run_rows(rows: Sequence[Row], jobs: int) -> None:
    """Run every row that is missing rounds, `jobs` at a time; a failing row is reported and
    the others go on."""
    todo = [row for row in rows if row.finished_rounds() < row.wanted_rounds()]
    for row in rows:
        if row not in todo:
            print(f"done    {row.results_dir} ({row.finished_rounds()} rounds)")

    def run(row: Row) -> tuple[Row, int]:
        print(f"running {' '.join(row.command())}", flush=True)
        row.run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = row.run_dir.parent / f"{row.run_dir.name}.log"
        with log.open("a") as out:
            done = subprocess.run(
                [sys.executable, "-m", *row.command()], stdout=out, stderr=subprocess.STDOUT
            )
        return row, done.returncode

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for row, code in pool.map(run, todo):
            status = "finished" if code == 0 else f"FAILED (exit {code}, log next to the run)"
            print(f"{status} {row.run_dir}", flush=True)


# ---- shared readers -------------------------------------------------------------------------


def complete(rows: Sequence[Row]) -> list[Row]:
    """The rows whose run holds all its rounds: a table never mixes in a run still going."""
    return [row for row in rows if row.finished_rounds() >= row.wanted_rounds()]


def available(rows: Sequence[Row], upto: int | None = None) -> list[tuple[Row, RunResult]]:
    """The rows whose run holds at least `upto` rounds (without `upto`: all its rounds), read
    as if stopped there."""
    enough = complete(rows) if upto is None else [r for r in rows if r.finished_rounds() >= upto]
    return [(row, load_run(row.results_dir, row.run_dir.name, upto=upto)) for row in enough]


def mean_pm(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± spread/2' over seeds (half the range, the honest spread of two seeds), or the
    single value; '-' for none."""
    if not values:
        return "-"
    scaled = [v * scale for v in values]
    mean = statistics.fmean(scaled)
    if len(scaled) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(scaled) - min(scaled)) / 2:.{digits}f}"


def metric_series(run_dir: Path, key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of `key` in a run's metrics.jsonl."""
    return series(read_metrics(run_dir / "metrics.jsonl"), key)


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    rule = "| " + " | ".join("---" for _ in header) + " |"
    body = ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(["| " + " | ".join(header) + " |", rule, *body]) + "\n"


def commands_table(rows: Sequence[Row]) -> str:
    """The command of every row, for the docs."""
    lines = [
        [f"`{row.name}`, seed {row.seed}", f"`{' '.join(row.command(resume=False))}`"]
        for row in rows
    ]
    return markdown(["row", "command"], lines)


def copy_plot(row: Row, name: str, target: str) -> None:
    """Copy a plot a run drew itself (callbacks draw into run_dir/plots) into docs/results."""
    source = row.run_dir / "plots" / name
    if source.is_file():
        shutil.copyfile(source, FIGURES / target)


def curves_panels(
    panels: Sequence[tuple[str, Sequence[tuple[str, Row]]]],
    key: str,
    ylabel: str,
    path: Path,
) -> None:
    """One panel per (title, runs), side by side: `key` per round for each run."""
    keyed = [(title, runs, key) for title, runs in panels]
    protocol_panels(keyed, ylabel, path, columns=len(panels))


# ---- FedPart ------------------------------------------------------------------------------

FEDPART_CYCLE = 25  # ResNet-8: 5 full rounds + 10 layers x 2 rounds
# Best test accuracy (%) full network -> + FedPart, CIFAR-10 (../shared/specs/fedpart.md).
FEDPART_PAPER = {1: (56.0, 57.7), 2: (58.6, 60.2), 3: (59.6, 61.7), 4: (60.7, 62.8)}
# The eval_bn protocols every FedPart row logs, the official code's first.
FEDPART_PROTOCOLS = (
    ("client0", "client 0's statistics (paper)"),
    ("averaged", "averaged statistics"),
    ("recalibrated", "recalibrated statistics"),
)


def paired_best(
    rows: Sequence[Row], prefix: str, upto: int, protocol: str
) -> list[tuple[int, float, float]]:
    """(seed, best accuracy full network, best accuracy FedPart) for every seed with both runs
    at least `upto` rounds long, read as if stopped after `upto`, under `protocol`."""
    found: dict[tuple[str, int], float] = {}
    for variant in ("fedavg", "fedpart"):
        for row in rows:
            if row.name == f"{prefix}_{variant}" and row.finished_rounds() >= upto:
                result = load_run(row.results_dir, row.name, upto=upto, protocol=protocol)
                found[variant, row.seed] = result.best_acc
    seeds_ = sorted(
        {s for v, s in found if v == "fedavg"} & {s for v, s in found if v == "fedpart"}
    )
    return [(s, found["fedavg", s], found["fedpart", s]) for s in seeds_]


def unfinished_pair_rounds(rows: Sequence[Row], prefix: str) -> int:
    """The most rounds that a full-network run and a FedPart run of one seed both hold (0:
    no seed has both started): the table of a reproduction still under way compares them
    there, labelled as unfinished, rather than leaving the row empty."""
    held: dict[tuple[str, int], int] = {}
    for row in rows:
        for variant in ("fedavg", "fedpart"):
            if row.name == f"{prefix}_{variant}":
                held[variant, row.seed] = row.finished_rounds()
    seeds_ = {s for _, s in held}
    return max(
        (min(held.get(("fedavg", s), 0), held.get(("fedpart", s), 0)) for s in seeds_), default=0
    )


def fedpart_report(rows: list[Row]) -> str:
    """Per cycle count and client count: the paper's best accuracies, then ours under each
    evaluation protocol of the BN statistics (full network, FedPart, the gap)."""
    header = ["clients", "C", "paper: full → FedPart (gap)"]
    for _, title in FEDPART_PROTOCOLS:
        header.append(f"ours, {title}: full → FedPart (gap)")
    header.append("seeds")
    lines = []
    for prefix, clients, cycles in (("fedpart", 10, (1, 2)), ("fedpart40", 40, (1,))):
        for c in cycles:
            paper = FEDPART_PAPER.get(c)
            upto = FEDPART_CYCLE * c
            label = str(c)
            if c == 1 and not paired_best(rows, prefix, upto, "averaged"):
                # no pair has finished its first cycle: read the pairs where they both are
                held = unfinished_pair_rounds(rows, prefix)
                if held > 0:
                    upto, label = held, f"1, rounds 1–{held} of {FEDPART_CYCLE} (unfinished)"
            cells = [str(clients), label]
            cells.append(f"{paper[0]} → {paper[1]} ({paper[1] - paper[0]:+.1f})" if paper else "-")
            used: list[int] = []
            for protocol, _ in FEDPART_PROTOCOLS:
                pairs = paired_best(rows, prefix, upto, protocol)
                used = used or [s for s, _, _ in pairs]
                if not pairs:
                    cells.append("-")
                    continue
                full = mean_pm([f for _, f, _ in pairs])
                part = mean_pm([p for _, _, p in pairs])
                gap = mean_pm([p - f for _, f, p in pairs])
                sign = "" if gap.startswith("-") else "+"  # signed, as the paper's column
                cells.append(f"{full} → {part} ({sign}{gap})")
            cells.append(", ".join(str(s) for s in used) or "-")
            lines.append(cells)
    panels = [
        (
            f"{clients} clients, {title}",
            [
                ("full network" if row.name.endswith("_fedavg") else "FedPart", row)
                for row in rows
                if row.name.startswith(f"{prefix}_")
            ],
            key,
        )
        for prefix, clients in (("fedpart", 10), ("fedpart40", 40))
        for protocol, title in FEDPART_PROTOCOLS
        for key in [protocol_key(rows, prefix, protocol)]
    ]
    protocol_panels(panels, "test accuracy", FIGURES / "fedpart_accuracy.png", columns=3)
    return markdown(header, lines)


def protocol_key(rows: Sequence[Row], prefix: str, protocol: str) -> str:
    """The metric holding `protocol`'s accuracy in the runs of `prefix` (test/acc for the
    protocol a run lists first)."""
    for row in rows:
        config_path = row.results_dir / "config.yaml"
        if row.name.startswith(f"{prefix}_") and config_path.is_file():
            config = yaml.safe_load(config_path.read_text()) or {}
            first = (config.get("trainer") or {}).get("eval_bn", ["averaged"])[0]
            return "test/acc" if first.replace(":", "") == protocol else f"test/acc@{protocol}"
    return f"test/acc@{protocol}"


def protocol_panels(
    panels: Sequence[tuple[str, Sequence[tuple[str, Row]], str]],
    ylabel: str,
    path: Path,
    columns: int,
) -> None:
    """A grid of panels (title, runs, metric key): the metric per round for each run, the seeds
    of a label in one colour."""
    rows_count = -(-len(panels) // columns)
    figure = Figure(figsize=(5.0 * columns, 3.8 * rows_count), dpi=110)
    grid = figure.subplots(rows_count, columns, squeeze=False)
    for index, (title, runs, key) in enumerate(panels):
        axes = grid[index // columns][index % columns]
        colours: dict[str, str] = {}
        for label, row in runs:
            if row.finished_rounds() == 0:
                continue
            colour = colours.setdefault(label, f"C{len(colours)}")
            x, y = metric_series(row.results_dir, key)
            named = label not in {line.get_label() for line in axes.lines}
            axes.plot(x, y, color=colour, linewidth=1.0, alpha=0.9, label=label if named else None)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("round")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    save_figure(figure, path)


# ---- FedMR --------------------------------------------------------------------------------


FEDMR_TAIL = 50  # rounds at the end averaged over: FedAvg's accuracy swings under label skew


def tail_mean(result: RunResult, rounds: int) -> float:
    """Mean test accuracy over the evaluations of the run's last `rounds` rounds."""
    evaluated, accs = result.curve
    last = evaluated[-1]
    return statistics.fmean(a for r, a in zip(evaluated, accs, strict=True) if r > last - rounds)


def fedmr_report(rows: list[Row]) -> str:
    """Best, final and late-round mean accuracy per method over seeds; the curves."""
    lines = []
    for method, name in (("fedavg", "FedAvg"), ("fedmr", "FedMR")):
        found = available([r for r in rows if r.name == f"fedmr_{method}"])
        if not found:
            continue
        lines.append(
            [
                name,
                mean_pm([r.best_acc for _, r in found]),
                mean_pm([r.final_acc for _, r in found]),
                mean_pm([tail_mean(r, FEDMR_TAIL) for _, r in found]),
                str(max(r.rounds for _, r in found)),
                ", ".join(str(row.seed) for row, _ in found),
            ]
        )
    runs = [("FedAvg" if r.name == "fedmr_fedavg" else "FedMR", r) for r in rows]
    curves_panels(
        [("CIFAR-10, CNN, capped Dirichlet(0.1)", runs)],
        "test/acc",
        "test accuracy (global model)",
        FIGURES / "fedmr_accuracy.png",
    )
    header = [
        "method", "best acc", "final acc", f"mean of the last {FEDMR_TAIL} rounds", "rounds",
        "seeds",
    ]  # fmt: skip
    return markdown(header, lines)


# ---- LIPS ---------------------------------------------------------------------------------


MOVING = 0.01  # a layer "moves" in a round when it changes by at least 1 % of its norm
LIPS_METHODS = (("lips_fedavg", "FedAvg"), ("lips_lips", "FedAvg + LIPS"))
LIPS_TAIL = 20  # rounds at the end averaged over


def last_moving_round(run_dir: Path) -> int:
    """The last measured round in which the median layer changed by at least MOVING of its
    norm (`layer/<name>/rel_change` from callbacks.inertia), 0 for none: until when
    aggregation kept adding something before the layers went inert."""
    last = 0
    for record in read_metrics(run_dir / "metrics.jsonl"):
        changes = [
            v for k, v in record.items() if k.startswith("layer/") and k.endswith("/rel_change")
        ]
        if changes and statistics.median(changes) >= MOVING:
            last = int(record["round"])
    return last


def median_change_after(run_dir: Path, first: int) -> float:
    """Mean over rounds >= `first` of the median layer's relative change per round."""
    medians = []
    for record in read_metrics(run_dir / "metrics.jsonl"):
        changes = [
            v for k, v in record.items() if k.startswith("layer/") and k.endswith("/rel_change")
        ]
        if changes and record["round"] >= first:
            medians.append(statistics.median(changes))
    return statistics.fmean(medians) if medians else math.nan


def lips_report(rows: list[Row]) -> str:
    """Personalised accuracy before and after aggregation (best, final, mean of the last
    rounds), how long the layers keep moving and how much; the curves and inertia maps."""
    lines = []
    for method, name in LIPS_METHODS:
        found = complete([r for r in rows if r.name == method])
        if not found:
            continue
        cells = [name]
        for key in ("personal/acc_local", "personal/acc_global"):
            curves = [metric_series(r.results_dir, key) for r in found]
            cells.append(mean_pm([max(v) for _, v in curves if v]))
            cells.append(
                mean_pm(
                    [
                        statistics.fmean(
                            a for r, a in zip(x, v, strict=True) if r > x[-1] - LIPS_TAIL
                        )
                        for x, v in curves
                        if v
                    ]
                )
            )
        cells.append(mean_pm([last_moving_round(r.results_dir) for r in found], 1.0, 0))
        cells.append(
            mean_pm([median_change_after(r.results_dir, 40) for r in found], 100.0, 2) + " %"
        )
        cells.append(", ".join(str(r.seed) for r in found))
        lines.append(cells)
    header = [
        "method", "local model best", f"local, mean of last {LIPS_TAIL} rounds",
        "received model best", f"received, mean of last {LIPS_TAIL} rounds",
        f"layers move ≥ {MOVING:.0%} per round until", "median layer change per round from 40",
        "seeds",
    ]  # fmt: skip
    for key, file in (
        ("personal/acc_local", "lips_personal_local.png"),
        ("personal/acc_global", "lips_personal_global.png"),
    ):
        title = (
            "before aggregation (local model)"
            if key.endswith("local")
            else ("after aggregation (received model)")
        )
        runs = [(name, r) for method, name in LIPS_METHODS for r in rows if r.name == method]
        curves_panels([(title, runs)], key, "personalised accuracy", FIGURES / file)
    for row in rows:
        if row.seed == 0:
            method = row.name.removeprefix("lips_")
            copy_plot(row, "inertia_cosine.png", f"lips_inertia_cosine_{method}.png")
            copy_plot(row, "inertia_rel_change.png", f"lips_inertia_rel_change_{method}.png")
    return markdown(header, lines)


# ---- layer-peeled probes ------------------------------------------------------------------


PROBE_COLUMNS = {
    "train_ratio": "Var_W/Var_B, train",
    "test_ratio": "Var_W/Var_B, local test",
    "train_align": "alignment with the next layer, train",
}
PROBE_METHODS = (("cfd_fedavg", "FedAvg"), ("cfd_fedbn", "FedBN"))


def probe_changes(rows: Sequence[Row]) -> tuple[list[str], list[dict[tuple[str, str], float]]]:
    """Layers in order, and per run the relative change (received against local model) of the
    probe's metrics at its last probed round."""
    per_seed: list[dict[tuple[str, str], float]] = []
    layers: list[str] = []
    for row in rows:
        records = read_metrics(row.results_dir / "metrics.jsonl")
        probed = [r for r in records if any("/probe/" in k for k in r)]
        if not probed:
            continue
        changes = {}
        for key, value in probed[-1].items():
            layer, _, rest = key.removeprefix("layer/").partition("/probe/")
            metric = rest.removesuffix("_rel_change")
            if (
                key.startswith("layer/")
                and rest.endswith("_rel_change")
                and metric in PROBE_COLUMNS
            ):
                changes[layer, metric] = value
                if layer not in layers:
                    layers.append(layer)
        per_seed.append(changes)
    return layers, per_seed


def cfd_compare_figure(
    columns: Sequence[tuple[str, list[dict[tuple[str, str], float]]]],
    layers: Sequence[str],
    path: Path,
) -> None:
    """Per layer, the relative change of Var_W/Var_B (received against local model) of every
    method, train and local-test panels: the seeds' mean as a line, their range as a band. The
    FedAvg and FedBN lines on one axis are the CFD curve with and without its BN confound."""
    if not layers or not any(per_seed for _, per_seed in columns):
        return
    figure = Figure(figsize=(11, 4.2))
    axes = figure.subplots(1, 2, sharey=True)
    positions = list(range(len(layers)))
    for ax, metric in zip(axes, ("train_ratio", "test_ratio"), strict=True):
        for name, per_seed in columns:
            if not per_seed:
                continue
            per_layer = [[100.0 * c.get((layer, metric), math.nan) for c in per_seed]
                         for layer in layers]  # fmt: skip
            mean = [statistics.fmean(v) for v in per_layer]
            low = [min(v) for v in per_layer]
            high = [max(v) for v in per_layer]
            (line,) = ax.plot(
                positions,
                mean,
                marker="o",
                label=f"{name} ({len(per_seed)} seed{'s' if len(per_seed) > 1 else ''})",
            )
            if len(per_seed) > 1:
                ax.fill_between(positions, low, high, color=line.get_color(), alpha=0.2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(positions, layers, rotation=45, ha="right", fontsize=8)
        ax.set_title(PROBE_COLUMNS[metric])
        ax.set_xlabel("layer (input to penultimate)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("change after aggregation (%)\nhigher = classes worse separated")
    axes[0].legend()
    figure.suptitle("cumulative feature degradation at the last probed round")
    save_figure(figure, path)


def probes_report(rows: list[Row]) -> str:
    """Per layer, the relative change of the probe's metrics under FedAvg and under FedBN (the
    BN confound removed), then the accuracy of both models on the clients' own test data and
    the global model's test accuracy under averaged and recalibrated statistics."""
    columns = []
    layers: list[str] = []
    for method, name in PROBE_METHODS:
        found = complete([r for r in rows if r.name == method])
        found_layers, per_seed = probe_changes(found)
        layers = layers or found_layers
        columns.append((name, per_seed))

    def cell(per_seed: list[dict[tuple[str, str], float]], layer: str, metric: str) -> str:
        values = [c[layer, metric] for c in per_seed if (layer, metric) in c]
        return mean_pm(values, 100.0, 1) + " %" if values else "-"

    header = ["layer (input to penultimate)"]
    for name, _ in columns:
        header += [f"{name}: {title}" for title in PROBE_COLUMNS.values()]
    lines = [
        [layer, *(cell(per_seed, layer, m) for _, per_seed in columns for m in PROBE_COLUMNS)]
        for layer in layers
    ]
    table = markdown(header, lines)
    cfd_compare_figure(columns, layers, FIGURES / "probes_cfd_compare.png")
    accuracy = []
    for method, name in PROBE_METHODS:
        found = complete([r for r in rows if r.name == method])
        if not found:
            continue
        finals = {}
        for key in (
            "personal/acc_local",
            "personal/acc_global",
            "test/acc",
            "test/acc@recalibrated",
        ):
            values = [metric_series(r.results_dir, key)[1] for r in found]
            finals[key] = mean_pm([v[-1] for v in values if v])
        seeds_used = ", ".join(str(r.seed) for r in found)
        accuracy.append([name, *finals.values(), seeds_used])
        if any(r.seed == 0 for r in found):
            row = next(r for r in found if r.seed == 0)
            copy_plot(row, "probe_cfd.png", f"probes_cfd_{method.removeprefix('cfd_')}.png")
    acc_header = [
        "method (last round)", "local model on local test", "received model on local test",
        "global test, averaged BN", "global test, recalibrated BN", "seeds",
    ]  # fmt: skip
    return table + "\n" + markdown(acc_header, accuracy)


# ---- the papers ---------------------------------------------------------------------------


def seeds(name: str, configs: Sequence[Path], seeds_: Sequence[int]) -> list[Row]:
    return [Row(name, tuple(configs), seed) for seed in seeds_]


CPU = CONFIGS / "cpu.yaml"
PAPERS: dict[str, Paper] = {
    "fedpart": Paper(
        rows=[
            # the 40-client rows are the longest: first, so that two run at once from the start
            *seeds(
                "fedpart40_fedavg",
                [
                    OFFICIAL / "fedpart_cifar10_resnet8_fedavg.yaml",
                    CPU,
                    CONFIGS / "fedpart_40_clients.yaml",
                ],
                (0,),
            ),
            *seeds(
                "fedpart40_fedpart",
                [
                    OFFICIAL / "fedpart_cifar10_resnet8_fedpart.yaml",
                    CPU,
                    CONFIGS / "fedpart_40_clients.yaml",
                ],
                (0,),
            ),
            *seeds(
                "fedpart_fedavg",
                [
                    OFFICIAL / "fedpart_cifar10_resnet8_fedavg.yaml",
                    CPU,
                    CONFIGS / "fedpart_10_clients.yaml",
                ],
                (0, 1),
            ),
            *seeds(
                "fedpart_fedpart",
                [
                    OFFICIAL / "fedpart_cifar10_resnet8_fedpart.yaml",
                    CPU,
                    CONFIGS / "fedpart_10_clients.yaml",
                ],
                (0, 1),
            ),
        ],
        report=fedpart_report,
    ),
    "fedmr": Paper(
        rows=[
            row
            for seed in (0, 1, 2)
            for method in ("fedavg", "fedmr")
            for row in seeds(
                f"fedmr_{method}", [OFFICIAL / f"fedmr_cifar10_cnn_{method}.yaml", CPU], (seed,)
            )
        ],
        report=fedmr_report,
    ),
    "lips": Paper(
        rows=[
            row
            for seed in (0, 1)
            for method in ("fedavg", "lips")
            for row in seeds(
                f"lips_{method}",
                [OFFICIAL / f"lips_cifar10_vgg11_{method}.yaml", CPU, CONFIGS / "lips_cpu.yaml"],
                (seed,),
            )
        ],
        report=lips_report,
    ),
    "probes": Paper(
        rows=[
            row
            for seed in (0, 1)
            for method in ("fedavg", "fedbn")
            for row in seeds(
                f"cfd_{method}", [CONFIGS / f"cfd_cifar10_{method}.yaml", CPU], (seed,)
            )
        ],
        report=probes_report,
    ),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper", choices=[*PAPERS, "all"])
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (one thread each)")
    parser.add_argument("--figures_only", action="store_true", help="redraw, run nothing")
    parser.add_argument(
        "--only", default="", help="run only the rows whose name contains this text"
    )
    args = parser.parse_args(argv)
    names = list(PAPERS) if args.paper == "all" else [args.paper]
    if not args.figures_only:
        rows = [row for name in names for row in PAPERS[name].rows if args.only in row.name]
        run_rows(rows, args.jobs)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = PAPERS[name].rows
        archive(rows)
        table = PAPERS[name].report(rows) + "\n" + commands_table(rows)
        (FIGURES / f"{name}_table.md").write_text(table)
        print(f"\n## {name}\n\n{table}")


if __name__ == "__main__":
    main()
