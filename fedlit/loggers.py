"""What a run writes into its run_dir (rank 0 only); the console is fedlit.console.

run_dir/config.yaml   the resolved config, as `--print_config` would show it
run_dir/metrics.jsonl one JSON object per evaluated round, appended and flushed as it happens
run_dir/summary.json  best and final accuracy, rounds, wall time, bytes communicated

W&B lives in fedlit.dashboard, the figures in fedlit.plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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
