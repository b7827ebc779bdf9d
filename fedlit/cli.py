"""`fedlit` command line: `fit` trains, `partition` shows how the data is split, `compare`
puts finished runs side by side.

`fit` and `partition` read the same config file, whose sections come from the type hints of
`fedlit.arguments.run_arguments` (jsonargparse): a wrong key, type or value is refused before
anything runs. `compare` reads run directories only.

Start-up time is part of the interface: `fedlit --help` imports jsonargparse and nothing of
fedlit's run machinery, a subcommand builds only its own parser, `compare` never imports torch,
and Lightning (with torchmetrics, torchvision and torch._dynamo behind it) is imported only when
`fit` is about to train.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
    set_parsing_settings,
)

from fedlit.configfile import check_config_files
from fedlit.errors import RunError, StoppedWithAnotherRank
from fedlit.rundir import check_run_dir_name

if TYPE_CHECKING:
    from fedlit.config import RunConfig

SUBCOMMANDS = {
    "fit": "Run federated training.",
    "partition": "Print the per-client label counts and write a heat-map PNG.",
    "compare": "Compare runs: a table (method, accuracy, rounds, bytes, time) and plots.",
}
COMPARE_HELP = SUBCOMMANDS["compare"]
# Keys of a subcommand that are not part of the run's saved config.
COMMAND_KEYS = ("resume", "resume_force", "out")
# The keys are listed below the usage, each with its meaning; the usage names only their form.
RUN_USAGE = "%(prog)s [--config FILE] [--print_config] [--SECTION.KEY VALUE ...]"
KNOWN_SUBCLASSES = re.compile(r", known subclasses: [^)]*")


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help without its lists of known subclasses and repeated choices.

    For a class-typed key jsonargparse names every imported subclass: for `model` every
    `torch.nn.Module` subclass of torch and torchvision, some 700 lines that bury the meaning of
    the keys. `--model.help CLASS` shows one class's init_args instead.
    """

    def _get_help_string(self, action: Any) -> str:
        text = KNOWN_SUBCLASSES.sub("", super()._get_help_string(action))
        if str(self._get_type_str(action)).startswith("Literal["):
            text = text.replace("type: %(type)s, ", "")  # the flag shows {auto,cpu,cuda,gpu}
        return text


def build_run_parser(
    description: str = "", resumable: bool = False, previews: bool = False
) -> ArgumentParser:
    """The parser of one subcommand: a config file plus the sections of `run_arguments`
    (and, for `fit`, the resume options; for `partition`, where the heat map goes: neither is
    part of the saved config)."""
    from fedlit.arguments import add_run_arguments  # imports torch: the config's types need it

    parser = ArgumentParser(description=description, formatter_class=HelpFormatter, usage=RUN_USAGE)
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config file.")
    add_run_arguments(parser)
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
    if previews:
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="Where to write the heat-map PNG (default: <run_dir>_partition.png beside the "
            "run directory, never inside a run's own outputs).",
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
    from fedlit.imports import import_path

    cls = import_path(spec["class_path"], f"{key}.class_path")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=cls)
    try:
        parsed = parser.parse_object({"callback": spec})
    except Exception as error:  # jsonargparse reports bad init_args as ArgumentError
        raise ValueError(f"{key} ({spec['class_path']}): {error}") from None
    return parser.instantiate(parsed).callback


def build_compare_parser() -> ArgumentParser:
    parser = ArgumentParser(description=COMPARE_HELP, formatter_class=HelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="Run directories written by `fedlit fit`.")
    parser.add_argument(
        "--plot",
        type=str | None,
        default=None,
        help="Where to write the accuracy-per-round PNG (default: compare_accuracy.png next "
        "to the first run directory); the other figures take its name with a suffix "
        "(_vs_comm, _gradnorm).",
    )
    parser.add_argument(
        "--overwrite",
        type=bool,
        default=False,
        help="Replace figures an earlier compare wrote at the same paths (without it, "
        "existing files are an error naming them).",
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


def build_subcommand(name: str) -> ArgumentParser:
    if name == "compare":
        return build_compare_parser()
    return build_run_parser(
        SUBCOMMANDS[name], resumable=name == "fit", previews=name == "partition"
    )


def build_parser(commands: tuple[str, ...] = tuple(SUBCOMMANDS)) -> ArgumentParser:
    """The `fedlit` parser with the full parsers of `commands`; the other subcommands are named
    (for `fedlit --help` and for errors) but not built, since building `fit`'s imports torch."""
    # Entries of `callbacks` stay {class_path, init_args} specs; build_callback instantiates them.
    set_parsing_settings(instantiate_subclass_spec_in_any=False)
    parser = ArgumentParser(
        prog="fedlit",
        description="Federated learning on Lightning Fabric.",
        formatter_class=HelpFormatter,
    )
    subcommands = parser.add_subcommands(dest="command")
    for name, help_text in SUBCOMMANDS.items():
        if name in commands:
            sub = build_subcommand(name)
        else:
            sub = ArgumentParser(description=help_text, formatter_class=HelpFormatter)
        subcommands.add_subcommand(name, sub, help=help_text)
    return parser


def requested_command(argv: list[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in SUBCOMMANDS else None


def load_resume(run: RunConfig, resume: str | None, force: bool) -> RunConfig:
    """Attach the checkpoint to resume from (checked against the config), or none."""
    from fedlit.resume import load_for_resume, resolve_resume

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
    from fedlit.config import RunConfig
    from fedlit.kinds import check_config_kinds  # imports torch: not needed for --help
    from fedlit.models.build import ModelSpec

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
    for key in COMMAND_KEYS:
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


def partition_path(run_dir: Path, out: str | None) -> Path:
    """Where `fedlit partition` draws: `out`, or `<run_dir>_partition.png` beside the run
    directory, so that a preview never replaces a finished run's plots/partition.png."""
    if out:
        return Path(out)
    return run_dir.parent / f"{run_dir.name}_partition.png"


def partition_report(run: RunConfig, out: str | None = None) -> Path:
    """Load and split the data exactly as `fit` would, then show and draw the label counts."""
    from rich.console import Console

    from fedlit.data.datasets import load_dataset
    from fedlit.data.partition import label_counts, make_partition
    from fedlit.data.report import label_count_table, plot_label_heatmap

    bundle = load_dataset(run.data)
    partition = make_partition(run.data, bundle, run.seed)
    counts = label_counts(bundle.train.y.numpy(), partition.train, bundle.num_classes)
    Console().print(label_count_table(counts, bundle.classes))
    path = partition_path(run.run_dir, out)
    plot_label_heatmap(
        counts,
        bundle.classes,
        path,
        title=f"{run.run_dir.name}: label distribution over {len(counts)} clients",
    )
    print(f"heat map written to {path}")
    return path


def compare_command(cfg: Namespace) -> list[Path]:
    """Print the comparison table of the run directories, then write and name its figures."""
    from fedlit.compare import check_free, draw_comparison, figure_paths, load_runs, print_table

    run_dirs = [Path(p) for p in cfg.run_dirs]
    plot = Path(cfg.plot) if cfg.plot else None
    results = load_runs(run_dirs, protocol=cfg.eval_bn)
    check_free(figure_paths(run_dirs, plot), cfg.overwrite)  # before anything is printed
    print_table(load_runs(run_dirs, cfg.at_rounds, cfg.eval_bn) if cfg.at_rounds else results)
    figures = draw_comparison(results, run_dirs, plot, overwrite=cfg.overwrite)
    for note in figures.notes:
        print(note)
    for what, path in figures.written:
        print(f"{what} written to {path}")
    return [path for _, path in figures.written]


def fit_command(parser: ArgumentParser, cfg: Namespace) -> None:
    run = to_run_config(parser, cfg)
    from fedlit.divergence import DivergenceError
    from fedlit.engine import prepare, train  # Lightning: only when training

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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        check_config_files(argv)
    except ValueError as error:
        fail(str(error))
    command = requested_command(argv)
    parser = build_parser((command,) if command else ())
    cfg = parser.parse_args(argv)
    if cfg.command == "compare":
        try:
            compare_command(cfg.compare)
        except ValueError as error:
            fail(str(error))
        return
    if cfg.command == "partition":
        run = to_run_config(parser, cfg)
        try:
            partition_report(run, cfg.partition.out)
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
        return
    fit_command(parser, cfg)


if __name__ == "__main__":
    main()
