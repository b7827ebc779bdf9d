"""The planned layer schedule of a run, shown before the first round.

Callbacks that narrow the trained layers (FedPart's `select_layers`) answer as a pure function of
the round, so the whole plan can be read up front: the console shows it as a table of segments
(consecutive rounds training the same layers) and run_dir/schedule.json keeps it round by round
for plots and scripts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fedlit.hooks import call, defines
from fedlit.units import human_bytes

MAX_ROWS = 24  # longer schedules show their first segments; schedule.json has them all


@dataclass(frozen=True)
class Segment:
    """Rounds `first`..`last` (inclusive) all train and send `layers`."""

    first: int
    last: int
    layers: tuple[str, ...]


def layer_selectors(callbacks: list[Any]) -> list[Any]:
    """The callbacks that answer `select_layers`."""
    return [c for c in callbacks if defines(c, "select_layers")]


def selects_layers(callbacks: list[Any]) -> bool:
    return bool(layer_selectors(callbacks))


def layers_of_round(callbacks: list[Any], layer_names: list[str], round_idx: int) -> list[str]:
    """The engine's question before a round: every callback may narrow the layers trained and
    communicated (None leaves the answer so far); the last answer wins."""
    active = list(layer_names)
    for callback in callbacks:
        answer = call(callback, "select_layers", round=round_idx, layers=layer_names)
        if answer is not None:
            active = list(answer)
    return active


def planned_layers(callbacks: list[Any], layer_names: list[str], rounds: int) -> list[list[str]]:
    """The layers of rounds 1..rounds, asked exactly as the engine asks before each round."""
    return [layers_of_round(callbacks, layer_names, r) for r in range(1, rounds + 1)]


def segments(plan: list[list[str]]) -> list[Segment]:
    """Runs of consecutive rounds with the same layers."""
    runs: list[Segment] = []
    for round_idx, active in enumerate(plan, start=1):
        key = tuple(active)
        if runs and runs[-1].layers == key:
            runs[-1] = Segment(runs[-1].first, round_idx, key)
        else:
            runs.append(Segment(round_idx, round_idx, key))
    return runs


def write_schedule(plan: list[list[str]], path: Path) -> None:
    """run_dir/schedule.json: {"rounds": [{"round": r, "layers": [...]}, ...]}."""
    rounds = [{"round": r, "layers": active} for r, active in enumerate(plan, start=1)]
    path.write_text(json.dumps({"rounds": rounds}, indent=1) + "\n")


def read_schedule(path: Path) -> list[list[str]]:
    """The plan a run wrote with write_schedule: the layers of rounds 1, 2, ..."""
    rounds = json.loads(path.read_text())["rounds"]
    return [entry["layers"] for entry in sorted(rounds, key=lambda e: e["round"])]


def schedule_table(
    runs: list[Segment], layer_names: list[str], sent_bytes: Callable[[list[str]], int]
) -> Table:
    """One row per segment: rounds, what trains, and what one client sends per round."""
    full = tuple(layer_names)
    table = Table(title="planned layer schedule", show_header=True)
    table.add_column("rounds", justify="right")
    table.add_column("layers trained and sent")
    table.add_column("sent per client", justify="right")
    for run in runs[:MAX_ROWS]:
        span = str(run.first) if run.first == run.last else f"{run.first}-{run.last}"
        what = "all layers" if run.layers == full else ", ".join(run.layers)
        table.add_row(span, what, human_bytes(sent_bytes(list(run.layers))))
    if len(runs) > MAX_ROWS:
        table.add_row("...", f"{len(runs) - MAX_ROWS} more segments in schedule.json", "")
    return table
