"""A config file's shape, checked before the parser reads it.

jsonargparse answers an empty file, a YAML list or a scalar with a bare "Unexpected config",
which names neither the file nor what a config is; this says both.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SECTIONS = "seed, run_dir, trainer, data, model, algorithm, callbacks, server_optimizer, logger"


def config_files(argv: list[str]) -> list[str]:
    """The values of every `--config FILE` / `--config=FILE` in `argv`."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def check_config_file(path: str) -> None:
    """A config file is a YAML mapping of sections; a ValueError saying so when it is empty, a
    list or not YAML at all."""
    file = Path(path)
    if not file.is_file():
        return  # the parser reports a missing file (or reads the value as inline YAML)
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"--config {path} is not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path} cannot be read: {error}") from None
    if isinstance(loaded, dict):
        return
    found = "is empty" if loaded is None else f"holds a YAML {type(loaded).__name__}"
    raise ValueError(
        f"--config {path} {found}: a fedlit config is a YAML mapping of sections ({SECTIONS}), "
        "e.g. configs/quickstart.yaml"
    )


def check_config_files(argv: list[str]) -> None:
    """`check_config_file` for every `--config` of a command line."""
    for path in config_files(argv):
        check_config_file(path)
