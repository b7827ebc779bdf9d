"""`fedlit` command line: `fit` trains, `partition` shows how the data is split, `compare`
puts finished runs side by side.

`fit` and `partition` read the same config file, whose sections come from the type hints of
`run_arguments` (jsonargparse): a wrong key, type or value is refused before anything runs.
`compare` reads run directories only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    Namespace,
    lazy_instance,
    set_parsing_settings,
)
from torch import nn

from fedlit.algorithms import Algorithm, FedAvg
from fedlit.config import LoggerConfig, ModelFactory, RunConfig, TrainerConfig
from fedlit.configfile import check_config_files
from fedlit.data.config import DataConfig
from fedlit.divergence import DivergenceError
from fedlit.engine import prepare, train
from fedlit.errors import RunError, StoppedWithAnotherRank
from fedlit.imports import import_path
from fedlit.models.build import DATA_ARGUMENTS, ModelSpec
from fedlit.resume import load_for_resume, resolve_resume
from fedlit.rundir import check_run_dir_name
from fedlit.server import ServerOptimizer

SUBCOMMANDS = {
    "fit": "Run federated training.",
    "partition": "Print the per-client label counts and write a heat-map PNG.",
}
COMPARE_HELP = "Compare runs: a table (method, accuracy, rounds, bytes, time) and one plot."


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


def build_run_parser(description: str = "", resumable: bool = False) -> ArgumentParser:
    """The parser of one subcommand: a config file plus the sections of `run_arguments`
    (and, for `fit`, the resume options, which are not part of the saved config)."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config file.")
    parser.add_function_arguments(run_arguments, skip={"model"})
    # any nn.Module: the constructor's arguments are validated here, except the two the data
    # decide, which fedlit.models.build passes by name once the data are loaded
    parser.add_subclass_arguments(
        nn.Module,
        "model",
        skip=set(DATA_ARGUMENTS),
        required=False,
        instantiate=False,
        help=(
            "class_path of any torch.nn.Module (or a function returning one) and its "
            "init_args; num_classes and input_shape come from the data."
        ),
    )
    if resumable:
        parser.add_argument(
            "--resume",
            type=str | None,
            default=None,
            help="'auto' (run_dir/checkpoints/last.ckpt when it exists, else start afresh) or "
            "the path of a fedlit checkpoint to continue from.",
        )
        parser.add_argument(
            "--resume_force",
            type=bool,
            default=False,
            help="Resume even when the config differs from the checkpoint's.",
        )
    return parser


def build_callback(spec: Any, position: int) -> object:
    """Instantiate one `{class_path, init_args}` entry of `callbacks`, validating its init_args
    against the class's signature (callbacks share no base class, so jsonargparse cannot do
    this from the `list[object]` type of the section)."""
    spec = spec.as_dict() if isinstance(spec, Namespace) else spec
    key = f"callbacks[{position}]"
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            f"{key} must be {{class_path: module.Class, init_args: {{...}}}}, got {spec!r}"
        )
    cls = import_path(spec["class_path"], f"{key}.class_path")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=cls)
    try:
        parsed = parser.parse_object({"callback": spec})
    except Exception as error:  # jsonargparse reports bad init_args as ArgumentError
        raise ValueError(f"{key} ({spec['class_path']}): {error}") from None
    return parser.instantiate(parsed).callback


def build_compare_parser() -> ArgumentParser:
    parser = ArgumentParser(description=COMPARE_HELP)
    parser.add_argument("run_dirs", nargs="+", help="Run directories written by `fedlit fit`.")
    parser.add_argument(
        "--plot",
        type=str | None,
        default=None,
        help="Where to write the accuracy-per-round PNG "
        "(default: compare_accuracy.png next to the first run directory).",
    )
    parser.add_argument(
        "--at_rounds",
        type=list[int] | None,
        default=None,
        help="Also read every run as if it had stopped after each of these rounds, e.g. "
        "[25,50,75] for FedPart's C = 1, 2, 3 cycles: best accuracy up to the round, costs "
        "until then.",
    )
    parser.add_argument(
        "--eval_bn",
        type=str | None,
        default=None,
        help="Compare the accuracy of this BatchNorm evaluation protocol (averaged, client<K>, "
        "recalibrated), which every run must have logged; by default each run's test/acc, "
        "refused when the runs' protocols differ.",
    )
    return parser


def build_parser() -> ArgumentParser:
    # Entries of `callbacks` stay {class_path, init_args} specs; build_callback instantiates them.
    set_parsing_settings(instantiate_subclass_spec_in_any=False)
    parser = ArgumentParser(prog="fedlit", description="Federated learning on Lightning Fabric.")
    subcommands = parser.add_subcommands(dest="command")
    for name, help_text in SUBCOMMANDS.items():
        parser_of = build_run_parser(help_text, resumable=name == "fit")
        subcommands.add_subcommand(name, parser_of, help=help_text)
    subcommands.add_subcommand("compare", build_compare_parser(), help=COMPARE_HELP)
    return parser


RESUME_KEYS = ("resume", "resume_force")


def load_resume(run: RunConfig, resume: str | None, force: bool) -> RunConfig:
    """Attach the checkpoint to resume from (checked against the config), or none."""
    path = resolve_resume(run.run_dir, resume)
    if path is None:
        return run
    run.resume = load_for_resume(path, run.config_yaml, force)
    run.resume_path = path
    return run


def fail(message: str, show: bool = True) -> None:
    """Exit with status 2 and `message` (on one rank only: `show` is False on the others)."""
    if show:
        print(f"fedlit: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def to_run_config(parser: ArgumentParser, cfg: Namespace) -> RunConfig:
    """The parsed config, checked (kinds first: nothing is instantiated before they are
    right) and instantiated."""
    from fedlit.kinds import check_config_kinds  # imports torch: not needed for --help

    command = cfg.command
    section = cfg[command]
    try:
        check_run_dir_name(section.run_dir)
        check_config_kinds(section)
        init = parser.instantiate(cfg)[command]
        callbacks = [build_callback(spec, i) for i, spec in enumerate(init.callbacks or [])]
    except ValueError as error:
        fail(str(error))
    if init.model is None:
        fail("model is required: e.g. model: {class_path: fedlit.models.CNN, init_args: {...}}")
    spec = init.model.as_dict() if isinstance(init.model, Namespace) else dict(init.model)
    model = ModelSpec(spec["class_path"], dict(spec.get("init_args") or {}))
    sections = section.clone()
    for key in RESUME_KEYS:
        sections.pop(key, None)
    config_yaml = build_run_parser().dump(sections)
    try:
        return RunConfig(
            seed=init.seed,
            run_dir=Path(init.run_dir),
            trainer=init.trainer,
            data=init.data,
            model=model,
            algorithm=init.algorithm,
            callbacks=callbacks,
            server_optimizer=init.server_optimizer,
            logger=init.logger,
            config_yaml=config_yaml,
        )
    except ValueError as error:
        fail(str(error))


def partition_report(run: RunConfig) -> Path:
    """Load and split the data exactly as `fit` would, then show and draw the label counts."""
    from rich.console import Console

    from fedlit.data.datasets import load_dataset
    from fedlit.data.partition import label_counts, make_partition
    from fedlit.data.report import label_count_table, plot_label_heatmap

    bundle = load_dataset(run.data)
    partition = make_partition(run.data, bundle, run.seed)
    counts = label_counts(bundle.train.y.numpy(), partition.train, bundle.num_classes)
    Console().print(label_count_table(counts, bundle.classes))
    path = run.run_dir / "plots" / "partition.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_label_heatmap(counts, bundle.classes, path)
    print(f"heat map written to {path}")
    return path


def compare_command(cfg: Namespace) -> Path:
    """Print the comparison table of the run directories and write their accuracy plot."""
    from rich.console import Console

    from fedlit.compare import compare_runs

    plot = Path(cfg.plot) if cfg.plot else None
    table, path = compare_runs([Path(p) for p in cfg.run_dirs], plot, cfg.at_rounds, cfg.eval_bn)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped output would default to 80 columns and fold cells
    console.print(table)
    print(f"accuracy per round written to {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    try:
        check_config_files(sys.argv[1:] if argv is None else argv)
    except ValueError as error:
        fail(str(error))
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.command == "compare":
        try:
            compare_command(cfg.compare)
        except ValueError as error:
            fail(str(error))
        return
    run = to_run_config(parser, cfg)
    if cfg.command == "partition":
        try:
            partition_report(run)
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
        return
    try:
        run = load_resume(run, cfg.fit.resume, cfg.fit.resume_force)
        fed = prepare(run)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    try:
        train(fed)
    except DivergenceError as error:  # every rank diverges alike: rank 0 says it
        fail(str(error), show=fed.context.is_main)
    except StoppedWithAnotherRank as error:  # the rank that failed says why
        fail(str(error), show=fed.context.is_main)
    except RunError as error:  # this rank's own failure (rank 0's writes, a restore)
        fail(str(error))


if __name__ == "__main__":
    main()
