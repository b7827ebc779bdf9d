"""Small in-process runs for tests: one CPU rank, the bundled digits, tiny models."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlit.algorithms import FedAvg
from fedlit.checkpoint import load_checkpoint
from fedlit.config import LoggerConfig, RunConfig, TrainerConfig, WandbConfig
from fedlit.context import Context
from fedlit.data.config import DataConfig
from fedlit.engine import Federation, prepare
from fedlit.hooks import call_all
from fedlit.models import CNN


def tiny_run(
    run_dir: Path,
    *,
    model: Any,
    algorithm: Any = None,
    callbacks: Iterable[Any] = (),
    data: DataConfig | None = None,
    rounds: int = 3,
    **trainer: Any,
) -> RunConfig:
    """A RunConfig for one CPU rank; `trainer` overrides the trainer settings below."""
    settings = dict(
        rounds=rounds,
        devices=1,
        accelerator="cpu",
        local_epochs=1,
        batch_size=16,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        cpu_threads=1,  # the tests share two cores; oversubscribed threads are far slower
    )
    settings.update(trainer)
    return RunConfig(
        seed=0,
        run_dir=run_dir,
        trainer=TrainerConfig(**settings),
        data=data
        or DataConfig(dataset="digits", num_clients=4, partition="dirichlet", min_samples=20),
        model=model,
        algorithm=algorithm if algorithm is not None else FedAvg(),
        callbacks=list(callbacks),
        logger=LoggerConfig(quiet=True, wandb=WandbConfig(mode="disabled")),
    )


def context_for(model: torch.nn.Module, **fields: Any) -> Context:
    """A Context for unit tests of a method or callback without an engine: one CPU rank,
    `model` as the global model with its layer map, an empty client-state registry; `fields`
    override the rest (`trainer`, `num_clients`, `per_round`, ...)."""
    from contextlib import nullcontext

    from fedlit.comm import Communicator
    from fedlit.state import ClientState

    settings: dict[str, Any] = dict(
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        seed=0,
        run_dir=Path("unused"),
        trainer=TrainerConfig(),
        plots=False,
        num_clients=4,
        per_round=4,
        global_model=model,
        layers=model.layer_map() if hasattr(model, "layer_map") else [],
        data=None,
        client_indices=[],
        client_test_indices=None,
        client_sizes=[],
        comm=Communicator(1),
        state=ClientState(torch.device("cpu")),
        autocast=nullcontext,
        _receive=None,
    )
    settings.update(fields)
    return Context(**settings)


def start(run: RunConfig) -> Federation:
    """prepare + on_fit_start, as `fit` does before its first round."""
    fed = prepare(run)
    call_all(run.callbacks, "on_fit_start", context=fed.context)
    return fed


def free_port() -> int:
    """A TCP port nobody listens on, for a test's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_torchrun_rank(rank: int, port: int, world_size: int = 2) -> None:
    """Set what torchrun would set, so that Fabric joins the group instead of launching."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )


class OnlyLayer:
    """A callback that trains and communicates one layer every round (what FedPart's schedule
    does in a single-layer round)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def select_layers(self) -> list[str]:
        return [self.name]


class GradRecorder:
    """Records which parameters had a gradient after each client's local training."""

    def __init__(self) -> None:
        self.with_grad: list[set[str]] = []

    def on_client_end(self, model: torch.nn.Module) -> None:
        self.with_grad.append({n for n, p in model.named_parameters() if p.grad is not None})


def digits_run(tmp_path: Path, algorithm: Any = None, rounds: int = 2, **trainer: Any) -> RunConfig:
    """A tiny run of the CNN on the digits with plain SGD, for comparing methods."""
    model = partial(CNN, padding=2)
    trainer.setdefault("optimizer", partial(torch.optim.SGD, lr=0.05))
    return tiny_run(
        tmp_path, model=model, algorithm=algorithm or FedAvg(), rounds=rounds, **trainer
    )


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The global model of a finished run's last checkpoint."""
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]


# The spec's ResNet-8 layers (../shared/specs/fedpart.md), in forward order.
RESNET8_LAYERS = [
    "stem",
    "s1.conv1",
    "s1.conv2",
    "s2.conv1",
    "s2.conv2",
    "s2.downsample",
    "s3.conv1",
    "s3.conv2",
    "s3.downsample",
    "fc",
]


def toy_images(
    n_train: int = 96, n_test: int = 32, size: int = 16, classes: int = 4, seed: int = 0
):
    """A data source for `data.dataset: custom`: random RGB images as an (x, y) pair per
    split, the class a function of the mean colour so that a model can learn it."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=generator)
        x = torch.randint(0, 128, (n, 3, size, size), generator=generator, dtype=torch.uint8)
        x[:, 0] += (y * (127 // classes)).to(torch.uint8)[:, None, None]
        return x, y

    return split(n_train), split(n_test)


class ToyDataset(torch.utils.data.Dataset):
    """A torch Dataset of (PIL image, label) items, as torchvision's datasets return them."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 30, size: int = 8) -> None:
        from PIL import Image

        generator = torch.Generator().manual_seed(n)
        pixels = torch.randint(0, 256, (n, size, size, 3), generator=generator, dtype=torch.uint8)
        self.images = [Image.fromarray(p.numpy()) for p in pixels]
        self.labels = [i % 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def toy_dataset_splits():
    """A custom source returning Datasets: a dict with train and test."""
    return {"train": ToyDataset(30), "test": ToyDataset(12)}


class TinyMLP(nn.Module):
    """A user's model: its own argument names, no layer_map(), no features()."""

    def __init__(self, num_classes: int, in_features: int = 64, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def fit_on_two_ranks(config: Path, run_dir: Path, *extra: str) -> None:
    """`fedlit fit --config CONFIG` on 2 CPU ranks started by Fabric, in a subprocess."""
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    command = [sys.executable, "-m", "fedlit", "fit", "--config", str(config)]
    done = subprocess.run(
        [*command, "--run_dir", str(run_dir), "--trainer.devices", "2", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def fit_cases(cases: dict[str, list[str]], out: Path) -> None:
    """`fedlit fit ARGV --run_dir out/NAME` for every case, one after another, in this process."""
    from fedlit.cli import main

    for name, argv in cases.items():
        main(["fit", *argv, "--run_dir", str(out / name)])


def fit_cases_on_two_ranks(cases: dict[str, list[str]], out: Path) -> None:
    """`fit_cases` on 2 CPU ranks started once by torchrun: one start-up (interpreters, torch,
    the rendezvous) for all the cases, which each rank runs one after another."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out.mkdir(parents=True, exist_ok=True)
    listing = out / "cases.json"
    listing.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", __file__, str(listing), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


if __name__ == "__main__":  # a rank of fit_cases_on_two_ranks
    import json
    import sys

    import torch.distributed as dist

    import fedlit.engine

    # one process group for all the cases (Fabric reuses a live one): creating a gloo group
    # again after destroying one can race in its rendezvous
    fedlit.engine.leave_process_group = lambda fabric: fabric.barrier()
    fit_cases(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
    dist.destroy_process_group()


def fail_message(capsys, argv: list[str]) -> str:
    """What `fedlit` prints to stderr when it refuses `argv` (and asserts it exits with 2)."""
    import pytest

    from fedlit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err
