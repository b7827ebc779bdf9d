"""The round loop: sample, dispatch, train locally, reduce, evaluate, log.

One round, as data flow:
1. every rank draws the same client sample from the (seed, round) stream;
2. each rank runs the sampled clients it owns (client % world_size), one after another, on one
   working model that is reloaded from the global weights for each client;
3. each rank adds n_k * w_k of its clients into one flat buffer, one all-reduce sums the
   buffers, and every rank divides: the new global model is identical on every rank;
4. evaluation (global test set sharded over ranks; personalised on clients' local test splits)
   runs on its schedule, rank 0 writes metrics, checkpoints and plots.

Hooks, in call order (callbacks are plain objects; each receives only the arguments its method
names): on_fit_start(fabric, model, layers, federation), on_round_start(round, clients),
select_layers(round, layers) -> names or None (asked, not called: narrows which layers are
trained and communicated; the others are frozen for the round),
on_client_start(round, client, model), on_train_batch_end(round, client, step, loss),
on_client_end(round, client, model), on_aggregate_end(round, global_model, clients),
on_evaluate_end(round, metrics), on_round_end(round, metrics), on_fit_end(summary).

Callbacks may add entries to `metrics` in on_evaluate_end and on_round_end; every rank must
add the same values (reduce per-rank numbers with `federation.comm` first). The algorithm's own
optional hooks are described in fedlit.algorithms.base.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from torch import nn

from fedlit.algorithms.base import Algorithm, ServerStep, call_optional, default_server
from fedlit.checkpoint import save_checkpoint
from fedlit.clients import (
    ClientStateStore,
    Stream,
    clients_per_round,
    owned_clients,
    sample_clients,
    stream_seed,
    torch_generator,
)
from fedlit.comm import Communicator, FlatLayout, copy_into, named_tensors
from fedlit.config import LoggerConfig, TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, load_dataset
from fedlit.data.device import DeviceData
from fedlit.data.partition import Partition, make_partition
from fedlit.evaluation import SpreadOverClients, client_accuracy, evaluate_global
from fedlit.local import train_client
from fedlit.loggers import ConsoleReport, RunFiles
from fedlit.models.layers import Layer, check_layer_map
from fedlit.plots import plot_curves

ModelFactory = Callable[[int, tuple[int, ...]], nn.Module]


@dataclass
class RunConfig:
    """Everything `fedlit fit` needs, as parsed and instantiated from the config."""

    seed: int
    run_dir: Path
    trainer: TrainerConfig
    data: DataConfig
    model: ModelFactory
    algorithm: Algorithm
    callbacks: list[Any] = field(default_factory=list)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    config_yaml: str = ""


def ask_callbacks(callbacks: list[Any], query: str, value: Any, **kwargs: Any) -> Any:
    """Pass `value` through every callback that implements `query` (None means unchanged)."""
    for callback in callbacks:
        answer = call_optional(callback, query, **kwargs)
        if answer is not None:
            value = answer
    return value


def launch_settings(trainer: TrainerConfig) -> tuple[int, int]:
    """(devices, num_nodes): from torchrun's environment when started by it, else the config."""
    if {"RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"} <= os.environ.keys():
        local = int(os.environ["LOCAL_WORLD_SIZE"])
        return local, max(1, int(os.environ["WORLD_SIZE"]) // local)
    return trainer.devices, trainer.num_nodes


def make_fabric(run: RunConfig) -> Fabric:
    # Ranks other than 0 (started by Fabric's launcher or torchrun, which set these variables)
    # keep quiet: console output comes from rank 0 only.
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) != 0 or run.logger.quiet:
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    devices, num_nodes = launch_settings(run.trainer)
    accelerator = "cuda" if run.trainer.accelerator == "gpu" else run.trainer.accelerator
    return Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        precision=run.trainer.precision,
        callbacks=run.callbacks,
    )


def check_before_launch(run: RunConfig) -> None:
    """Settings that can be rejected without touching data, before any process starts."""
    clients_per_round(
        run.data.num_clients, run.trainer.clients_per_round, run.trainer.client_fraction
    )
    if run.trainer.personal_eval and run.data.local_test == "none":
        raise ValueError(
            "trainer.personal_eval needs per-client test splits: set data.local_test to "
            "'label_mix' (with data.local_test_size) or 'natural'"
        )


@dataclass
class Federation:
    """The state one rank holds during a run (models, data, client state, accounting)."""

    run: RunConfig
    fabric: Fabric
    data: DeviceData
    client_indices: list[torch.Tensor]
    client_test_indices: list[torch.Tensor] | None
    client_sizes: list[int]
    global_model: nn.Module
    working: nn.Module
    layers: list[Layer]
    local_buffers: ClientStateStore
    comm: Communicator
    per_round: int
    server: ServerStep | None = None
    comm_bytes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    def tensor_names(self, layer_names: list[str]) -> tuple[list[str], list[str]]:
        """(parameter names, floating-point buffer names) of the chosen layers, in map order."""
        chosen = set(layer_names)
        buffers = dict(self.global_model.named_buffers())
        params, floats = [], []
        for layer in self.layers:
            if layer.name in chosen:
                params.extend(layer.params)
                floats.extend(b for b in layer.buffers if buffers[b].is_floating_point())
        return params, floats

    def load_client_model(self, client: int, into: nn.Module | None = None) -> nn.Module:
        """`into` (default: the working model) := the global weights, with the client's own BN
        statistics when the algorithm keeps them local: the model `client` receives."""
        model = self.working if into is None else into
        copy_into(list(model.parameters()), list(self.global_model.parameters()))
        copy_into(list(model.buffers()), list(self.global_model.buffers()))
        own = self.local_buffers.get(client) if self.run.algorithm.buffers == "local" else None
        if own is not None:
            copy_into(named_tensors(model, list(own)), list(own.values()))
        return model


@dataclass
class Loaded:
    """What a rank needs before it has a device: data, its split, the initial model."""

    bundle: DataBundle
    partition: Partition
    model: nn.Module
    layers: list[Layer]


def load(run: RunConfig) -> Loaded:
    """Load data, partition it and build the model on the CPU: identical on every rank.

    Runs before the ranks are launched, so a missing file, an impossible partition or a broken
    layer map fails once, at once; the launching process becomes rank 0 and keeps what it loaded.
    """
    local_ranks, _ = launch_settings(run.trainer)
    torch.set_num_threads(run.trainer.cpu_threads or max(1, (os.cpu_count() or 1) // local_ranks))
    bundle = load_dataset(run.data)
    partition = make_partition(run.data, bundle, run.seed)
    torch.manual_seed(stream_seed(run.seed, Stream.INIT))
    model = run.model(bundle.num_classes, tuple(bundle.input_shape))
    model = call_optional(run.algorithm, "build_model", model=model) or model
    layers = model.layer_map()
    check_layer_map(model, layers)
    return Loaded(bundle, partition, model, layers)


def setup(run: RunConfig, fabric: Fabric, loaded: Loaded) -> Federation:
    """Move the loaded state to this rank's device and set up its accounting."""
    device = fabric.device
    data = DeviceData(
        loaded.bundle,
        device,
        crop_padding=run.data.crop_padding,
        hflip=run.data.hflip,
        normalize=run.data.normalize,
        rotation=run.data.rotation,
    )
    global_model = loaded.model.to(device)
    partition = loaded.partition

    def on_device(parts):
        return [torch.as_tensor(p, dtype=torch.long).to(device) for p in parts]

    fed = Federation(
        run=run,
        fabric=fabric,
        data=data,
        client_indices=on_device(partition.train),
        client_test_indices=on_device(partition.test) if partition.test is not None else None,
        client_sizes=[len(p) for p in partition.train],
        global_model=global_model,
        working=copy.deepcopy(global_model),
        layers=loaded.layers,
        local_buffers=ClientStateStore(device),
        comm=Communicator(fabric.world_size),
        per_round=clients_per_round(
            run.data.num_clients, run.trainer.clients_per_round, run.trainer.client_fraction
        ),
    )
    call_optional(
        run.algorithm,
        "setup",
        global_model=global_model,
        layers=fed.layers,
        device=device,
        federation=fed,
    )
    make_server = getattr(run.algorithm, "make_server", None)
    fed.server = make_server(fed) if make_server is not None else default_server(fed)
    return fed


def make_optimizer(run: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if run.trainer.optimizer is None:
        return torch.optim.SGD(params, lr=0.01)
    return run.trainer.optimizer(params)


@dataclass
class RoundPlan:
    """What a round moves: decided before any client trains, identical on every rank."""

    clients: list[int]
    mine: list[int]
    active: list[str]  # layers trained and communicated this round (the rest are frozen)
    trainable: set[str]  # parameter names of the active layers
    reduced: list[str]  # tensors in the all-reduce: trained parameters and their float buffers
    sent_bytes: int  # bytes one client uploads (and downloads) this round
    evaluate: bool


def plan_round(fed: Federation, round_idx: int) -> RoundPlan:
    run = fed.run
    clients = sample_clients(run.seed, round_idx, run.data.num_clients, fed.per_round)
    fed.fabric.call("on_round_start", round=round_idx, clients=clients)
    all_layers = [layer.name for layer in fed.layers]
    active = ask_callbacks(
        run.callbacks, "select_layers", all_layers, round=round_idx, layers=all_layers
    )
    params, float_buffers = fed.tensor_names(list(active))
    # Buffers are always reduced so that the global model can be evaluated; with the "local"
    # policy they are never sent back to clients, so they do not count as communication.
    sent = params + float_buffers if run.algorithm.buffers == "average" else params
    return RoundPlan(
        clients=clients,
        mine=owned_clients(clients, fed.rank, fed.world_size),
        active=list(active),
        trainable=set(params),
        reduced=params + float_buffers,
        sent_bytes=FlatLayout.of(fed.global_model, sent).nbytes(),
        evaluate=round_idx % run.trainer.eval_every == 0 or round_idx == run.trainer.rounds,
    )


def freeze_inactive(model: nn.Module, trainable: set[str]) -> None:
    """Parameters outside this round's layers get requires_grad=False: autograd then computes no
    weight gradient for them and backward stops below the lowest trainable layer."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def train_one_client(fed: Federation, plan: RoundPlan, round_idx: int, client: int) -> torch.Tensor:
    """Train `client` from the weights it receives; returns its mean loss (a device tensor)."""
    run, fabric = fed.run, fed.fabric
    fed.server.receive(client, fed.working)
    freeze_inactive(fed.working, plan.trainable)
    fabric.call("on_client_start", round=round_idx, client=client, model=fed.working)
    call_optional(
        run.algorithm,
        "client_start",
        round=round_idx,
        client=client,
        model=fed.working,
        global_model=fed.global_model,
    )
    optimizer = make_optimizer(run, [p for p in fed.working.parameters() if p.requires_grad])
    generator = torch_generator(run.seed, Stream.TRAIN, round_idx, client, device=fabric.device)
    # dropout and other layers that draw from torch's global generator
    torch.manual_seed(stream_seed(run.seed, Stream.TRAIN, round_idx, client))
    batches = fed.data.train_batches(
        fed.client_indices[client], run.trainer.batch_size, run.trainer.local_epochs, generator
    )

    def on_batch_end(step: int, loss: torch.Tensor) -> None:
        fabric.call("on_train_batch_end", round=round_idx, client=client, step=step, loss=loss)

    loss_sum, steps = train_client(
        fed.working, batches, optimizer, run.algorithm, fabric.autocast, on_batch_end
    )
    fabric.call("on_client_end", round=round_idx, client=client, model=fed.working)
    call_optional(run.algorithm, "client_end", round=round_idx, client=client, model=fed.working)
    if run.algorithm.buffers == "local":
        fed.local_buffers.put(client, dict(fed.working.named_buffers()))
    return loss_sum / max(steps, 1)


def personal_accuracy(fed: Federation, client: int) -> float:
    """The working model's accuracy on `client`'s local test split."""
    return client_accuracy(
        fed.working,
        fed.data,
        fed.client_test_indices[client],
        fed.run.trainer.eval_batch_size,
        fed.fabric.autocast,
    )


def evaluate_round(fed: Federation, plan: RoundPlan, personal: SpreadOverClients) -> dict:
    """Global test metrics, and personalised ones (the clients' local models were scored
    during training; here each client scores the aggregated model it receives)."""
    run = fed.run
    metrics = evaluate_global(
        fed.global_model,
        fed.data,
        fed.rank,
        fed.world_size,
        run.trainer.eval_batch_size,
        fed.fabric.autocast,
    )
    if run.trainer.personal_eval:
        for client in plan.mine:
            fed.load_client_model(client)
            personal.add("acc_global", personal_accuracy(fed, client))
        metrics.update(personal.reduce(fed.comm, "personal"))
    return metrics


def run_round(fed: Federation, round_idx: int) -> dict[str, Any]:
    """One federated round; returns the round's metrics (identical on every rank)."""
    run, fabric = fed.run, fed.fabric
    started = time.perf_counter()
    plan = plan_round(fed, round_idx)
    fed.server.start_round(plan)
    personal = SpreadOverClients(["acc_local", "acc_global"], fabric.device)
    score_local = plan.evaluate and run.trainer.personal_eval

    for client in plan.mine:
        mean_loss = train_one_client(fed, plan, round_idx, client)
        fed.server.send(client, fed.working, float(fed.client_sizes[client]), mean_loss)
        if score_local:
            personal.add("acc_local", personal_accuracy(fed, client))

    step = fed.server.finish(plan)
    round_bytes = step.round_bytes
    fed.comm_bytes += round_bytes
    fabric.call(
        "on_aggregate_end", round=round_idx, global_model=fed.global_model, clients=plan.clients
    )

    metrics: dict[str, Any] = {
        "round": round_idx,
        "train/loss": step.train_loss,
        "clients": len(plan.clients),
        "comm/bytes": fed.comm_bytes,
        "comm/round_bytes": round_bytes,
    }
    if plan.evaluate:
        metrics.update(evaluate_round(fed, plan, personal))
        fabric.call("on_evaluate_end", round=round_idx, metrics=metrics)
    metrics["time/round_seconds"] = time.perf_counter() - started
    fabric.call("on_round_end", round=round_idx, metrics=metrics)
    return metrics


def checkpoint_state(fed: Federation, round_idx: int) -> dict[str, Any]:
    return {
        "format": "fedlit",
        "round": round_idx,
        "seed": fed.run.seed,
        "model": fed.global_model.state_dict(),
        "metrics": fed.history,
        "config": fed.run.config_yaml,
    }


def summarize(fed: Federation, wall_seconds: float) -> dict[str, Any]:
    evaluated = [m for m in fed.history if "test/acc" in m]
    best = max(evaluated, key=lambda m: m["test/acc"])
    final = evaluated[-1]
    summary = {
        "best_test_acc": best["test/acc"],
        "best_round": best["round"],
        "final_test_acc": final["test/acc"],
        "final_test_loss": final["test/loss"],
        "rounds": fed.history[-1]["round"],
        "wall_seconds": wall_seconds,
        "comm_bytes": fed.comm_bytes,
        "world_size": fed.world_size,
    }
    for key in ("personal/acc_local", "personal/acc_global"):
        if key in final:
            summary[f"final_{key.replace('/', '_')}"] = final[key]
    return summary


def describe(fed: Federation) -> str:
    run = fed.run
    n_params = sum(p.numel() for p in fed.global_model.parameters())
    return (
        f"[bold]fedlit[/bold] {type(run.algorithm).__name__} | data {run.data.dataset} "
        f"({fed.data.num_train} train / {fed.data.num_test} test, {fed.data.num_classes} classes) | "
        f"{run.data.num_clients} clients, {fed.per_round} per round, partition {run.data.partition} | "
        f"model {type(fed.global_model).__name__} ({n_params:,} parameters, {len(fed.layers)} layers) | "
        f"{fed.world_size} rank(s) on {fed.fabric.device.type}, "
        f"up to {-(-fed.per_round // fed.world_size)} clients per rank per round"
    )


def prepare(run: RunConfig) -> Federation:
    """Check the settings, start the ranks and build every rank's state; no training yet.

    Everything that can be wrong with a config (keys, values, data files, an impossible
    partition, a broken layer map) fails here, before the first round.
    """
    check_before_launch(run)
    loaded = load(run)
    fabric = make_fabric(run)
    fabric.launch()
    return setup(run, fabric, loaded)


def train(fed: Federation) -> dict[str, Any] | None:
    """Run the rounds; returns the summary on rank 0 (None on other ranks)."""
    run, fabric = fed.run, fed.fabric
    is_main = fabric.global_rank == 0
    files = RunFiles(run.run_dir) if is_main else None
    if files is not None:
        files.write_config(run.config_yaml)
    fabric.call(
        "on_fit_start", fabric=fabric, model=fed.global_model, layers=fed.layers, federation=fed
    )

    started = time.perf_counter()
    report = ConsoleReport(
        enabled=is_main and not run.logger.quiet, total_rounds=run.trainer.rounds
    )
    report.print(describe(fed))
    checkpoint_path = run.run_dir / "checkpoints" / "last.ckpt"
    with report:
        for round_idx in range(1, run.trainer.rounds + 1):
            metrics = run_round(fed, round_idx)
            fed.history.append(metrics)
            if files is not None and "test/acc" in metrics:
                files.append_metrics(metrics)
            report.round_done(metrics)
            every = run.trainer.checkpoint_every
            if is_main and every and round_idx % every == 0 and round_idx < run.trainer.rounds:
                save_checkpoint(checkpoint_path, checkpoint_state(fed, round_idx))
    wall = time.perf_counter() - started

    summary = summarize(fed, wall)
    if files is not None:
        save_checkpoint(checkpoint_path, checkpoint_state(fed, run.trainer.rounds))
        files.write_summary(summary)
        plot_curves([m for m in fed.history if "test/acc" in m], run.run_dir / "plots")
    report.summary(summary)
    fabric.call("on_fit_end", summary=summary)
    leave_process_group(fabric)
    return summary if is_main else None


def leave_process_group(fabric: Fabric) -> None:
    """Ranks leave the process group together once the run is done.

    A gloo group still alive at interpreter exit can abort the process in C++ ("terminate called
    without an active exception"), which torchrun reports as a failed rank; Fabric does not
    destroy the group it set up, so the engine does.
    """
    if dist.is_available() and dist.is_initialized():
        fabric.barrier()
        dist.destroy_process_group()


def fit(run: RunConfig) -> dict[str, Any] | None:
    """prepare + train: the whole job, for use from Python."""
    return train(prepare(run))
