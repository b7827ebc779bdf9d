"""Datasets as in-memory tensors, seeded federated partitions, and on-device batching."""

from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, Split, channel_stats, load_dataset
from fedlit.data.device import DeviceData
from fedlit.data.partition import (
    Partition,
    PartitionError,
    dirichlet,
    iid,
    iid_overlap,
    label_counts,
    label_mix_test,
    make_partition,
    shards,
)
from fedlit.data.report import label_count_table, plot_label_heatmap

__all__ = [
    "DataBundle",
    "DataConfig",
    "DeviceData",
    "Partition",
    "PartitionError",
    "Split",
    "channel_stats",
    "dirichlet",
    "iid",
    "iid_overlap",
    "label_count_table",
    "label_counts",
    "label_mix_test",
    "load_dataset",
    "make_partition",
    "plot_label_heatmap",
    "shards",
]
