"""The `trainer` and `logger` sections of a run's config (data has its own, in fedlit.data)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


@dataclass
class TrainerConfig:
    """How the federation runs: rounds, ranks, sampling, local training, schedules.

    `optimizer` is built anew for every client in every round (class_path/init_args of any
    torch.optim class, e.g. SGD with momentum and weight decay, or Adam); when unset, plain SGD
    with lr 0.01 is used.

    `reduce_dtype` is the precision of the server's weighted sum. float64 (the default) makes
    the average independent of how clients are spread over ranks: n_k * w_k is exact in float64,
    so 1 rank and N ranks give the same float32 model, at twice the bytes per all-reduce.
    """

    rounds: int = 10
    devices: int = 1
    num_nodes: int = 1
    accelerator: Literal["auto", "cpu", "cuda", "gpu"] = "auto"
    precision: Literal["32-true", "bf16-mixed"] = "32-true"
    clients_per_round: int | None = None
    client_fraction: float | None = None
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: OptimizerFactory | None = None
    eval_every: int = 1
    eval_batch_size: int = 1024
    personal_eval: bool = False
    checkpoint_every: int = 0
    reduce_dtype: Literal["float64", "float32"] = "float64"
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        positive = {
            "rounds": self.rounds,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "eval_batch_size": self.eval_batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"trainer.{key} must be a positive integer, got {value}")
        if self.checkpoint_every < 0:
            raise ValueError(
                "trainer.checkpoint_every must be 0 (only at the end) or a positive number of "
                f"rounds, got {self.checkpoint_every}"
            )
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"trainer.cpu_threads must be >= 1 or null, got {self.cpu_threads}")


@dataclass
class LoggerConfig:
    """Console output; the metrics files in run_dir are always written."""

    quiet: bool = False
