"""Fault injection for the resume tests, off unless FEDLIT_FAULT is set."""

from __future__ import annotations

import os
from pathlib import Path


def inject_fault(rank: int, round_idx: int) -> None:
    """FEDLIT_FAULT="rank:round:marker" makes that rank die at the start of that round, once
    (it creates the marker file; a restarted job that finds it carries on)."""
    spec = os.environ.get("FEDLIT_FAULT")
    if not spec:
        return
    fault_rank, fault_round, marker = spec.split(":", 2)
    if int(fault_rank) == rank and int(fault_round) == round_idx and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)
