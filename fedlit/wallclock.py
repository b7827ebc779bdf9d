"""A run's wall time over its segments: a resumed run continues the clock of the run it
resumes, so summary.json's `wall_seconds` is the time of the whole run, and `segments` says
how many processes it took."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class WallClock:
    """Seconds of the rounds of every segment so far; `start` marks this segment's first round."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.before = 0.0
        self.segments = 1
        self.started: float | None = None

    def start(self) -> None:
        self.started = self.clock()

    def seconds(self) -> float:
        if self.started is None:
            return self.before
        return self.before + self.clock() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "segments": self.segments}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's clock (none in checkpoints older than the clock: from 0)."""
        if state:
            self.before = float(state["seconds"])
            self.segments = int(state["segments"]) + 1
