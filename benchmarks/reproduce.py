"""`make results PAPER=fedpart|fedmr|lips|probes|all`: run the rows of docs/results.md and
redraw its tables and figures.

Each paper is a list of rows (a config in configs/results/ and a seed) plus the figures and the
table drawn from their run directories into docs/results/. A row whose run directory already
holds its rounds is not run again, and one that stopped early resumes from its last checkpoint,
so an interrupted reproduction picks up where it stopped. `--figures_only` redraws from the runs
that are there (rows without a run are left out of the tables), and `--jobs` runs that many rows
at once, each on one CPU thread as its config says.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import yaml
from matplotlib.figure import Figure

from fedlit.compare import RunResult, load_run
from fedlit.loggers import read_metrics
from fedlit.plots import plot_accuracy_vs_comm, save_figure, series
from fedlit.schedule import read_schedule

CONFIGS = Path("configs/results")
RUNS = Path("runs/results")
FIGURES = Path("docs/results")


@dataclass(frozen=True)
class Row:
    """One run of the results: a config of configs/results/ under one seed, for `rounds`
    rounds (None: the config's own)."""

    config: str
    seed: int = 0
    rounds: int | None = None

    @property
    def run_dir(self) -> Path:
        return RUNS / f"{self.config}_s{self.seed}"

    @property
    def config_path(self) -> Path:
        return CONFIGS / f"{self.config}.yaml"

    def wanted_rounds(self) -> int:
        if self.rounds is not None:
            return self.rounds
        return int(yaml.safe_load(self.config_path.read_text())["trainer"]["rounds"])

    def finished_rounds(self) -> int:
        """Rounds the run directory holds (0: none yet)."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return 0
        return max((int(r["round"]) for r in read_metrics(metrics)), default=0)

    def command(self, resume: bool = True) -> list[str]:
        """The `fedlit fit` command line that (re)produces this row; with `resume`, one that
        goes on from the run's last checkpoint when there is one."""
        args = ["fedlit", "fit", "--config", str(self.config_path)]
        args += ["--seed", str(self.seed), "--run_dir", str(self.run_dir)]
        if self.rounds is not None:
            args += ["--trainer.rounds", str(self.rounds)]
        if resume and (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            args += ["--resume", "auto"]
        return args


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
            print(f"done    {row.run_dir} ({row.finished_rounds()} rounds)")

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
    return [(row, load_run(row.run_dir, row.run_dir.name, upto=upto)) for row in enough]


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
        [f"`{row.config}`, seed {row.seed}", f"`{' '.join(row.command(resume=False))}`"]
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
    """One panel per (title, runs): `key` per round for each run, seeds of a method in one
    colour."""
    figure = Figure(figsize=(5.5 * len(panels), 4.2), dpi=120)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (title, runs) in zip(axes_list, panels, strict=True):
        colours: dict[str, str] = {}
        for label, row in runs:
            if row.finished_rounds() == 0:
                continue
            colour = colours.setdefault(label, f"C{len(colours)}")
            x, y = metric_series(row.run_dir, key)
            named = label not in {line.get_label() for line in axes.lines}
            axes.plot(x, y, color=colour, linewidth=1.0, alpha=0.9, label=label if named else None)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("round")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize=8)
    save_figure(figure, path)


# ---- FedPart ------------------------------------------------------------------------------

FEDPART_ALGORITHMS = {"fedavg": "FedAvg", "fedprox": "FedProx", "moon": "MOON"}
FEDPART_CYCLE = 25  # ResNet-8: 5 full rounds + 10 layers x 2 rounds
# Best test accuracy (%) full network -> + FedPart, CIFAR-10 (../shared/specs/fedpart.md).
FEDPART_PAPER = {
    ("fedavg", 1): "56.0 → 57.7",
    ("fedavg", 2): "58.6 → 60.2",
    ("fedavg", 3): "59.6 → 61.7",
    ("moon", 1): "58.9 → 57.8",
}


def fedpart_report(rows: list[Row]) -> str:
    lines = []
    for key, name in FEDPART_ALGORITHMS.items():
        for cycles in (1, 2, 3):
            upto = FEDPART_CYCLE * cycles
            full = available([r for r in rows if r.config.endswith(f"{key}_full")], upto)
            part = available([r for r in rows if r.config.endswith(f"{key}_fedpart")], upto)
            if not full and not part:
                continue
            paired = sorted({r.seed for r, _ in full} & {r.seed for r, _ in part})
            pairs = [
                (rf, f, p)
                for s in paired
                for (rf, f) in full
                for (rp, p) in part
                if rf.seed == s and rp.seed == s
            ]
            gap = [p.best_acc - f.best_acc for _, f, p in pairs]
            same_bytes = [best_within_bytes(rf, p.comm_bytes) for rf, _, p in pairs]
            lines.append(
                [
                    name,
                    str(cycles),
                    FEDPART_PAPER.get((key, cycles), "-"),
                    mean_pm([r.best_acc for _, r in full]),
                    mean_pm([r.best_acc for _, r in part]),
                    mean_pm(gap),
                    mean_pm([b for b in same_bytes if b is not None]),
                    mean_pm([r.comm_ratio for _, r in part if r.comm_ratio], 1.0, 3),
                    mean_pm([r.flops_ratio for _, r in part if r.flops_ratio], 1.0, 3),
                    ", ".join(str(s) for s in paired) or "-",
                ]
            )
    header = [
        "method", "C", "paper (full → FedPart)", "ours full", "ours FedPart",
        "FedPart − full", "full at FedPart's bytes", "comm ratio", "FLOPs ratio", "seeds",
    ]  # fmt: skip
    panels = [
        (
            name,
            [("full network", r) for r in rows if r.config.endswith(f"{key}_full")]
            + [("FedPart", r) for r in rows if r.config.endswith(f"{key}_fedpart")],
        )
        for key, name in FEDPART_ALGORITHMS.items()
    ]
    curves_panels(panels, "test/acc", "test accuracy", FIGURES / "fedpart_accuracy.png")
    fedpart_comm_figure(rows)
    pair = [r for r in rows if r.seed == 0 and "_fedavg_" in r.config]
    pair = [r for r in pair if (r.run_dir / "gradnorm.npz").is_file()]
    if pair:
        from callbacks.gradnorm import plot_gradnorm_comparison

        labels = ["FedAvg" if r.config.endswith("_full") else "FedAvg + FedPart" for r in pair]
        plot_gradnorm_comparison(
            [r.run_dir for r in pair], labels, FIGURES / "fedpart_gradnorm.png"
        )
    return markdown(header, lines) + "\n" + fedpart_spike_table(rows)


def spike_blocks(plan: list[list[str]]) -> list[tuple[str, int, int]]:
    """(name, first, last round) of the blocks of a FedPart run's planned schedule (its
    schedule.json): each cycle's partial rounds, and the full rounds between cycles. A cycle
    starts at its full rounds; the first cycle's precede any partial round and are left out,
    as are full rounds with no partial round after them."""
    full = max((len(layers) for layers in plan), default=0)
    runs = []  # (full or not, first round, last round), alternating
    for is_full, group in groupby(enumerate(plan, start=1), key=lambda r: len(r[1]) == full):
        rounds = [r for r, _ in group]
        runs.append((is_full, rounds[0], rounds[-1]))
    blocks, cycle = [], 0
    for index, (is_full, first, last) in enumerate(runs):
        if not is_full:
            blocks.append((f"C{cycle} partial", first, last))
            continue
        cycle += 1
        if cycle > 1 and index + 1 < len(runs):
            blocks.append((f"C{cycle} full", first, last))
    return blocks


def fedpart_spike_table(rows: list[Row]) -> str:
    """The gradient-norm spike after aggregation (first local step over the round's median
    step, mean over clients, `callbacks.gradnorm`), averaged over each block of rounds, FedAvg
    against FedAvg + FedPart: the paper's Figure 1 as numbers."""
    from callbacks.gradnorm import FILENAME, GradNormCurves

    plans = [
        read_schedule(row.run_dir / "schedule.json")
        for row in rows
        if "_fedavg_fedpart" in row.config and (row.run_dir / "schedule.json").is_file()
    ]
    spikes: dict[tuple[str, int], dict[int, float]] = {}
    for row in rows:
        file = row.run_dir / FILENAME
        if "_fedavg_" in row.config and file.is_file():
            curves = GradNormCurves.load(file)
            variant = "full" if row.config.endswith("_full") else "fedpart"
            spikes[variant, row.seed] = dict(
                zip(curves.rounds, curves.spikes("grad_norm"), strict=True)
            )
    lines = []
    for name, first, last in spike_blocks(max(plans, key=len, default=[])):
        cells = [name, f"{first}–{last}"]
        for variant in ("full", "fedpart"):
            means = [
                statistics.fmean(s[r] for r in range(first, last + 1))
                for (v, _), s in spikes.items()
                if v == variant and all(r in s for r in range(first, last + 1))
            ]
            cells.append(mean_pm(means, 1.0, 2))
        lines.append(cells)
    header = ["block", "rounds", "spike, FedAvg", "spike, FedAvg + FedPart"]
    return markdown(header, lines)


def best_within_bytes(row: Row, budget: int) -> float | None:
    """A run's best test accuracy among the rounds by which it had moved at most `budget`
    bytes: full-network training given FedPart's communication."""
    sent, acc = load_run(row.run_dir, row.run_dir.name).comm_curve
    within = [a for b, a in zip(sent, acc, strict=True) if b <= budget]
    return max(within) if within else None


def fedpart_comm_figure(rows: list[Row]) -> None:
    """Test accuracy against cumulative communication, FedAvg against FedAvg + FedPart."""
    curves = {}
    for row in rows:
        if "_fedavg_" in row.config and row.finished_rounds():
            method = "FedAvg" if row.config.endswith("_full") else "FedAvg + FedPart"
            result = load_run(row.run_dir, row.run_dir.name)
            curves[f"{method}, seed {row.seed}"] = result.comm_curve
    plot_accuracy_vs_comm(curves, FIGURES / "fedpart_vs_comm.png")


# ---- FedMR --------------------------------------------------------------------------------


FEDMR_TAIL = 50  # rounds at the end averaged over: FedAvg's accuracy swings under label skew


def tail_mean(result: RunResult, rounds: int) -> float:
    """Mean test accuracy over the evaluations of the run's last `rounds` rounds."""
    evaluated, accs = result.curve
    last = evaluated[-1]
    return statistics.fmean(a for r, a in zip(evaluated, accs, strict=True) if r > last - rounds)


def fedmr_report(rows: list[Row]) -> str:
    """Best, final and late-round mean accuracy per split and method; the curves per split."""
    lines = []
    panels = []
    for alpha in ("0.1", "0.5"):
        pair = {
            m: [r for r in rows if r.config == f"fedmr_cifar10_{m}_dir{alpha}"]
            for m in ("fedavg", "fedmr")
        }
        results = {m: available(pair[m]) for m in pair}
        for method, name in (("fedavg", "FedAvg"), ("fedmr", "FedMR")):
            found = results[method]
            if not found:
                continue
            lines.append(
                [
                    alpha,
                    name,
                    mean_pm([r.best_acc for _, r in found]),
                    mean_pm([r.final_acc for _, r in found]),
                    mean_pm([tail_mean(r, FEDMR_TAIL) for _, r in found]),
                    str(max(r.rounds for _, r in found)),
                    ", ".join(str(row.seed) for row, _ in found),
                ]
            )
        panels.append(
            (
                f"Dirichlet({alpha})",
                [("FedAvg", r) for r in pair["fedavg"]] + [("FedMR", r) for r in pair["fedmr"]],
            )
        )
    curves_panels(
        panels, "test/acc", "test accuracy (global model)", FIGURES / "fedmr_accuracy.png"
    )
    header = [
        "Dirichlet alpha", "method", "best acc", "final acc",
        f"mean of the last {FEDMR_TAIL} rounds", "rounds", "seeds",
    ]  # fmt: skip
    return markdown(header, lines)


# ---- LIPS ---------------------------------------------------------------------------------


MOVING = 0.01  # a layer "moves" in a round when it changes by at least 1 % of its norm


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


def lips_report(rows: list[Row]) -> str:
    """Personalised accuracy before and after aggregation, global accuracy, and how long the
    layers keep moving; the personalised curves and the runs' inertia heat maps."""
    lines = []
    methods = (("fedavg", "FedAvg"), ("lips", "FedAvg + LIPS"))
    for method, name in methods:
        found = complete([r for r in rows if r.config == f"lips_cifar10_{method}"])
        if not found:
            continue
        cells = [name]
        for key in ("personal/acc_local", "personal/acc_global", "test/acc"):
            series = [metric_series(r.run_dir, key)[1] for r in found]
            cells.append(mean_pm([max(s) for s in series if s]))
            cells.append(mean_pm([s[-1] for s in series if s]))
        cells.append(mean_pm([last_moving_round(r.run_dir) for r in found], 1.0, 0))
        cells.append(", ".join(str(r.seed) for r in found))
        lines.append(cells)
    header = [
        "method", "local model best", "local final", "received model best", "received final",
        "global test best", "global final", f"layers move ≥ {MOVING:.0%} per round until", "seeds",
    ]  # fmt: skip
    panels = [
        (
            title,
            [
                (name, r)
                for method, name in methods
                for r in rows
                if r.config == f"lips_cifar10_{method}"
            ],
        )
        for title in ("before aggregation (local model)", "after aggregation (received model)")
    ]
    figure_keys = ("personal/acc_local", "personal/acc_global")
    for (title, runs), key in zip(panels, figure_keys, strict=True):
        name = "lips_personal_local.png" if key.endswith("local") else "lips_personal_global.png"
        curves_panels([(title, runs)], key, "personalised accuracy", FIGURES / name)
    for row in rows:
        if row.seed == 0:
            method = row.config.removeprefix("lips_cifar10_")
            copy_plot(row, "inertia_cosine.png", f"lips_inertia_cosine_{method}.png")
            copy_plot(row, "inertia_rel_change.png", f"lips_inertia_rel_change_{method}.png")
    return markdown(header, lines)


# ---- layer-peeled probes ------------------------------------------------------------------


PROBE_COLUMNS = {
    "train_ratio": "Var_W/Var_B, train",
    "test_ratio": "Var_W/Var_B, local test",
    "train_align": "alignment with the next layer, train",
}


def probes_report(rows: list[Row]) -> str:
    """Per layer, the relative change (received against local model) of the probe's metrics at
    the last probed round, then the accuracy of both models on the clients' own test data."""
    found = complete(rows)
    per_seed: list[dict[tuple[str, str], float]] = []
    layers: list[str] = []
    for row in found:
        records = read_metrics(row.run_dir / "metrics.jsonl")
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

    def cell(layer: str, metric: str) -> str:
        values = [c[layer, metric] for c in per_seed if (layer, metric) in c]
        return mean_pm(values, 100.0, 1) + " %" if values else "-"

    lines = [[layer, *(cell(layer, m) for m in PROBE_COLUMNS)] for layer in layers]
    table = markdown(["layer (input to penultimate)", *PROBE_COLUMNS.values()], lines)
    accuracy = []
    for key, name in (("personal/acc_local", "local model"), ("personal/acc_global", "received")):
        finals = [metric_series(r.run_dir, key)[1] for r in found]
        accuracy.append([name, mean_pm([f[-1] for f in finals if f])])
    for row in found:
        if row.seed == 0:
            copy_plot(row, "probe_cfd.png", "probes_cfd.png")
            copy_plot(row, "probe_cfd_rounds.png", "probes_cfd_rounds.png")
    seeds_used = ", ".join(str(r.seed) for r in found)
    header = [f"model (last round, seeds {seeds_used})", "accuracy on the clients' local test"]
    return table + "\n" + markdown(header, accuracy)


# ---- the papers ---------------------------------------------------------------------------


def seeds(config: str, seeds_: Sequence[int], rounds: int | None = None) -> list[Row]:
    return [Row(config, seed, rounds) for seed in seeds_]


PAPERS: dict[str, Paper] = {
    "fedpart": Paper(
        rows=[
            Row("fedpart_cifar10_fedavg_full", 0),
            Row("fedpart_cifar10_fedavg_fedpart", 0),
            Row("fedpart_cifar10_fedavg_full", 1, rounds=25),
            Row("fedpart_cifar10_fedavg_fedpart", 1, rounds=25),
            *seeds("fedpart_cifar10_fedprox_full", (0,), rounds=25),
            *seeds("fedpart_cifar10_fedprox_fedpart", (0,), rounds=25),
            *seeds("fedpart_cifar10_moon_full", (0,), rounds=25),
            *seeds("fedpart_cifar10_moon_fedpart", (0,), rounds=25),
        ],
        report=fedpart_report,
    ),
    "fedmr": Paper(
        rows=[
            Row(f"fedmr_cifar10_{method}_dir{alpha}", seed)
            for alpha, seeds_ in (("0.1", (0, 1)), ("0.5", (0,)))
            for seed in seeds_
            for method in ("fedavg", "fedmr")
        ],
        report=fedmr_report,
    ),
    "lips": Paper(
        rows=[Row("lips_cifar10_fedavg", 0), Row("lips_cifar10_lips", 0)],
        report=lips_report,
    ),
    "probes": Paper(rows=seeds("cfd_cifar10_fedavg", (0, 1)), report=probes_report),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paper", choices=[*PAPERS, "all"])
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once (one thread each)")
    parser.add_argument("--figures_only", action="store_true", help="redraw, run nothing")
    parser.add_argument(
        "--only", default="", help="run only the rows whose config name contains this text"
    )
    args = parser.parse_args(argv)
    names = list(PAPERS) if args.paper == "all" else [args.paper]
    if not args.figures_only:
        rows = [row for name in names for row in PAPERS[name].rows if args.only in row.config]
        run_rows(rows, args.jobs)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = PAPERS[name].rows
        table = PAPERS[name].report(rows) + "\n" + commands_table(rows)
        (FIGURES / f"{name}_table.md").write_text(table)
        print(f"\n## {name}\n\n{table}")


if __name__ == "__main__":
    main()
