"""The round loop: sample, dispatch, train locally, reduce, evaluate, log.

One round, as data flow:
1. every rank draws the same client sample from the (seed, round) stream;
2. each rank runs the sampled clients it owns (client % world_size), one after another, on one
   working model that is reloaded from the global weights for each client;
3. each rank adds n_k * w_k of its clients into one flat buffer, one all-reduce sums the
   buffers, and every rank divides: the new global model is identical on every rank;
   every rank also accounts for the bytes and FLOPs of all sampled clients (fedlit.costs), from
   the plan alone: no collective, no device read;
4. evaluation (global test set sharded over ranks; personalised on clients' local test splits)
   runs on its schedule, rank 0 writes metrics, checkpoints and plots.

Hooks, in call order (callbacks are plain objects; each receives only the arguments its method
names): check_layers(layers) (before any rank starts: reject settings that do not fit the
model's layer map with a ValueError), on_fit_start(fabric, model, layers, federation),
on_round_start(round, clients),
on_client_receive(round, client, model) (the model `client` receives after round `round`'s
aggregation, each time it is made: at the start of round + 1's training, before the algorithm's
client_start, and for the personalised evaluation of round `round`; LIPS's official timing),
select_layers(round, layers) -> names or None (asked, not called: narrows which layers are
trained and communicated; the others are frozen for the round; it must be a pure function of the
round, because the engine also asks it for every round at the start to show the schedule),
on_client_start(round, client, model), on_train_batch_end(round, client, step, loss),
on_client_end(round, client, model), on_aggregate_end(round, global_model, clients),
on_evaluate_end(round, metrics), on_round_end(round, metrics), on_fit_end(summary).

Callbacks may add entries to `metrics` in on_evaluate_end and on_round_end; every rank must
add the same values (reduce per-rank numbers with `federation.comm` first). The algorithm's own
optional hooks are described in fedlit.algorithms.base.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
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
from fedlit.comm import Communicator, copy_into, named_tensors
from fedlit.config import LoggerConfig, TrainerConfig
from fedlit.costs import CostTracker
from fedlit.dashboard import Dashboard, NoDashboard, open_dashboard
from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, load_dataset
from fedlit.data.device import DeviceData
from fedlit.data.partition import Partition, make_partition
from fedlit.data.report import plot_label_heatmap
from fedlit.eval_bn import (
    EvalModels,
    metric_suffix,
    parse_protocols,
    recalibration_batches,
    recalibration_indices,
)
from fedlit.evaluation import SpreadOverClients, client_accuracy, evaluate_global
from fedlit.local import freeze_inactive, train_client
from fedlit.local_tensors import local_classes, local_tensor_names
from fedlit.loggers import ConsoleReport, RunFiles, human_bytes, method_label
from fedlit.models.layers import Layer, check_layer_map
from fedlit.plots import plot_client_accuracy, plot_communication, plot_curves, plot_layer_metrics
from fedlit.resume import (
    checkpoint_state,
    first_nonfinite_layer,
    gather_rank_states,
    restore,
)
from fedlit.schedule import (
    layer_selectors,
    layers_of_round,
    planned_layers,
    schedule_table,
    segments,
    selects_layers,
    write_schedule,
)

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
    resume: dict[str, Any] | None = None  # a checkpoint loaded by fedlit.resume.load_for_resume


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
    """Settings that can be rejected without touching data, before any process starts.

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
    if selects_layers(run.callbacks) and not getattr(run.algorithm, "partial_rounds", True):
        selecting = [type(c).__name__ for c in layer_selectors(run.callbacks)]
        raise ValueError(
            f"{type(run.algorithm).__name__} cannot train only some layers per round, but "
            f"callbacks {selecting} select layers; remove them or use an averaging algorithm "
            "(FedAvg, FedProx, MOON)"
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
    local_buffers: ClientStateStore  # each client's local tensors (algorithm.local), by client
    local_names: set[str]  # names of the tensors the algorithm keeps on the clients
    comm: Communicator
    per_round: int
    eval_models: EvalModels | None = None  # the models the eval_bn protocols test
    server: ServerStep | None = None
    costs: CostTracker | None = None  # bytes and FLOPs, identical on every rank
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def comm_bytes(self) -> int:
        """Bytes clients uploaded and downloaded so far (`comm/bytes`)."""
        return self.costs.comm_bytes

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
        """`into` (default: the working model) := the global weights, with the client's own
        local tensors (its BN statistics, ...: algorithm.local) once it has trained: the model
        `client` receives."""
        model = self.working if into is None else into
        copy_into(list(model.parameters()), list(self.global_model.parameters()))
        copy_into(list(model.buffers()), list(self.global_model.buffers()))
        own = self.local_buffers.get(client) if self.local_names else None
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
    for callback in run.callbacks:  # e.g. a schedule naming layers the model does not have
        call_optional(callback, "check_layers", layers=layers)
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
        mean=run.data.norm_mean,
        std=run.data.norm_std,
    )
    global_model = loaded.model.to(device)
    partition = loaded.partition

    def on_device(parts):
        return [torch.as_tensor(p, dtype=torch.long).to(device) for p in parts]

    local_names = local_tensor_names(global_model, local_classes(run.algorithm))
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
        local_names=local_names,
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
    fed.eval_models = EvalModels(
        parse_protocols(run.trainer.eval_bn),
        global_model,
        local_names,
        fed.comm,
        fed.rank,
        device,
    )
    make_server = getattr(run.algorithm, "make_server", None)
    fed.server = make_server(fed) if make_server is not None else default_server(fed)
    fed.costs = CostTracker.for_federation(fed)
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
    reduced: list[str]  # tensors in the all-reduce: shared trained parameters, float BN buffers
    sent_bytes: int  # bytes one client uploads this round
    down_bytes: int  # bytes the sampled clients download: what changed since each last synced
    evaluate: bool


def plan_round(fed: Federation, round_idx: int) -> RoundPlan:
    run = fed.run
    clients = sample_clients(run.seed, round_idx, run.data.num_clients, fed.per_round)
    fed.fabric.call("on_round_start", round=round_idx, clients=clients)
    all_layers = [layer.name for layer in fed.layers]
    active = layers_of_round(run.callbacks, all_layers, round_idx)
    params, float_buffers = fed.tensor_names(active)
    all_float_buffers = fed.tensor_names(all_layers)[1]
    if fed.local_names.intersection(all_float_buffers):
        # Clients keep their BN statistics and never send them, so they are not communication;
        # the global model still needs statistics to be evaluated. Every layer's statistics moved
        # on the clients (the whole network trains in train mode, frozen layers included), so
        # every layer's are averaged, for evaluation only: a partial round that averaged only
        # its own layer's would evaluate the layers above it with statistics of stale inputs.
        float_buffers = all_float_buffers
    # local parameters (algorithm.local: BN affine, biases) stay out of the reduction entirely
    shared = [p for p in params if p not in fed.local_names]
    return RoundPlan(
        clients=clients,
        mine=owned_clients(clients, fed.rank, fed.world_size),
        active=active,
        trainable=set(params),
        reduced=shared + float_buffers,
        sent_bytes=fed.costs.ledger.bytes_of(active),
        down_bytes=fed.costs.download_bytes(clients),
        evaluate=round_idx % run.trainer.eval_every == 0 or round_idx == run.trainer.rounds,
    )


def seed_device_generator(device: torch.device, seed: int) -> None:
    """Seed the default generator of `device` only.

    torch.manual_seed also seeds every other backend; on a machine where CUDA is never
    initialised it queues that call with a formatted stack trace each time, which costs 0.4 ms
    and grows a list per client per round.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def train_one_client(fed: Federation, plan: RoundPlan, round_idx: int, client: int) -> torch.Tensor:
    """Train `client` from the weights it receives; returns its mean loss (a device tensor)."""
    run, fabric = fed.run, fed.fabric
    fed.server.receive(client, fed.working)
    freeze_inactive(fed.working, plan.trainable)
    # the model a client trains in round r is what it received after round r - 1's aggregation
    fabric.call("on_client_receive", round=round_idx - 1, client=client, model=fed.working)
    # The algorithm sees the weights as received (FedProx anchors to them) before callbacks
    # may perturb them (LIPS's sparsity).
    call_optional(
        run.algorithm,
        "client_start",
        round=round_idx,
        client=client,
        model=fed.working,
        global_model=fed.global_model,
    )
    fabric.call("on_client_start", round=round_idx, client=client, model=fed.working)
    optimizer = make_optimizer(run, [p for p in fed.working.parameters() if p.requires_grad])
    generator = torch_generator(run.seed, Stream.TRAIN, round_idx, client, device=fabric.device)
    # dropout and other layers that draw from torch's global generator
    seed_device_generator(fabric.device, stream_seed(run.seed, Stream.TRAIN, round_idx, client))
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
    if fed.local_names:
        tensors = dict(fed.working.named_parameters()) | dict(fed.working.named_buffers())
        fed.local_buffers.put(client, {n: t for n, t in tensors.items() if n in fed.local_names})
    fed.eval_models.client_end(client, fed.working)
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


def receive_after(fed: Federation, round_idx: int, client: int) -> nn.Module:
    """The working model := what `client` receives after round `round_idx`'s aggregation, as
    training in the next round would start from it (on_client_receive included)."""
    model = fed.load_client_model(client)
    fed.fabric.call("on_client_receive", round=round_idx, client=client, model=model)
    return model


def evaluate_round(
    fed: Federation, plan: RoundPlan, round_idx: int, personal: SpreadOverClients
) -> dict:
    """Global test metrics under every eval_bn protocol, and personalised ones (the clients'
    local models were scored during training; here each client scores the aggregated model it
    receives)."""
    run = fed.run
    batch_size = run.trainer.eval_batch_size

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_global(model, fed.data, fed.comm, fed.rank, batch_size, fed.fabric.autocast)

    def recalibration() -> Iterator[torch.Tensor]:
        indices = recalibration_indices(
            fed.client_indices, run.trainer.eval_bn_samples, run.seed, round_idx, fed.data.device
        )
        return recalibration_batches(fed.data, indices, batch_size)

    metrics: dict[str, Any] = {}
    for position, (protocol, tested) in enumerate(
        fed.eval_models.evaluate_all(evaluate, recalibration)
    ):
        suffix = metric_suffix(position, protocol)
        metrics[f"test/acc{suffix}"] = tested["test/acc"]
        metrics[f"test/loss{suffix}"] = tested["test/loss"]
    if run.trainer.personal_eval:
        for client in plan.mine:
            receive_after(fed, round_idx, client)
            personal.add("acc_global", client, personal_accuracy(fed, client))
        metrics.update(personal.reduce(fed.comm, "personal"))
    return metrics


def run_round(
    fed: Federation, round_idx: int, on_client_done: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """One federated round; returns the round's metrics (identical on every rank).

    `on_client_done(done, total)` is told after each of this rank's clients (progress bars).
    """
    run, fabric = fed.run, fed.fabric
    started = time.perf_counter()
    plan = plan_round(fed, round_idx)
    fed.server.start_round(plan)
    personal = SpreadOverClients(["acc_local", "acc_global"], run.data.num_clients, fabric.device)
    score_local = plan.evaluate and run.trainer.personal_eval

    # the first of this rank's clients whose loss was not finite, kept on the device: one
    # torch.where per client, no host sync; read only when the round diverged
    first_bad = torch.full((), NO_CLIENT, dtype=torch.long, device=fabric.device)
    for done, client in enumerate(plan.mine, start=1):
        mean_loss = train_one_client(fed, plan, round_idx, client)
        bad = ~torch.isfinite(mean_loss.detach()) & (first_bad == NO_CLIENT)
        first_bad = torch.where(bad, torch.full_like(first_bad, client), first_bad)
        fed.server.send(client, fed.working, float(fed.client_sizes[client]), mean_loss)
        if score_local:
            personal.add("acc_local", client, personal_accuracy(fed, client))
        if on_client_done is not None:
            on_client_done(done, len(plan.mine))

    step = fed.server.finish(plan)
    check_finite(fed, round_idx, step.train_loss, first_bad, weights=checkpoints(run, round_idx))
    costs = fed.costs.record(round_idx, plan, step)
    fabric.call(
        "on_aggregate_end", round=round_idx, global_model=fed.global_model, clients=plan.clients
    )

    metrics: dict[str, Any] = {
        "round": round_idx,
        "train/loss": step.train_loss,
        "clients": len(plan.clients),
        **costs,
        **step.metrics,
    }
    if plan.evaluate:
        metrics.update(evaluate_round(fed, plan, round_idx, personal))
        fabric.call("on_evaluate_end", round=round_idx, metrics=metrics)
    metrics["time/round_seconds"] = time.perf_counter() - started
    fabric.call("on_round_end", round=round_idx, metrics=metrics)
    return metrics


NO_CLIENT = 2**62


class DivergenceError(FloatingPointError):
    """Training produced a NaN or inf loss or weight; the last good checkpoint is kept."""


def checkpoints(run: RunConfig, round_idx: int) -> bool:
    """Whether a checkpoint is written after `round_idx` (every checkpoint_every, and the end)."""
    every = run.trainer.checkpoint_every
    return round_idx == run.trainer.rounds or bool(every and round_idx % every == 0)


def check_finite(
    fed: Federation, round_idx: int, train_loss: float, first_bad: torch.Tensor, weights: bool
) -> None:
    """Stop the run when the round's loss, or (when `weights`: before a checkpoint) the
    aggregated model, is not finite.

    The loss is already on the host (no sync); the weights cost one device read, so they are
    checked only before a checkpoint, which therefore never holds a non-finite weight (a
    non-finite weight in between shows as a non-finite loss one round later). Loss and model
    are identical on every rank, so every rank takes the same branch, and the extra all-reduce
    (which client) runs only then.
    """
    finite_loss = bool(np.isfinite(train_loss))
    if finite_loss and not weights:
        return
    layer = first_nonfinite_layer(fed, fed.global_model)
    if layer is None and finite_loss:
        return
    if fed.comm.distributed:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    client = int(first_bad.item())
    who = f"client {client}" if client != NO_CLIENT else "no client had a non-finite loss"
    where = f"first non-finite layer {layer}" if layer else "the weights are finite"
    raise DivergenceError(
        f"training diverged in round {round_idx}: train/loss is {train_loss} ({who}); "
        f"{where} after aggregation. The last good checkpoint is kept; lower the learning rate "
        "or check the data"
    )


def save_round_checkpoint(fed: Federation, round_idx: int, wandb_id: str | None) -> None:
    """Gather every rank's state to rank 0, which writes last.ckpt atomically (a collective)."""
    ranks = gather_rank_states(fed)
    if fed.rank == 0:
        save_checkpoint(
            fed.run.run_dir / "checkpoints" / "last.ckpt",
            checkpoint_state(fed, round_idx, ranks, wandb_id),
        )


def inject_fault(rank: int, round_idx: int) -> None:
    """Test-only: FEDLIT_FAULT="rank:round:marker" makes that rank die at the start of that
    round, once (it creates the marker file; a restarted job that finds it carries on)."""
    spec = os.environ.get("FEDLIT_FAULT")
    if not spec:
        return
    fault_rank, fault_round, marker = spec.split(":", 2)
    if int(fault_rank) == rank and int(fault_round) == round_idx and not Path(marker).exists():
        Path(marker).touch()
        os._exit(1)


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
        **fed.costs.summary(),
        "world_size": fed.world_size,
    }
    for key in ("personal/acc_local", "personal/acc_global"):
        if key in final:
            summary[f"final_{key.replace('/', '_')}"] = final[key]
    protocols = parse_protocols(fed.run.trainer.eval_bn)
    summary["eval_bn"] = protocols[0].name
    for position, protocol in enumerate(protocols[1:], start=1):
        suffix = metric_suffix(position, protocol)
        summary[f"best_test_acc{suffix}"] = max(m[f"test/acc{suffix}"] for m in evaluated)
        summary[f"final_test_acc{suffix}"] = final[f"test/acc{suffix}"]
        summary[f"final_test_loss{suffix}"] = final[f"test/loss{suffix}"]
    return summary


def train_label_counts(fed: Federation) -> np.ndarray:
    """(clients, classes) training-sample counts of the partition, read from the device data."""
    num_classes = fed.data.num_classes
    counts = torch.zeros(len(fed.client_indices), num_classes, dtype=torch.long)
    for client, indices in enumerate(fed.client_indices):
        for _, y in fed.data.eval_batches("train", indices, fed.run.trainer.eval_batch_size):
            counts[client] += torch.bincount(y, minlength=num_classes).cpu()
    return counts.numpy()


def describe(fed: Federation, counts: np.ndarray) -> dict[str, str]:
    """The start-up panel's rows: what runs where, on which split (`counts`: clients x classes)."""
    run, data = fed.run, fed.run.data
    params = list(fed.global_model.parameters())
    n_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    sizes = sorted(fed.client_sizes)
    partition = data.partition + (f"(alpha={data.alpha})" if data.partition == "dirichlet" else "")
    local_test = "" if data.local_test == "none" else f"; local test splits: {data.local_test}"
    world, clients = fed.world_size, run.data.num_clients
    return {
        "algorithm": method_label(yaml.safe_load(run.config_yaml or "") or {}, run.algorithm),
        "dataset": (
            f"{data.dataset}: {fed.data.num_train:,} train / {fed.data.num_test:,} test, "
            f"{fed.data.num_classes} classes, input {'x'.join(map(str, fed.data.input_shape))}"
        ),
        "partition": (
            f"{partition} over {clients} clients: {sizes[0]}-{sizes[-1]} samples per client "
            f"(median {sizes[len(sizes) // 2]}), {(counts > 0).sum(axis=1).mean():.1f} of "
            f"{counts.shape[1]} classes per client on average{local_test}"
        ),
        "model": (
            f"{type(fed.global_model).__name__}: {n_params:,} parameters "
            f"({human_bytes(param_bytes)}), {len(fed.layers)} layers"
        ),
        "ranks": (
            f"{world} on {fed.fabric.device.type}, {-(-clients // world)} clients per rank "
            f"(client c on rank c % {world}), up to {-(-fed.per_round // world)} per round"
        ),
        "rounds": (
            f"{run.trainer.rounds}, {fed.per_round} of {clients} clients each, "
            f"{run.trainer.local_epochs} local epoch(s) of batch {run.trainer.batch_size}"
        ),
        "run_dir": str(run.run_dir),
    }


def prepare(run: RunConfig) -> Federation:
    """Check the settings, start the ranks and build every rank's state; no training yet.

    Everything that can be wrong with a config (keys, values, data files, an impossible
    partition, a broken layer map) fails here, before the first round.
    """
    check_before_launch(run)
    loaded = load(run)
    fabric = make_fabric(run)
    join_restarted_torchrun_group(run)
    fabric.launch()
    return setup(run, fabric, loaded)


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


@torch.no_grad()
def final_client_accuracy(fed: Federation) -> tuple[list[float], str]:
    """Accuracy of the final model each client receives, on its local test split (its training
    data when there is none), and that split's name. Each rank scores the clients it owns;
    one all-reduce of (correct, count) per client gives every rank every client's number."""
    split, parts = "test", fed.client_test_indices
    if parts is None:
        split, parts = "train", fed.client_indices
    n = len(parts)
    scores = torch.zeros(2 * n, dtype=torch.float64, device=fed.fabric.device)
    last_round = fed.history[-1]["round"]
    for client in owned_clients(list(range(n)), fed.rank, fed.world_size):
        model = receive_after(fed, last_round, client)
        model.eval()
        for x, y in fed.data.eval_batches(split, parts[client], fed.run.trainer.eval_batch_size):
            with fed.fabric.autocast():
                logits = model(x)
            scores[client] += (logits.argmax(dim=1) == y).sum()
            scores[n + client] += y.numel()
    fed.comm.all_reduce_sum(scores)
    correct, count = scores[:n].tolist(), scores[n:].tolist()
    return [c / max(k, 1.0) for c, k in zip(correct, count, strict=True)], split


def write_plots(
    fed: Federation, counts: np.ndarray, client_acc: list[float], client_split: str
) -> list[Path]:
    """Every figure of the run into run_dir/plots (rank 0)."""
    plots_dir = fed.run.run_dir / "plots"
    evaluated = [m for m in fed.history if "test/acc" in m]
    classes = [str(c) for c in range(counts.shape[1])]
    return [
        *plot_curves(evaluated, plots_dir),
        plot_client_accuracy(
            evaluated, client_acc, client_split, plots_dir / "client_accuracy.png"
        ),
        plot_communication(fed.history, plots_dir / "communication.png"),
        plot_label_heatmap(counts, classes, plots_dir / "partition.png"),
        *plot_layer_metrics(fed.history, plots_dir),
    ]


def run_rounds(
    fed: Federation,
    report: ConsoleReport,
    files: RunFiles | None,
    dashboard: Dashboard,
    first_round: int = 1,
) -> None:
    """Every round, with the per-round outputs: metrics.jsonl, W&B, progress, checkpoints."""
    run = fed.run
    on_client_done = report.client_done if files is not None else None
    with report:
        for round_idx in range(first_round, run.trainer.rounds + 1):
            inject_fault(fed.rank, round_idx)
            metrics = run_round(fed, round_idx, on_client_done)
            fed.history.append(metrics)
            if files is not None and "test/acc" in metrics:
                files.append_metrics(metrics)
            dashboard.log_round(metrics)
            report.round_done(metrics)
            last = round_idx == run.trainer.rounds  # the final checkpoint is written by train
            if checkpoints(run, round_idx) and not last:
                save_round_checkpoint(fed, round_idx, dashboard.run_id)


def show_schedule(fed: Federation, report: ConsoleReport, files: RunFiles | None) -> None:
    """When a callback narrows the trained layers: the planned schedule as a table on the
    console and round by round in run_dir/schedule.json (rank 0)."""
    run = fed.run
    if files is None or not selects_layers(run.callbacks):
        return
    names = [layer.name for layer in fed.layers]
    plan = planned_layers(run.callbacks, names, run.trainer.rounds)
    write_schedule(plan, run.run_dir / "schedule.json")

    if report.enabled:
        report.print(schedule_table(segments(plan), names, fed.costs.ledger.bytes_of))


def train(fed: Federation) -> dict[str, Any] | None:
    """Run the rounds; returns the summary on rank 0 (None on other ranks).

    Rank 0 alone writes files, draws, prints and talks to W&B; other ranks never import wandb.
    """
    run, fabric = fed.run, fed.fabric
    is_main = fabric.global_rank == 0
    files = RunFiles(run.run_dir) if is_main else None
    if files is not None:
        files.write_config(run.config_yaml)
    fabric.call(
        "on_fit_start", fabric=fabric, model=fed.global_model, layers=fed.layers, federation=fed
    )
    first_round = 1
    if run.resume is not None:
        first_round = restore(fed, run.resume) + 1
        if files is not None:  # rounds after the checkpoint that were lost are not repeated
            for metrics in fed.history:
                if "test/acc" in metrics:
                    files.append_metrics(metrics)
    report = ConsoleReport(
        enabled=is_main and not run.logger.quiet, total_rounds=run.trainer.rounds
    )
    # the partition's label counts feed the start-up panel and the heat map
    needs_counts = is_main and (report.enabled or run.logger.plots)
    counts = train_label_counts(fed) if needs_counts else None
    dashboard: Dashboard = NoDashboard()
    if is_main:
        if report.enabled:
            report.startup(describe(fed, counts), title=f"fedlit fit: {run.run_dir.name}")
        show_schedule(fed, report, files)
        wandb_config = run.logger.wandb
        saved_id = run.resume.get("wandb_id") if run.resume is not None else None
        if saved_id and wandb_config.id is None:  # the resumed run continues its W&B run
            wandb_config = dataclasses.replace(wandb_config, id=saved_id)
        dashboard = open_dashboard(
            wandb_config, run.run_dir, run.config_yaml, run.logger.quiet, report.print
        )
    try:
        started = time.perf_counter()
        run_rounds(fed, report, files, dashboard, first_round)
        summary = summarize(fed, time.perf_counter() - started)
        # a collective: every rank scores its own clients, whether or not it draws
        client_acc, client_split = final_client_accuracy(fed) if run.logger.plots else ([], "")
        save_round_checkpoint(fed, fed.history[-1]["round"], dashboard.run_id)
        if files is not None:
            files.write_summary(summary)
            if run.logger.plots:
                write_plots(fed, counts, client_acc, client_split)
        report.summary(summary)
        # callbacks may draw their own figures here; the dashboard uploads run_dir/plots after
        fabric.call("on_fit_end", summary=summary)
        dashboard.finish(summary, fed.history, run.run_dir / "plots")
    except BaseException:
        dashboard.abort()
        raise
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
