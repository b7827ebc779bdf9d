"""Starting and stopping the ranks: Fabric, torchrun's environment and restarts, teardown.

Ranks come from Fabric's launcher (`trainer.devices` processes on this machine) or from torchrun,
whose environment wins when it is set. Nothing here touches data, models or rounds.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from lightning.fabric import Fabric

from fedlit.config import RunConfig, TrainerConfig


def launch_settings(trainer: TrainerConfig) -> tuple[int, int]:
    """(devices, num_nodes): from torchrun's environment when started by it, else the config."""
    if {"RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"} <= os.environ.keys():
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        return local, max(1, int(os.environ["WORLD_SIZE"]) // local)
    return trainer.devices, trainer.num_nodes


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
