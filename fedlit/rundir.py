"""A run directory belongs to one run at a time, and is known to be writable before launch.

Two runs sharing a run_dir would interleave their metrics.jsonl and overwrite each other's
config, summary and checkpoint, so rank 0 holds an exclusive lock on `run_dir/.fedlit.lock`
(`flock`) from just before launch to the end of the run, and a second run is refused with the
first one's pid, host and command. The kernel drops the lock when its process ends, however it
ends (kill -9 included), so there is never a stale lock to clean up by hand, and a run restarted
by torchrun takes it again.

Writability is checked twice: from the path alone (`check_run_dir`, no writes, before any data
is read), and by creating the directory and a probe file in it and in `checkpoints/`
(`claim_run_dir`, once every input is known good). Either way a run never trains for hours to
find out at the end that `checkpoints/` is a file or the disk is read-only.

A process killed while it wrote a checkpoint or a summary leaves a temporary file beside it
(fedlit.checkpoint writes to `.NAME.*.tmp` and renames); `claim_run_dir` removes those, which is
safe then because the lock says no other run is writing.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

LOCK = ".fedlit.lock"
CHECKPOINTS = "checkpoints"
# The files a run writes (fedlit.loggers, fedlit.schedule, fedlit.engine); a directory in the
# place of one would fail the write at the end of the run.
OUTPUT_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "schedule.json")
LAST_CHECKPOINT = f"{CHECKPOINTS}/last.ckpt"
# What fedlit.checkpoint.atomic_write_bytes leaves behind when its process is killed mid-write.
STALE_TEMPORARIES = (
    f"{CHECKPOINTS}/.last.ckpt.*.tmp",
    ".config.yaml.*.tmp",
    ".summary.json.*.tmp",
    ".metrics.jsonl.*.tmp",
)

# run directories this process holds the lock of: resolved path -> open lock file descriptor.
# Re-entrant, so that code preparing a run twice in one process (tests) does not lock itself out.
_HELD: dict[Path, int] = {}


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir_name(run_dir: str) -> None:
    """An empty run_dir would make every output land in the current directory."""
    if not str(run_dir).strip():
        raise ValueError(
            "run_dir must be a non-empty path: the run writes config.yaml, metrics.jsonl, "
            "summary.json and checkpoints/ there (e.g. runs/quickstart)"
        )


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot work, from the path alone (nothing is written):
    a file in its place, a parent that is a file, no write permission or a read-only file
    system, a directory where an output file goes, a file where `checkpoints/` goes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(
            f"run_dir={str(run_dir)!r} is a file; a run writes config.yaml, metrics.jsonl, "
            "summary.json and checkpoints/ into a directory: give a directory path (it is "
            "created when missing)"
        )
    existing = _nearest_existing(run_dir)
    if not existing.is_dir():
        raise ValueError(
            f"run_dir={str(run_dir)!r} cannot be created: {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == run_dir.absolute() else f" ({existing} cannot hold it)"
        raise ValueError(
            f"run_dir={str(run_dir)!r} is not writable{where}: "
            f"{_why_not_writable(existing)}; choose a run_dir this user can write to"
        )
    for name in OUTPUT_FILES:
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise ValueError(
                f"{path} is a directory, where the run writes its {name}: move it away or "
                "choose another run_dir"
            )
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.exists() and not checkpoints.is_dir():
        raise ValueError(
            f"{checkpoints} is a file, where the run writes checkpoints/last.ckpt (at the end of "
            "the run even with trainer.checkpoint_every 0): move it away or choose another "
            "run_dir"
        )
    last = run_dir / LAST_CHECKPOINT
    if last.exists() and not last.is_file():
        raise ValueError(
            f"{last} is a directory, where the run writes its checkpoint: move it away or "
            "choose another run_dir"
        )


def _why_not_writable(path: Path) -> str:
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return f"{path} is on a read-only file system"
    except OSError:
        pass
    return f"{path} does not allow this user to write"


def claim_run_dir(run_dir: Path) -> None:
    """Create `run_dir`, lock it for this run, prove that it and `checkpoints/` take a file,
    and remove the temporary files a killed run left (rank 0 only, just before launch).

    Raises ValueError, naming the directory and the cause, when it is in use by another run
    or cannot be written.
    """
    key = run_dir.resolve()
    if key in _HELD:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"run_dir={str(run_dir)!r} cannot be created: {_cause(error)}; choose a run_dir "
            "this user can write to"
        ) from None
    fd = _lock(run_dir)
    try:
        for directory in (run_dir, run_dir / CHECKPOINTS):
            _probe(directory)
        _remove_stale_temporaries(run_dir)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd


def release_run_dir(run_dir: Path) -> None:
    """Give up the lock (the end of the run; closing the file releases the lock)."""
    fd = _HELD.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def holds(run_dir: Path) -> bool:
    """Whether this process holds the lock of `run_dir`."""
    return run_dir.resolve() in _HELD


def _lock(run_dir: Path) -> int:
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise ValueError(
            f"run_dir={str(run_dir)!r} is not writable: cannot create {path}: {_cause(error)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ValueError(
                f"run_dir={str(run_dir)!r}: cannot lock {path}: {_cause(error)}"
            ) from None
        raise ValueError(
            f"run_dir={str(run_dir)!r} is in use by another fedlit run ({_owner(path)}): two "
            "runs in one directory would interleave metrics.jsonl and overwrite each other's "
            "checkpoint; wait for that run to end, or give this one another run_dir"
        ) from None
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
    return fd


def _owner(path: Path) -> str:
    """The lock holder as 'pid N on HOST since TIME: COMMAND', from the lock file."""
    try:
        owner = json.loads(path.read_text())
        return f"pid {owner['pid']} on {owner['host']} since {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"whoever holds the lock on {path}"


def _probe(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".fedlit-probe.", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as error:
        raise ValueError(
            f"{directory} is not writable ({_cause(error)}): the run could not save its "
            "outputs there; choose another run_dir"
        ) from None


def _remove_stale_temporaries(run_dir: Path) -> None:
    for pattern in STALE_TEMPORARIES:
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)


def _cause(error: OSError) -> str:
    """'No space left on device' rather than '[Errno 28] No space left on device: PATH'."""
    return error.strerror or str(error)
