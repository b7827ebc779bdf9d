"""Checkpoints written atomically: a crash mid-write never leaves a half-written last.ckpt.

torch is imported inside the functions that need it: `atomic_write_bytes` also writes the run's
text files, for code (`fedlit compare`) that never needs torch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save `state` (tensors, numbers, strings, plain containers) to `path` atomically."""
    import torch

    atomic_write_bytes(Path(path), lambda file: torch.save(state, file))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with safe deserialisation (no arbitrary code from the file); `path` is
    a str or a Path."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # torch's own message advises weights_only=False, which a checkpoint never needs
        raise ValueError(
            f"{path} is not a readable fedlit checkpoint ({type(error).__name__} from "
            "torch.load(weights_only=True)): it is truncated, not a torch file, or holds objects "
            "other than tensors, dicts, lists, strings and numbers; give a last.ckpt written "
            "by `fedlit fit`"
        ) from error
    if not isinstance(state, dict) or state.get("format") != "fedlit":
        raise ValueError(
            f"{path} is not a fedlit checkpoint (no 'format': 'fedlit' entry; e.g. a Lightning "
            "or plain torch.save file); give a last.ckpt written by `fedlit fit`"
        )
    return state
