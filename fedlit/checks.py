"""Settings refused before any process starts or any data is read, each with a message naming
the setting and what would be valid."""

from __future__ import annotations

from typing import Any

import yaml
from lightning.fabric.accelerators.cuda import num_cuda_devices

from fedlit.clients import clients_per_round
from fedlit.config import RunConfig, TrainerConfig, WandbConfig
from fedlit.hooks import defines
from fedlit.launch import has_node_launcher, launch_settings
from fedlit.optim import probe_optimizer
from fedlit.protocols import parse_protocols
from fedlit.rundir import check_run_dir
from fedlit.schedule import layer_selectors


def check_before_launch(run: RunConfig) -> None:
    """Refuse what can be refused without data or processes.

    More ranks than clients per round is allowed: a rank with no sampled client in a round
    still joins every collective (it adds nothing to the sum), and the sample changes every
    round. More ranks than clients is refused: ranks beyond the last client would own no client
    (client c runs on rank c % world_size) and sit idle in every round.
    """
    clients_per_round(
        run.data.num_clients, run.trainer.clients_per_round, run.trainer.client_fraction
    )
    devices, num_nodes = launch_settings(run.trainer)
    if devices * num_nodes > run.data.num_clients:
        raise ValueError(
            f"{devices * num_nodes} ranks (trainer.devices x trainer.num_nodes, or torchrun's "
            f"world size) for data.num_clients={run.data.num_clients}: ranks beyond the last "
            "client would own no client and idle in every round; use at most "
            f"{run.data.num_clients} ranks"
        )
    selecting = [type(c).__name__ for c in layer_selectors(run.callbacks)]
    if selecting and not getattr(run.algorithm, "partial_rounds", True):
        raise ValueError(
            f"{type(run.algorithm).__name__} cannot train only some layers per round, but "
            f"callbacks {selecting} select layers; remove them or use an averaging algorithm "
            "(FedAvg, FedProx, MOON)"
        )
    if run.server_optimizer is not None and defines(run.algorithm, "make_server"):
        raise ValueError(
            f"server_optimizer steps from the global model towards the clients' average, but "
            f"{type(run.algorithm).__name__} has a server step of its own (no average); remove "
            "server_optimizer or use an averaging algorithm"
        )
    for protocol in parse_protocols(run.trainer.eval_bn):
        if protocol.kind == "client" and protocol.client >= run.data.num_clients:
            raise ValueError(
                f"trainer.eval_bn: {protocol.spec} names a client that does not exist; clients "
                f"are 0..{run.data.num_clients - 1} (data.num_clients={run.data.num_clients})"
            )
    if run.trainer.personal_eval and run.data.local_test == "none":
        raise ValueError(
            "trainer.personal_eval needs per-client test splits: set data.local_test to "
            "'label_mix' (with data.local_test_size) or 'natural'"
        )
    check_optimizer(run.trainer.optimizer, optimizer_name(run))
    check_ranks(run.trainer)
    check_wandb(run.logger.wandb)
    check_run_dir(run.run_dir)


def optimizer_name(run: RunConfig) -> str:
    """The optimizer's class name as the config gives it (the built factory is an anonymous
    wrapper), or the factory's own name when the run was built in Python."""
    try:
        config = yaml.safe_load(run.config_yaml or "") or {}
        return str(config["trainer"]["optimizer"]["class_path"]).rpartition(".")[2]
    except (yaml.YAMLError, KeyError, TypeError):
        factory = getattr(run.trainer.optimizer, "func", run.trainer.optimizer)
        return getattr(factory, "__name__", "the optimizer")


def check_optimizer(factory: Any, name: str) -> None:
    """Build the optimizer once on a dummy parameter: torch checks its hyper-parameters (a
    negative lr, betas outside [0, 1), ...) only when it is built, which is otherwise in the
    first client's training."""
    if factory is None:
        return
    try:
        probe_optimizer(factory)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"trainer.optimizer ({name}) refuses its init_args: {error}; give it values it "
            "accepts (e.g. --trainer.optimizer.init_args.lr 0.01)"
        ) from None


def check_ranks(trainer: TrainerConfig) -> None:
    """Ranks that could never start: CUDA without a GPU (or fewer GPUs than devices), or
    several nodes with nothing that starts the other nodes (the run would wait forever)."""
    devices, num_nodes = launch_settings(trainer)
    if trainer.accelerator in ("cuda", "gpu"):
        available = num_cuda_devices()
        if available == 0:
            raise ValueError(
                f"trainer.accelerator={trainer.accelerator} but no CUDA device is visible here "
                "(torch sees none); use --trainer.accelerator cpu, or auto (a GPU when there "
                "is one)"
            )
        if devices > available:
            raise ValueError(
                f"trainer.devices={devices} on CUDA, but {available} CUDA device(s) are visible; "
                f"use at most {available}"
            )
    if num_nodes > 1 and not has_node_launcher():
        raise ValueError(
            f"trainer.num_nodes={num_nodes} needs every node started by a launcher, and none "
            "started this one: run `torchrun --nnodes N --nproc_per_node M --rdzv-endpoint "
            "HOST:PORT -m fedlit fit ...` on each node (the node count then comes from torchrun), "
            "or set trainer.num_nodes 1 on one machine"
        )


def check_wandb(config: WandbConfig) -> None:
    """An explicit `online` needs an API key; W&B would otherwise stop the run at its start
    with a prompt or a traceback."""
    from fedlit.dashboard import has_api_key

    if config.mode == "online" and not has_api_key():
        raise ValueError(
            "logger.wandb.mode=online needs a W&B API key, and none is configured (no "
            "WANDB_API_KEY, no `wandb login`); log in, or set logger.wandb.mode to offline, "
            "auto (online with a key, offline without) or disabled"
        )
