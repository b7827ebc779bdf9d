"""The sections of a fedlit config, as the signature of `run_arguments`.

jsonargparse builds the `fit` and `partition` parsers from these type hints and their
docstrings: a wrong key, type or value is refused before anything runs, and `fit --help` shows
each key with its one-line meaning (the `Attributes` of the section classes). The section types
are torch classes (a model is an `nn.Module`, an optimizer a `torch.optim.Optimizer`), so this
module imports torch; `fedlit.cli` imports it only when a run parser is built.
"""

from __future__ import annotations

from jsonargparse import ArgumentParser, lazy_instance
from torch import nn

from fedlit.algorithms import Algorithm, FedAvg
from fedlit.config import LoggerConfig, ModelFactory, TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.models.build import DATA_ARGUMENTS
from fedlit.server import ServerOptimizer


def run_arguments(
    seed: int = 0,
    run_dir: str = "runs/fedlit",
    trainer: TrainerConfig = TrainerConfig(),  # noqa: B008
    data: DataConfig = DataConfig(),  # noqa: B008
    model: ModelFactory | None = None,
    algorithm: Algorithm = lazy_instance(FedAvg),  # noqa: B008
    callbacks: list[object] | None = None,
    server_optimizer: ServerOptimizer | None = None,
    logger: LoggerConfig = LoggerConfig(),  # noqa: B008
) -> None:
    """The sections of a fedlit config.

    Args:
        seed: Seeds every random stream of the run (partition, sampling, batches, init).
        run_dir: Where config.yaml, metrics.jsonl, summary.json, plots/ and checkpoints/ go.
        trainer: Rounds, ranks, sampling, local training and schedules.
        data: Dataset, partition and augmentation.
        model: class_path of any torch.nn.Module (a class, or a function returning one such as
            torchvision.models.resnet18) and its init_args; num_classes and input_shape come
            from the data and are passed when the constructor names them.
        algorithm: class_path of the federated algorithm and its init_args.
        callbacks: Plain objects with hook methods (class_path/init_args each).
        server_optimizer: How the server steps towards the clients' average (fedlit.server:
            ServerSGD with lr and momentum, i.e. FedAvgM; FedAdam, FedYogi, FedAdagrad); null
            takes the average itself (FedAvg).
        logger: Console output, plots and the Weights & Biases run.
    """


MODEL_HELP = (
    "class_path of any torch.nn.Module (or a function returning one) and its init_args; "
    "num_classes and input_shape come from the data. `--model.help CLASS` lists a class's "
    "init_args."
)


def add_run_arguments(parser: ArgumentParser) -> None:
    """Add the sections of `run_arguments` to `parser`; `model` is any nn.Module, whose
    constructor arguments are validated here except the two the data decide, which
    fedlit.models.build passes by name once the data are loaded."""
    parser.add_function_arguments(run_arguments, skip={"model"})
    parser.add_subclass_arguments(
        nn.Module,
        "model",
        skip=set(DATA_ARGUMENTS),
        required=False,
        instantiate=False,
        help=MODEL_HELP,
    )
