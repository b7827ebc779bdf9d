"""Seconds per FedAvg round against the limit: a plain PyTorch loop doing the same SGD steps.

One process run measures one case (model, clients, ranks): it builds CIFAR-10-shaped random
data (uint8, 3x32x32, 10 classes; no download) and alternates FedAvg rounds through the real
engine (no evaluation in the timed rounds) with rounds of a plain loop in the same process on
rank 0: one model, one optimizer, the same batches from the same device-side batcher (same batch
size, augmentation and number of steps), with no reloads, no aggregation and no collectives.
The ratio of their medians is fedlit's overhead. Run it as

    python -m benchmarks.round_loop --model resnet8 --clients 10 --ranks 2 --json out.json

(with --ranks 2, Fabric starts the second rank by re-running this command).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fedlit.algorithms import FedAvg
from fedlit.clients import Stream, stream_seed, torch_generator
from fedlit.config import LoggerConfig, RunConfig, TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, Split, channel_stats
from fedlit.data.device import batch_bounds
from fedlit.data.partition import Partition, iid
from fedlit.engine import Loaded, run_round, setup
from fedlit.launch import launch
from fedlit.models import CNN, ResNet8
from fedlit.models.layers import check_layer_map

MODELS = {"cnn": partial(CNN, padding=2), "resnet8": ResNet8}


@dataclass
class Case:
    model: str = "cnn"
    clients: int = 10
    ranks: int = 1
    samples_per_client: int = 128
    batch_size: int = 32
    local_epochs: int = 1
    rounds: int = 5
    warmup: int = 1
    accelerator: str = "cpu"
    precision: str = "32-true"


def cifar_shaped(num_train: int, num_test: int, seed: int = 0) -> DataBundle:
    """Random uint8 images shaped like CIFAR-10; identical on every rank (seeded)."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return Split(x=x, y=torch.randint(0, 10, (n,), generator=generator))

    train, test = split(num_train), split(num_test)
    mean, std = channel_stats(train.x)
    classes = [str(c) for c in range(10)]
    return DataBundle("cifar10-shaped", train, test, 10, classes, mean, std)


def make_run(case: Case) -> RunConfig:
    trainer = TrainerConfig(
        rounds=10**6,  # the timed rounds never reach the final evaluation
        devices=case.ranks,
        accelerator=case.accelerator,
        precision=case.precision,
        local_epochs=case.local_epochs,
        batch_size=case.batch_size,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        eval_every=10**6,
    )
    data = DataConfig(dataset="digits", num_clients=case.clients, crop_padding=4, hflip=True)
    return RunConfig(
        seed=0,
        run_dir=Path("runs/bench"),
        trainer=trainer,
        data=data,
        model=MODELS[case.model],
        algorithm=FedAvg(),
        logger=LoggerConfig(quiet=True),
    )


def load_case(case: Case, run: RunConfig) -> Loaded:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // case.ranks))
    bundle = cifar_shaped(case.clients * case.samples_per_client, 1000)
    rng = np.random.default_rng(0)
    partition = Partition(iid(len(bundle.train.y), case.clients, rng), None)
    torch.manual_seed(stream_seed(run.seed, Stream.INIT))
    model = run.model(10, (3, 32, 32))
    check_layer_map(model, model.layer_map())
    return Loaded(bundle, partition, model, model.layer_map())


class PlainLoop:
    """The limit: the same SGD steps as one round (same model, batches, augmentation and
    device), one model and one optimizer, with nothing federated around them."""

    def __init__(self, fed, case: Case) -> None:
        self.fed, self.case = fed, case
        self.model = copy.deepcopy(fed.global_model).train()
        for param in self.model.parameters():
            param.requires_grad_(True)
        self.optimizer = fed.run.trainer.optimizer(self.model.parameters())

    def round(self, round_idx: int) -> None:
        fed, case, device = self.fed, self.case, self.fed.fabric.device
        for client in range(case.clients):
            generator = torch_generator(0, Stream.TRAIN, round_idx, client, device=device)
            batches = fed.context.data.train_batches(
                fed.context.client_indices[client], case.batch_size, case.local_epochs, generator
            )
            for x, y in batches:
                self.optimizer.zero_grad(set_to_none=True)
                with fed.fabric.autocast():
                    loss = torch.nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
                self.optimizer.step()


def timed(device: torch.device, work) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def time_interleaved(fed, case: Case) -> tuple[list[float], list[float]]:
    """Federated and plain rounds alternate, so drift in the machine's speed hits both alike.

    Federated rounds use every rank; the plain round runs on rank 0 with all the machine's
    threads while the other ranks wait at a barrier.
    """
    device, rank0 = fed.fabric.device, fed.fabric.global_rank == 0
    plain = PlainLoop(fed, case) if rank0 else None
    rank_threads, all_threads = torch.get_num_threads(), os.cpu_count() or 1
    federated_s, plain_s = [], []
    for round_idx in range(1, case.warmup + case.rounds + 1):
        if dist.is_initialized():
            dist.barrier()
        seconds = timed(device, lambda r=round_idx: run_round(fed, r))
        if dist.is_initialized():
            dist.barrier()  # a round ends when its slowest rank is done
            seconds = max_over_ranks(seconds)
        if rank0:
            torch.set_num_threads(all_threads)
            plain_seconds = timed(device, lambda r=round_idx: plain.round(r))
            torch.set_num_threads(rank_threads)
        if round_idx > case.warmup:
            federated_s.append(seconds)
            if rank0:
                plain_s.append(plain_seconds)
    return federated_s, plain_s


def max_over_ranks(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(case: Case) -> dict | None:
    """Run the case; returns its record on rank 0 (None on other ranks)."""
    run = make_run(case)
    loaded = load_case(case, run)
    fabric = launch(run)
    fed = setup(run, fabric, loaded)
    threads_per_rank = torch.get_num_threads()
    federated, plain = time_interleaved(fed, case)
    calls_per_round = fed.comm.calls / (case.warmup + case.rounds)
    bytes_per_round = fed.comm.collective_bytes / (case.warmup + case.rounds)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if fabric.global_rank != 0:
        return None
    batches = len(batch_bounds(case.samples_per_client, case.batch_size))
    steps = case.clients * case.local_epochs * batches
    fed_s, plain_s = statistics.median(federated), statistics.median(plain)
    return {
        **asdict(case),
        "device": str(fabric.device),
        "threads_per_rank": threads_per_rank,
        "sgd_steps_per_round": steps,
        "seconds_per_round": fed_s,
        "samples_per_second": case.clients * case.samples_per_client * case.local_epochs / fed_s,
        "plain_seconds_per_round": plain_s,
        "overhead": fed_s / plain_s - 1.0,
        "collective_calls_per_round": calls_per_round,
        "collective_mb_per_round_per_rank": bytes_per_round / 2**20,
        "peak_memory_mb_rank0": peak_memory_mb(fabric.device),
    }


def parse_args(argv: list[str] | None = None) -> Case:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in asdict(Case()).items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--json", type=Path, default=None, help="append the record here")
    args = parser.parse_args(argv)
    out = args.__dict__.pop("json")
    return Case(**vars(args)), out


def main(argv: list[str] | None = None) -> None:
    case, out = parse_args(argv)
    record = measure(case)
    if record is None:
        return
    line = json.dumps(record)
    print(line)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as file:
            file.write(line + "\n")


if __name__ == "__main__":
    main()
