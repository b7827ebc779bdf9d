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

    `optimizer` is built anew for every client in every round. `reduce_dtype` float64 makes the
    average independent of how clients are spread over ranks: n_k * w_k is exact in float64, so
    1 rank and N ranks give the same float32 model, at twice the bytes per all-reduce.

    Attributes:
        rounds: Federated rounds.
        devices: Ranks per node (torchrun's environment overrides it).
        num_nodes: Nodes (torchrun's environment overrides it).
        accelerator: cpu, cuda (or gpu), or auto.
        precision: 32-true, or bf16-mixed (autocast in local training and evaluation).
        clients_per_round: Clients sampled each round (default all; or client_fraction).
        client_fraction: Fraction of the clients sampled each round (or clients_per_round).
        local_epochs: Local epochs of each client in each round.
        batch_size: Local training batch size.
        optimizer: Any torch.optim class with its init_args, built per client and round
            (default SGD lr 0.01).
        eval_every: Evaluate every N rounds (and always after the last).
        eval_batch_size: Batch size of evaluation.
        personal_eval: Also evaluate each client on its local test split (needs
            data.local_test).
        checkpoint_every: Write checkpoints/last.ckpt every N rounds (0: only at the end).
        reduce_dtype: Precision of the server's weighted sum (float64: rank-independent).
        cpu_threads: torch threads per CPU rank (default: the cores this process may use,
            less those the load average shows busy, divided by the ranks of its node, at
            least 1).
        eval_bn: BN statistics the global model is tested with: averaged, client:K,
            recalibrated; the first gives test/acc, the others test/acc@<name>.
        eval_bn_samples: Training images `recalibrated` recomputes the BN statistics on.
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

    Attributes:
        mode: auto (online with an API key, offline without), online, offline or disabled.
        project: W&B project (default: WANDB_PROJECT when set, else fedlit).
        entity: W&B user or team (default: WANDB_ENTITY when set, else your default entity).
        name: Run name (default: the run_dir's name).
        group: Run group, e.g. one per sweep or per method.
        tags: Run tags.
        notes: Run notes.
        dir: W&B writes <dir>/wandb/.
        id: A W&B run id to continue (resume="allow").
        init_timeout: Seconds wandb.init may take before the server counts as unreachable.
    """

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str | None = None
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
        if self.project is not None and not self.project:
            raise ValueError(
                "logger.wandb.project must be a non-empty string, or null (WANDB_PROJECT when "
                "set, else fedlit)"
            )
        if self.mode in ("online", "offline") and importlib.util.find_spec("wandb") is None:
            raise ValueError(
                f"logger.wandb.mode={self.mode} needs the wandb package, which is not installed "
                "here: install it (uv sync), or set logger.wandb.mode to auto (W&B off with a "
                "notice when wandb is missing) or disabled"
            )


@dataclass
class LoggerConfig:
    """Console output and the W&B run; the files in run_dir are always written.

    Attributes:
        quiet: No console output at all (no panel, progress, table, nor W&B's or Lightning's
            messages), for scripts and sweeps.
        plots: Draw the run's figures into run_dir/plots at the end.
        wandb: The Weights & Biases run.
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
