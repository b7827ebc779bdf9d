"""Checkpoints written atomically: a crash mid-write never leaves a half-written last.ckpt,
and a failed write (disk full, a file system gone read-only) is one line naming the file and the
cause, with the previous file untouched.

torch is imported inside the functions that need it: `atomic_write_bytes` also writes the run's
text files, for code (`fedlit compare`) that never needs torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from fedlit.errors import WriteError


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write.

    torch.save replaces an error of the file it writes with its own ("[enforce fail at
    inline_container.cc] unexpected pos"), which names neither the file nor the cause; the
    recorded error is the real one (ENOSPC, EROFS, EIO, ...).
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def write_error(path: Path, error: OSError, existed: bool) -> WriteError:
    """The one-line report of a failed write of `path`."""
    cause = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            cause += f", {shutil.disk_usage(path.parent).free:,} bytes free"
    kept = f"the previous {path.name} is unchanged" if existed else f"no {path.name} was written"
    return WriteError(f"cannot write {path}: {cause}; {kept}")


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it, then rename over `path`.

    Any OSError on the way (the temporary file, a write, fsync, the rename) becomes a
    WriteError naming `path` and the cause; the temporary file is removed and `path` keeps
    its previous content.
    """
    existed = path.is_file()
    tmp: str | None = None
    recording: _RecordingFile | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run's files from others
        with os.fdopen(fd, "wb") as file:
            recording = _RecordingFile(file)
            write(recording)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = recording.error if recording is not None else None
        if cause is None and isinstance(error, OSError):
            cause = error
        if cause is not None:
            raise write_error(path, cause, existed) from error
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
