"""A run's config as objects: the `trainer` and `logger` sections, and `RunConfig`, everything
`fedlit fit` needs once the config is parsed and instantiated (data has its own section class,
in fedlit.data)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fedlit.protocols import parse_protocols

if TYPE_CHECKING:
    from fedlit.data.config import DataConfig
    from fedlit.server import ServerOptimizer

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


@dataclass
class TrainerConfig:
    """How the federation runs: rounds, ranks, sampling, local training, schedules.

    `optimizer` is built anew for every client in every round (class_path/init_args of any
    torch.optim class, e.g. SGD with momentum and weight decay, or Adam); when unset, plain SGD
    with lr 0.01 is used.

    `eval_bn` lists the evaluation protocols of the global model's BatchNorm statistics
    (fedlit.eval_bn): `averaged` (default), `client:K`, `recalibrated`; the first gives test/acc,
    the others test/acc@<name>. `eval_bn_samples` training images are used by `recalibrated`.

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
    eval_bn: list[str] = field(default_factory=lambda: ["averaged"])
    eval_bn_samples: int = 1024

    def __post_init__(self) -> None:
        positive = {
            "rounds": self.rounds,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "eval_batch_size": self.eval_batch_size,
            "eval_bn_samples": self.eval_bn_samples,
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
        parse_protocols(self.eval_bn)


WANDB_MODES = ("auto", "online", "offline", "disabled")


@dataclass
class WandbConfig:
    """The Weights & Biases run of a fit (rank 0 only; other ranks never create runs).

    `mode: auto` (the default) never makes a run fail for want of a network, an account or the
    package: online when an API key is configured (WANDB_API_KEY or `wandb login`), offline
    otherwise, and disabled with a one-line notice when wandb is not installed. `online` and
    `offline` are explicit requests and stop the run before training when wandb is missing.
    W&B writes its files under `<dir>/wandb/`; the repository's wandb/ folder is git-ignored.
    """

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "fedlit"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    dir: str = "."
    id: str | None = None
    init_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(
                f"logger.wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}"
            )
        if self.init_timeout <= 0:
            raise ValueError(
                f"logger.wandb.init_timeout must be > 0 seconds, got {self.init_timeout}"
            )
        if not self.project:
            raise ValueError("logger.wandb.project must be a non-empty string")
        if self.mode in ("online", "offline") and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                f"logger.wandb.mode={self.mode} needs the wandb package, which is not installed "
                "here: install it (uv sync), or set logger.wandb.mode to auto (W&B off with a "
                "notice when wandb is missing) or disabled"
            )


@dataclass
class LoggerConfig:
    """Console output and the W&B run; the files in run_dir are always written.

    `quiet` silences the console (no panel, progress bars or table; W&B's own messages too),
    for scripts and sweeps. `plots` draws the run's figures into run_dir/plots at the end.
    """

    quiet: bool = False
    plots: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


ModelFactory = Callable[[int, tuple[int, ...]], nn.Module]


@dataclass
class RunConfig:
    """Everything `fedlit fit` needs, as parsed and instantiated from the config."""

    seed: int
    run_dir: Path
    trainer: TrainerConfig
    data: DataConfig
    model: ModelFactory
    algorithm: Any
    callbacks: list[Any] = field(default_factory=list)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    server_optimizer: ServerOptimizer | None = None
    config_yaml: str = ""
    resume: dict[str, Any] | None = None  # a checkpoint loaded by fedlit.resume.load_for_resume
    resume_path: Path | None = None  # where `resume` was read from, for messages

    def __post_init__(self) -> None:
        # bool is an int subclass; numpy's SeedSequence refuses negative seeds deep inside
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(
                "seed must be a non-negative integer (it seeds every random stream of the run: "
                f"partition, sampling, batches, initialisation), got {self.seed!r}"
            )
