"""`make bench`: the round-loop benchmark over models, clients per round and ranks.

Each case runs in a process of its own (Fabric launches ranks once per process), appends one
JSON record to the results file, and the table at the end shows seconds per round, throughput,
memory and the overhead against the plain loop; a plot shows how a round grows with clients
per round and with ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


def run_case(model: str, clients: int, ranks: int, out: Path, extra: list[str]) -> None:
    command = [
        sys.executable, "-m", "benchmarks.round_loop",
        "--model", model, "--clients", str(clients), "--ranks", str(ranks),
        "--json", str(out), *extra,
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def table(records: list[dict]) -> Table:
    table = Table(title=f"fedlit round loop ({platform.processor() or platform.machine()})")
    for column in (
        "model", "clients", "ranks", "steps/round", "s/round", "samples/s",
        "plain s/round", "overhead", "all-reduce MB", "peak MB",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for r in records:
        table.add_row(
            r["model"], str(r["clients"]), str(r["ranks"]), str(r["sgd_steps_per_round"]),
            f"{r['seconds_per_round']:.3f}", f"{r['samples_per_second']:.0f}",
            f"{r['plain_seconds_per_round']:.3f}", f"{100 * r['overhead']:+.1f}%",
            f"{r['collective_mb_per_round_per_rank']:.2f}", f"{r['peak_memory_mb_rank0']:.0f}",
        )  # fmt: skip
    return table


def plot_scaling(records: list[dict], path: Path) -> None:
    """Seconds per round against clients per round, one line per (model, ranks)."""
    figure, axis = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["model"], r["ranks"]) for r in records})
    for model, ranks in keys:
        points = sorted(
            (r["clients"], r["seconds_per_round"])
            for r in records
            if r["model"] == model and r["ranks"] == ranks
        )
        axis.plot(*zip(*points, strict=True), marker="o", label=f"{model}, {ranks} rank(s)")
    axis.set_xlabel("clients per round")
    axis.set_ylabel("seconds per round")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet8"])
    parser.add_argument("--clients", nargs="+", type=int, default=[10, 50, 100])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/results.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("runs/bench/scaling.png"))
    args, extra = parser.parse_known_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    for model, clients, ranks in itertools.product(args.models, args.clients, args.ranks):
        run_case(model, clients, ranks, args.out, extra)
    records = [json.loads(line) for line in args.out.read_text().splitlines() if line]
    Console(width=160).print(table(records))
    plot_scaling(records, args.plot)
    print(f"results: {args.out}  plot: {args.plot}")


if __name__ == "__main__":
    main()
