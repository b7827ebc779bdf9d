"""What a fit keeps while it runs: checkpoints, the run's files, and a resumed run's state.

Rank 0 alone writes (last.ckpt, config.yaml, metrics.jsonl, summary.json through its observers);
the other ranks wait for the outcome of each write (`fedlit.launch.stop_together`, one small
all-reduce, only with several ranks), so a full disk stops every rank with one message instead
of leaving the others blocked in their next collective. A resumed run's state is put back on
every rank before rank 0's observers open any file, and a state that does not fit stops the run
with the run directory as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from fedlit.checkpoint import save_checkpoint
from fedlit.config import RunConfig
from fedlit.errors import ResumeError
from fedlit.hooks import call_all
from fedlit.launch import stop_together
from fedlit.resume import checkpoint_state, gather_client_states, restore


class Federation(Protocol):
    """What this module reads and sets of fedlit.engine.Federation (a protocol, so that this
    module never imports the engine)."""

    run: RunConfig
    context: Any
    working: nn.Module
    costs: Any
    server: Any
    history: list[dict[str, Any]]
    last_checkpoint: tuple[int, Path] | None

    @property
    def global_model(self) -> nn.Module: ...


def checkpoints(run: RunConfig, round_idx: int) -> bool:
    """Whether a checkpoint is written after `round_idx` (every checkpoint_every, and the end)."""
    every = run.trainer.checkpoint_every
    return round_idx == run.trainer.rounds or bool(every and round_idx % every == 0)


def kept(fed: Federation) -> str:
    """What a run stopping now leaves to resume from, as the divergence message says it."""
    if fed.last_checkpoint is None:
        every = fed.run.trainer.checkpoint_every
        when = "only after the last round" if every == 0 else f"every {every} rounds"
        return (
            f"No checkpoint has been written yet (trainer.checkpoint_every={every} writes one "
            f"{when})"
        )
    round_idx, path = fed.last_checkpoint
    return f"The last good checkpoint, of round {round_idx} ({path}), is kept"


def save_round_checkpoint(fed: Federation, round_idx: int, wandb_id: str | None) -> None:
    """Gather every rank's client state to rank 0, which writes last.ckpt atomically (a
    collective: every rank calls it, and every rank stops when the write fails). What it
    holds: fedlit.resume."""
    clients = gather_client_states(fed.context)
    path = fed.run.run_dir / "checkpoints" / "last.ckpt"
    error = None
    if fed.context.is_main:
        state = checkpoint_state(
            fed.run, round_idx, fed.global_model, fed.history, fed.costs, fed.server,
            clients, fed.context.world_size, wandb_id,
        )  # fmt: skip
        try:
            save_checkpoint(path, state)
        except Exception as failure:  # e.g. the disk is full: a WriteError naming the file
            error = failure
    stop_together(fed.context, error)
    fed.last_checkpoint = (round_idx, path)


def tell_observers(fed: Federation, observers: list[Any], hook: str, **kwargs: Any) -> None:
    """Rank 0's observers handle `hook` (they write the run's files) while the other ranks
    wait for the outcome, so that a failed write stops every rank, not rank 0 alone."""
    error = None
    try:
        call_all(observers, hook, **kwargs)
    except Exception as failure:
        error = failure
    stop_together(fed.context, error)


def resume_state(fed: Federation) -> int:
    """Put the checkpoint back into every rank (its weights, history, costs and each rank's
    share of the client state); returns the first round to run. A state that does not fit
    stops every rank with a ResumeError, before anything is written."""
    run, context = fed.run, fed.context
    error = None
    try:
        models = [fed.global_model, fed.working]
        fed.history = restore(run.resume, run, context, models, fed.costs, fed.server)
    except (KeyError, RuntimeError, TypeError, ValueError) as cause:
        where = run.resume_path or "the checkpoint"
        error = ResumeError(f"{where} cannot be restored into this run: {cause}")
        error.__cause__ = cause
    stop_together(context, error)
    round_idx = int(run.resume["round"])
    fed.last_checkpoint = (round_idx, run.resume_path or Path("the checkpoint"))
    return round_idx + 1
