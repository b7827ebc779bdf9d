"""The round loop: sample, dispatch, train locally, reduce, evaluate.

One round, as data flow:
1. every rank draws the same client sample from the (seed, round) stream and asks the callbacks
   which layers train (`plan_round`);
2. each rank runs the sampled clients it owns (client % world_size), one after another, on one
   working model that the server step loads with what each client receives (`train_one_client`);
3. the server step reduces what the clients sent in one collective (FedAvg: one all-reduce of
   w_k * theta_k; FedMR: one all-to-all) and leaves the new global model on every rank; every
   rank also accounts for the round's bytes and FLOPs from the plan alone (fedlit.costs);
4. evaluation runs on its schedule (fedlit.evaluation, fedlit.eval_bn), and rank 0's observers
   (fedlit.observers) write, print and log the round.

Hooks, in call order (fedlit.hooks: plain objects, each method gets the arguments it names):
check_layers(layers) (before any rank starts), on_fit_start(context), on_round_start(round,
clients), select_layers(round, layers) -> names or None (a pure function of the round: also
asked for every round at the start to show the schedule), on_client_receive(round, client, model)
(the model `client` receives after round `round`'s aggregation: at the start of round + 1's
training and for round `round`'s personalised evaluation), on_client_start(round, client, model),
on_train_batch_end(round, client, step, loss), on_client_end(round, client, model),
on_aggregate_end(round, global_model, clients), on_evaluate_end(round, metrics),
on_round_end(round, metrics), on_fit_end(summary), and on rank 0 with figures on:
draw(plots_dir). The algorithm's hooks are listed in fedlit.algorithms.base; callbacks and
algorithms read the run through fedlit.context.Context only.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

from fedlit.algorithms.base import ServerStep, Upload
from fedlit.algorithms.fedavg import AverageServer
from fedlit.checks import check_before_launch
from fedlit.clients import Stream, clients_per_round, owned_clients, sample_clients, stream_seed
from fedlit.comm import Communicator, copy_into, named_tensors
from fedlit.config import RunConfig
from fedlit.context import Context, RoundPlan
from fedlit.costs import CostTracker
from fedlit.data.datasets import DataBundle, load_dataset
from fedlit.data.device import DeviceData, train_steps
from fedlit.data.partition import Partition, make_partition
from fedlit.divergence import NO_CLIENT, check_finite
from fedlit.eval_bn import EvalModels
from fedlit.evaluation import (
    SpreadOverClients,
    client_accuracy,
    final_client_accuracy,
)
from fedlit.faults import inject_fault
from fedlit.hooks import call, call_all, defines
from fedlit.kinds import check_built_model
from fedlit.launch import is_first_process, launch, launch_settings, leave_process_group
from fedlit.local import freeze_inactive, seed_device_generator, train_client
from fedlit.local_tensors import local_classes, local_tensor_names
from fedlit.models.layers import Layer, check_layer_map, layer_map_of
from fedlit.observers import dashboard_id, make_observers
from fedlit.optim import make_optimizer
from fedlit.persist import checkpoints, kept, resume_state, save_round_checkpoint, tell_observers
from fedlit.protocols import parse_protocols
from fedlit.resume import check_fits
from fedlit.rundir import claim_run_dir, release_run_dir
from fedlit.schedule import layers_of_round
from fedlit.state import ClientState
from fedlit.summary import summarize
from fedlit.threads import set_cpu_threads


@dataclass
class Federation:
    """One rank's state during a run; methods and callbacks see its `context` only."""

    run: RunConfig
    fabric: Fabric
    context: Context
    working: nn.Module  # the model clients train on, reloaded for each
    local_names: set[str]  # the tensors the algorithm keeps on the clients
    eval_models: EvalModels
    server: ServerStep | None = None
    costs: CostTracker | None = None  # bytes and FLOPs, identical on every rank
    history: list[dict[str, Any]] = field(default_factory=list)
    # (round, path) of the checkpoint a run stopping now would resume from (fedlit.persist)
    last_checkpoint: tuple[int, Path] | None = None

    @property
    def global_model(self) -> nn.Module:
        return self.context.global_model

    @property
    def comm(self) -> Communicator:
        return self.context.comm

    @property
    def local(self):
        """Each client's local tensors (algorithm.local), kept on its rank."""
        return self.context.state.store("local")

    def load_client_model(self, client: int, into: nn.Module | None = None) -> nn.Module:
        """`into` (default: the working model) := the global weights, with the client's own
        local tensors (its BN statistics, ...: algorithm.local) once it has trained: the model
        `client` receives."""
        model = self.working if into is None else into
        copy_into(list(model.parameters()), list(self.global_model.parameters()))
        copy_into(list(model.buffers()), list(self.global_model.buffers()))
        own = self.local.get(client) if self.local_names else None
        if own is not None:
            copy_into(named_tensors(model, list(own)), list(own.values()))
        return model


# ---- set-up -------------------------------------------------------------------------------


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
    set_cpu_threads(run.trainer.cpu_threads, local_ranks)
    bundle = load_dataset(run.data)
    partition = make_partition(run.data, bundle, run.seed)
    torch.manual_seed(stream_seed(run.seed, Stream.INIT))
    model = run.model(bundle.num_classes, tuple(bundle.input_shape))
    model = call(run.algorithm, "build_model", model=model) or model
    check_built_model(model, getattr(run.model, "class_path", type(model).__name__))
    layers = layer_map_of(model)
    check_layer_map(model, layers)
    # e.g. a schedule naming layers the model does not have
    call_all(run.callbacks, "check_layers", layers=layers)
    if run.resume is not None:  # --resume_force lets the config differ, never the model
        check_fits(run.resume, run.resume_path, model, run.callbacks)
    return Loaded(bundle, partition, model, layers)


def setup(run: RunConfig, fabric: Fabric, loaded: Loaded) -> Federation:
    """Move the loaded state to this rank's device; build its context, server and accounting."""
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

    fed: Federation | None = None
    context = Context(
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        device=device,
        seed=run.seed,
        run_dir=run.run_dir,
        trainer=run.trainer,
        plots=run.logger.plots,
        num_clients=run.data.num_clients,
        per_round=clients_per_round(
            run.data.num_clients, run.trainer.clients_per_round, run.trainer.client_fraction
        ),
        global_model=global_model,
        layers=loaded.layers,
        data=data,
        client_indices=on_device(partition.train),
        client_test_indices=on_device(partition.test) if partition.test is not None else None,
        client_sizes=[len(p) for p in partition.train],
        comm=Communicator(fabric.world_size),
        state=ClientState(device),
        autocast=fabric.autocast,
        _receive=lambda client, into: fed.load_client_model(client, into),
    )
    local_names = local_tensor_names(global_model, local_classes(run.algorithm))
    fed = Federation(
        run=run,
        fabric=fabric,
        context=context,
        working=copy.deepcopy(global_model),
        local_names=local_names,
        eval_models=EvalModels(parse_protocols(run.trainer.eval_bn), context, local_names),
    )
    context.state.store("local")
    call(run.algorithm, "setup", context=context)
    if defines(run.algorithm, "make_server"):
        fed.server = call(run.algorithm, "make_server", context=context)
    else:
        fed.server = AverageServer(context, run.algorithm, run.server_optimizer)
    fed.costs = CostTracker.for_run(context, run.algorithm, local_names)
    return fed


def prepare(run: RunConfig) -> Federation:
    """Check the settings, start the ranks and build every rank's state; no training yet.

    Everything that can be wrong with a config (keys, values, data files, an impossible
    partition, a broken layer map, a checkpoint that does not fit) fails here, before the first
    round; only then does rank 0 take the run directory (fedlit.rundir), before any rank starts.
    """
    check_before_launch(run)
    loaded = load(run)
    owner = is_first_process()
    if owner:
        claim_run_dir(run.run_dir)
    try:
        fabric = launch(run)
        return setup(run, fabric, loaded)
    except BaseException:
        if owner:
            release_run_dir(run.run_dir)
        raise


# ---- one round ----------------------------------------------------------------------------


def plan_round(fed: Federation, round_idx: int) -> RoundPlan:
    run, context = fed.run, fed.context
    clients = sample_clients(run.seed, round_idx, run.data.num_clients, context.per_round)
    call_all(run.callbacks, "on_round_start", round=round_idx, clients=clients)
    all_layers = [layer.name for layer in context.layers]
    active = layers_of_round(run.callbacks, all_layers, round_idx)
    params, float_buffers = context.tensor_names(active)
    all_float_buffers = context.tensor_names(all_layers)[1]
    if fed.local_names.intersection(all_float_buffers):
        # Clients keep their BN statistics and never send them, so they are not communication;
        # the global model still needs statistics to be evaluated. Every layer's statistics moved
        # on the clients (the whole network trains in train mode, frozen layers included), so
        # every layer's are averaged, for evaluation only: a partial round that averaged only
        # its own layer's would evaluate the layers above it with statistics of stale inputs.
        float_buffers = all_float_buffers
    # local parameters (algorithm.local: BN affine, biases) stay out of the reduction entirely
    shared = [p for p in params if p not in fed.local_names]
    reduced = shared + float_buffers
    return RoundPlan(
        round=round_idx,
        clients=clients,
        mine=owned_clients(clients, context.rank, context.world_size),
        active=active,
        trainable=set(params),
        reduced=reduced,
        sent=[n for n in reduced if n not in fed.local_names],
        sent_bytes=fed.costs.ledger.bytes_of(active),
        down_bytes=fed.costs.download_bytes(clients),
        evaluate=round_idx % run.trainer.eval_every == 0 or round_idx == run.trainer.rounds,
    )


def train_one_client(
    fed: Federation, plan: RoundPlan, client: int, observers: list[Any] = ()
) -> tuple[torch.Tensor, Upload | None]:
    """Train `client` from the weights it receives; its mean loss (a device tensor) and what
    the algorithm has it upload besides its trained tensors. `observers` see each step."""
    run, context, model = fed.run, fed.context, fed.working
    round_idx, algorithm, callbacks = plan.round, run.algorithm, run.callbacks
    fed.server.receive(client, model)
    freeze_inactive(model, plan.trainable)
    # the model a client trains in round r is what it received after round r - 1's aggregation
    call_all(callbacks, "on_client_receive", round=round_idx - 1, client=client, model=model)
    # The algorithm sees the weights as received (FedProx anchors to them) before callbacks
    # may perturb them (LIPS's sparsity).
    call(
        algorithm,
        "client_start",
        round=round_idx,
        client=client,
        model=model,
        global_model=context.global_model,
    )
    call_all(callbacks, "on_client_start", round=round_idx, client=client, model=model)
    optimizer = make_optimizer(
        run.trainer.optimizer, [p for p in model.parameters() if p.requires_grad]
    )
    generator = context.generator(Stream.TRAIN, round_idx, client)
    # dropout and other layers that draw from torch's global generator
    seed_device_generator(context.device, stream_seed(run.seed, Stream.TRAIN, round_idx, client))
    indices, trainer = context.client_indices[client], run.trainer
    batch, epochs = trainer.batch_size, trainer.local_epochs
    batches = context.data.train_batches(indices, batch, epochs, generator)
    planned = train_steps(len(indices), batch, epochs)  # for the progress of a long client

    def on_batch_end(step: int, loss: torch.Tensor) -> None:
        call_all(
            callbacks, "on_train_batch_end", round=round_idx, client=client, step=step, loss=loss
        )
        call_all(observers, "on_client_step", step=step + 1, steps=planned)

    def before_step() -> None:
        call(
            algorithm,
            "before_step",
            round=round_idx,
            client=client,
            model=model,
            optimizer=optimizer,
        )

    loss_sum, steps = train_client(
        model,
        batches,
        optimizer,
        algorithm,
        context.autocast,
        on_batch_end if callbacks or observers else None,
        before_step if defines(algorithm, "before_step") else None,
    )
    call_all(callbacks, "on_client_end", round=round_idx, client=client, model=model)
    upload = call(
        algorithm,
        "client_end",
        round=round_idx,
        client=client,
        model=model,
        steps=steps,
        optimizer=optimizer,
    )
    if fed.local_names:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        fed.local.put(client, {n: t for n, t in tensors.items() if n in fed.local_names})
    fed.eval_models.client_end(client, model)
    return loss_sum / max(steps, 1), upload


def client_weight(fed: Federation, client: int) -> float:
    """The client's aggregation weight: its training samples, or 1 under uniform weighting."""
    if getattr(fed.run.algorithm, "weighting", "samples") == "uniform":
        return 1.0
    return float(fed.context.client_sizes[client])


def receive_after(fed: Federation, round_idx: int, client: int) -> nn.Module:
    """The working model := what `client` receives after round `round_idx`'s aggregation, as
    training in the next round would start from it (on_client_receive included)."""
    model = fed.load_client_model(client)
    call_all(fed.run.callbacks, "on_client_receive", round=round_idx, client=client, model=model)
    return model


def personal_accuracy(fed: Federation, client: int) -> float:
    """The working model's accuracy on `client`'s local test split."""
    context = fed.context
    return client_accuracy(
        fed.working,
        context.data,
        context.client_test_indices[client],
        fed.run.trainer.eval_batch_size,
        context.autocast,
    )


def evaluate_round(fed: Federation, plan: RoundPlan, personal: SpreadOverClients) -> dict:
    """Global test metrics under every eval_bn protocol, and personalised ones (the clients'
    local models were scored during training; here each client scores the aggregated model it
    receives)."""
    run, context = fed.run, fed.context
    metrics: dict[str, Any] = fed.eval_models.test_metrics(plan.round)
    if run.trainer.personal_eval:
        for client in plan.mine:
            receive_after(fed, plan.round, client)
            personal.add("acc_global", client, personal_accuracy(fed, client))
        metrics.update(personal.reduce(context.comm, "personal"))
    return metrics


def run_round(fed: Federation, round_idx: int, observers: list[Any] = ()) -> dict[str, Any]:
    """One federated round; returns the round's metrics (identical on every rank)."""
    run, context, callbacks = fed.run, fed.context, fed.run.callbacks
    started = time.perf_counter()
    plan = plan_round(fed, round_idx)
    fed.server.start_round(plan)
    personal = SpreadOverClients(["acc_local", "acc_global"], run.data.num_clients, context.device)
    score_local = plan.evaluate and run.trainer.personal_eval

    # the first of this rank's clients whose loss was not finite, kept on the device: one
    # torch.where per client, no host sync; read only when the round diverged
    first_bad = torch.full((), NO_CLIENT, dtype=torch.long, device=context.device)
    call_all(observers, "on_client_done", done=0, total=len(plan.mine))
    for done, client in enumerate(plan.mine, start=1):
        mean_loss, upload = train_one_client(fed, plan, client, observers)
        bad = ~torch.isfinite(mean_loss.detach()) & (first_bad == NO_CLIENT)
        first_bad = torch.where(bad, torch.full_like(first_bad, client), first_bad)
        fed.server.send(client, fed.working, client_weight(fed, client), mean_loss, upload)
        if score_local:
            personal.add("acc_local", client, personal_accuracy(fed, client))
        call_all(observers, "on_client_done", done=done, total=len(plan.mine))

    step = fed.server.finish(plan)
    check_finite(
        context, round_idx, step.train_loss, first_bad, checkpoints(run, round_idx), kept(fed)
    )
    costs = fed.costs.record(round_idx, plan, step)
    call_all(
        callbacks,
        "on_aggregate_end",
        round=round_idx,
        global_model=context.global_model,
        clients=plan.clients,
    )
    metrics: dict[str, Any] = {
        "round": round_idx,
        "train/loss": step.train_loss,
        "clients": len(plan.clients),
        **costs,
        **step.metrics,
    }
    if plan.evaluate:
        call_all(observers, "on_phase", label=f"evaluation of round {round_idx}")
        metrics.update(evaluate_round(fed, plan, personal))
        call_all(callbacks, "on_evaluate_end", round=round_idx, metrics=metrics)
    metrics["time/round_seconds"] = time.perf_counter() - started
    call_all(callbacks, "on_round_end", round=round_idx, metrics=metrics)
    return metrics


# ---- the run ------------------------------------------------------------------------------


def train(fed: Federation) -> dict[str, Any] | None:
    """Run the rounds; returns the summary on rank 0 (None on other ranks).

    Rank 0 alone has observers: it writes files, draws, prints and talks to W&B; other ranks
    never import wandb. Nothing is written into the run directory before a resumed run's state
    is back in place. Rank 0 gives up the run directory at the end, however the run ends.
    """
    try:
        return train_rounds(fed)
    finally:
        release_run_dir(fed.run.run_dir)


def train_rounds(fed: Federation) -> dict[str, Any] | None:
    run, context = fed.run, fed.context
    call_all(run.callbacks, "on_fit_start", context=context)
    first_round = resume_state(fed) if run.resume is not None else 1
    observers = make_observers(run, context, fed.costs.ledger.bytes_of) if context.is_main else []
    try:
        tell_observers(fed, observers, "on_fit_start", history=fed.history)
        fed.costs.wall.start()
        for round_idx in range(first_round, run.trainer.rounds + 1):
            inject_fault(context.rank, round_idx)
            metrics = run_round(fed, round_idx, observers)
            fed.history.append(metrics)
            tell_observers(fed, observers, "on_round_end", metrics=metrics)
            last = round_idx == run.trainer.rounds  # the final checkpoint is written below
            if checkpoints(run, round_idx) and not last:
                save_round_checkpoint(fed, round_idx, dashboard_id(observers))
        summary = summarize(
            fed.history,
            fed.costs.wall.seconds(),
            fed.costs.summary(),
            run.trainer.eval_bn,
            context.world_size,
            fed.costs.wall.segments,
        )
        # a collective: every rank scores its own clients, whether or not it draws
        client_acc = ([], "")
        if run.logger.plots:
            last = fed.history[-1]["round"]
            call_all(observers, "on_phase", label="final evaluation of every client")
            client_acc = final_client_accuracy(context, lambda c: receive_after(fed, last, c))
        save_round_checkpoint(fed, fed.history[-1]["round"], dashboard_id(observers))
        call_all(observers, "on_rounds_end")
        call_all(run.callbacks, "on_fit_end", summary=summary)
        tell_observers(
            fed,
            observers,
            "on_fit_end",
            summary=summary,
            history=fed.history,
            client_accuracy=client_acc,
        )
    except BaseException:
        call_all(observers, "on_abort")
        raise
    leave_process_group(fed.fabric)
    return summary if context.is_main else None


def fit(run: RunConfig) -> dict[str, Any] | None:
    """prepare + train: the whole job, for use from Python."""
    return train(prepare(run))
