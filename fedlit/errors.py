"""Errors that end a run with a one-line message instead of a traceback.

Before launch, a bad setting is a `ValueError` naming the setting (fedlit.checks, the config
classes). Once the ranks run, what can still go wrong and is the user's to fix, not a bug, is a
`RunError`: a write that failed (disk full, a file system gone read-only), a checkpoint that
does not fit the run resuming it, or another rank having stopped for one of these reasons. The
command line prints its message (on rank 0 only) and exits with status 2; any other exception
keeps its traceback, because it is a bug.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run stopped for a reason its message explains (no traceback is shown)."""


class WriteError(RunError):
    """A file of the run could not be written; the message names the path and the cause."""


class ResumeError(RunError):
    """A checkpoint could not be put back into the run resuming it."""


class StoppedWithAnotherRank(RunError):
    """Another rank stopped (rank 0 failed to write, or a rank could not restore its state):
    every rank stops with it instead of waiting for it forever. The rank that failed reports
    why; this one stays silent."""
