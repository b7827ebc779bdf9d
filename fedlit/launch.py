"""Starting and stopping the ranks: Fabric, torchrun's environment and restarts, teardown.

Ranks come from Fabric's launcher (`trainer.devices` processes on this machine) or from torchrun,
whose environment wins when it is set. Nothing here touches data, models or rounds.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from fedlit.config import RunConfig, TrainerConfig
from fedlit.errors import StoppedWithAnotherRank

if TYPE_CHECKING:
    from fedlit.context import Context

TORCHRUN_VARIABLES = {"RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"}


def launch_settings(trainer: TrainerConfig) -> tuple[int, int]:
    """(devices, num_nodes): from torchrun's environment when started by it, else the config."""
    if under_torchrun():
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        return local, max(1, int(os.environ["WORLD_SIZE"]) // local)
    return trainer.devices, trainer.num_nodes


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return os.environ.keys() >= TORCHRUN_VARIABLES


def has_node_launcher() -> bool:
    """Whether something starts this process on each of several nodes: torchrun, or the
    variables Lightning's own multi-node launch reads (MASTER_ADDR and NODE_RANK on every
    node). Without one, `trainer.num_nodes > 1` would wait forever for nodes nobody starts."""
    return under_torchrun() or {"MASTER_ADDR", "NODE_RANK"} <= os.environ.keys()


def is_first_process() -> bool:
    """Whether this process is (or, before launch, will be) global rank 0: the one that owns
    the run directory. torchrun sets RANK; processes Fabric's launcher starts carry LOCAL_RANK
    and NODE_RANK; the process that launches them is rank 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return (
        int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    )


def stop_together(context: Context, error: Exception | None) -> None:
    """Every rank learns whether any rank failed, and all stop if one did: the rank that
    failed raises its `error`, the others `StoppedWithAnotherRank`.

    For what one rank does alone (rank 0 writes the run's files and checkpoints; each rank
    restores its own clients): without it the other ranks would wait in their next collective
    until a timeout. One all-reduce of a flag, only when there are several ranks.
    """
    failed = error is not None
    if context.comm.distributed:
        flag = torch.tensor([float(failed)], device=context.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone_failed = bool(flag.item())
    else:
        anyone_failed = failed
    if error is not None:
        raise error
    if anyone_failed:
        raise StoppedWithAnotherRank(
            f"rank {context.rank} stops: another rank failed (its message says why)"
        )


def make_fabric(run: RunConfig) -> Fabric:
    # Lightning's information lines (the distributed start-up banner) are left out on every
    # rank: the start-up panel says what runs where, and `logger.quiet` means no output at all.
    # The banner goes through whichever of the two packages registered its rank-zero logger
    # last (importing lightning imports both).
    for name in ("lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    devices, num_nodes = launch_settings(run.trainer)
    accelerator = "cuda" if run.trainer.accelerator == "gpu" else run.trainer.accelerator
    return Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        precision=run.trainer.precision,
    )


def launch(run: RunConfig) -> Fabric:
    """Start the ranks; the calling process becomes rank 0 (or is one of torchrun's ranks)."""
    fabric = make_fabric(run)
    join_restarted_torchrun_group(run)
    fabric.launch()
    return fabric


def join_restarted_torchrun_group(run: RunConfig) -> None:
    """After a torchrun restart, join the process group under a per-attempt store prefix.

    torchrun's agent keeps hosting the same TCP store across restarts; a process group set up
    the default way (as Fabric does) then reads the previous attempt's peer addresses from it
    and fails with "Connection refused". Joining here, under a prefix named after
    TORCHELASTIC_RESTART_COUNT, gives every attempt its own keys; Fabric then finds the group
    already initialised and uses it.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if attempt == 0 or not agent_store or not dist.is_available() or dist.is_initialized():
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    cuda = run.trainer.accelerator in ("cuda", "gpu") or (
        run.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore(f"fedlit/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def leave_process_group(fabric: Fabric) -> None:
    """Ranks leave the process group together once the run is done.

    A gloo group still alive at interpreter exit can abort the process in C++ ("terminate called
    without an active exception"), which torchrun reports as a failed rank; Fabric does not
    destroy the group it set up, so fedlit does.
    """
    if dist.is_available() and dist.is_initialized():
        fabric.barrier()
        dist.destroy_process_group()
