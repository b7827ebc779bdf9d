"""Datasets as in-memory tensors, seeded federated partitions, and on-device batching.

The names below are imported on first use (PEP 562): `fedlit.data.config`, which the command
line needs to build its parser, must not pull in torch, torchvision or matplotlib with them.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DataConfig": "fedlit.data.config",
    "DataBundle": "fedlit.data.bundle",
    "Split": "fedlit.data.bundle",
    "channel_stats": "fedlit.data.bundle",
    "load_dataset": "fedlit.data.datasets",
    "DeviceData": "fedlit.data.device",
    "Partition": "fedlit.data.partition",
    "PartitionError": "fedlit.data.partition",
    "dirichlet": "fedlit.data.partition",
    "iid": "fedlit.data.partition",
    "iid_overlap": "fedlit.data.partition",
    "label_counts": "fedlit.data.partition",
    "label_mix_test": "fedlit.data.partition",
    "make_partition": "fedlit.data.partition",
    "shards": "fedlit.data.partition",
    "label_count_table": "fedlit.data.report",
    "plot_label_heatmap": "fedlit.data.report",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedlit.data' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
