"""Resuming a run: what a checkpoint holds, how every rank's state gets into it and back.

A checkpoint (rank 0 writes it, atomically) holds the global model, the round, the metrics
history, the cost accounting (`fedlit.costs`: which layer changed when, which model each client
holds, the running totals; the same on every rank), the resolved config, the W&B run id, and
- `clients`: every per-client store of fedlit.state (local tensors, the statistics of an
  eval_bn `client:K` protocol, MOON's previous models, SCAFFOLD's control variates, LIPS's
  gradients, FedMR's slots, ...), gathered from every rank into one dict keyed by store and
  client id. Each rank loads the entries of the clients it owns on resume, so a checkpoint
  resumes on any number of ranks and this module names no method.
- `algorithm`, `server`, `callbacks`: the `state_dict()` of each, which must be the same on
  every rank (a server optimizer's moments, LayerInertia's snapshots, the probes' history), saved
  once, from rank 0.

No RNG state is saved, on purpose: every random number of a round comes from a generator
seeded by (seed, stream, round, client) (`fedlit.clients.stream_seed`), and the global torch
generator is reseeded from that stream before each client trains; the only draw from an
unkeyed global generator is the model's initialisation, which a resumed run overwrites with
the checkpoint's weights. Round r therefore draws the same numbers whether or not the run was
restarted before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import yaml

from fedlit.checkpoint import load_checkpoint
from fedlit.state import merge_states

if TYPE_CHECKING:
    from fedlit.config import RunConfig
    from fedlit.context import Context

CHECKPOINT_VERSION = 4
LAST = Path("checkpoints") / "last.ckpt"

# Keys that may change between a checkpoint and its resume: they do not change what a round
# computes. trainer.rounds extends (or shortens) a run; where and how the ranks run, how often
# checkpoints are written, what is logged where and the number of CPU threads do not touch the
# numbers. The number of ranks may change as well: each rank loads the clients it owns.
MAY_CHANGE = (
    "trainer.rounds",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.checkpoint_every",
    "trainer.cpu_threads",
    "run_dir",
    "logger",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of nested dicts (lists are compared as a whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def config_differences(saved_yaml: str, new_yaml: str) -> list[str]:
    """The resolved-config keys whose values differ, ignoring those in MAY_CHANGE."""
    saved = flatten(yaml.safe_load(saved_yaml or "") or {})
    new = flatten(yaml.safe_load(new_yaml or "") or {})
    keys = sorted(set(saved) | set(new))
    return [k for k in keys if not may_change(k) and saved.get(k) != new.get(k)]


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` is run_dir/checkpoints/last.ckpt when it exists
    (else a fresh start), any other value a path that must exist."""
    if resume is None:
        return None
    if resume == "auto":
        path = run_dir / LAST
        return path if path.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ValueError(
            f"--resume {resume}: no such checkpoint file (give a fedlit last.ckpt, or 'auto' to "
            f"resume from {run_dir / LAST} when it exists)"
        )
    return path


def load_for_resume(path: Path, config_yaml: str, force: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint before anything is launched: a fedlit checkpoint of this
    format, with the same config (unless `force`). Any number of ranks may resume it: the
    per-client state is keyed by client id, and each rank loads the clients it owns."""
    state = load_checkpoint(path)
    if state.get("version") != CHECKPOINT_VERSION or "clients" not in state:
        raise ValueError(
            f"{path} is a fedlit checkpoint of format version {state.get('version', 1)}, which "
            f"cannot be resumed: this fedlit resumes version {CHECKPOINT_VERSION} (start afresh)"
        )
    check_complete(state, path)
    differing = config_differences(state["config"], config_yaml)
    if differing and not force:
        raise ValueError(
            f"the config differs from the checkpoint's ({path}) in: {', '.join(differing)}; "
            "restore those values, or pass --resume_force true to resume anyway "
            f"(keys that may change: {', '.join(MAY_CHANGE)})"
        )
    return state


# What a checkpoint of this version holds, with the kind of each entry (None: any value).
ENTRIES: dict[str, type | None] = {
    "round": int,
    "model": dict,
    "metrics": list,
    "costs": dict,
    "config": str,
    "clients": dict,
    "algorithm": None,
    "server": None,
    "callbacks": list,
}


def check_complete(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint that lacks an entry, or holds one of the wrong kind, before the run
    relies on it (a hand-edited or damaged file; a file fedlit wrote is always complete)."""
    for key, kind in ENTRIES.items():
        if key not in state:
            raise ValueError(
                f"{path} is an incomplete fedlit checkpoint: it has no {key!r} entry (a "
                f"checkpoint of version {CHECKPOINT_VERSION} holds {', '.join(ENTRIES)}); give "
                "a last.ckpt written by `fedlit fit`, or start afresh"
            )
        if kind is not None and not isinstance(state[key], kind):
            raise ValueError(
                f"{path} is a damaged fedlit checkpoint: its {key!r} entry is a "
                f"{type(state[key]).__name__}, not a {kind.__name__}; give a last.ckpt written "
                "by `fedlit fit`, or start afresh"
            )
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise ValueError(
            f"{path} is a damaged fedlit checkpoint: its 'model' entry is not a state_dict of "
            "tensors; give a last.ckpt written by `fedlit fit`, or start afresh"
        )


def check_fits(
    state: dict[str, Any], path: Path | None, model: torch.nn.Module, callbacks: list[Any]
) -> None:
    """Refuse, before launch, a checkpoint whose model or callbacks are not this run's: its
    tensors must have the model's names, shapes and dtypes (--resume_force lets the config
    differ, never the model), and it must hold one state per callback."""
    where = path or "the checkpoint"
    saved = state["model"]
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    different = [
        f"{k} {tuple(saved[k].shape)} {saved[k].dtype} vs {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in saved and (saved[k].shape != v.shape or saved[k].dtype != v.dtype)
    ]
    if missing or unexpected or different:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_some(missing)}")
        if unexpected:
            parts.append(f"not in this model: {_some(unexpected)}")
        if different:
            parts.append(f"different shape or dtype (checkpoint vs model): {_some(different)}")
        raise ValueError(
            f"{where} holds another model than this run's {type(model).__name__} "
            f"({'; '.join(parts)}); resume with the model that wrote it (its config is in the "
            "checkpoint; --resume_force lets settings differ, never the model)"
        )
    if len(state["callbacks"]) != len(callbacks):
        raise ValueError(
            f"{where} holds the state of {len(state['callbacks'])} callbacks, this run has "
            f"{len(callbacks)}; resume with the callbacks that wrote it"
        )


def _some(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# ---- the run's state ------------------------------------------------------------------------


def state_of(obj: Any) -> Any:
    """`obj.state_dict()`, or None for an object without state."""
    state_dict = getattr(obj, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def load_state_of(obj: Any, saved: Any, what: str) -> None:
    """`obj.load_state_dict(saved)` when a state was saved for it."""
    if saved is None:
        return
    if not callable(getattr(obj, "load_state_dict", None)):
        raise ValueError(f"the checkpoint has a state of {what} that this run cannot load")
    obj.load_state_dict(saved)


def gather_client_states(context: Context) -> dict[str, Any] | None:
    """Every rank's client stores merged into one, on rank 0 (None elsewhere). A collective:
    every rank calls it."""
    mine = context.state.state_dict()
    if not (dist.is_available() and dist.is_initialized()) or context.world_size == 1:
        return merge_states([mine])
    gathered: list[Any] | None = [None] * context.world_size if context.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return merge_states(gathered) if context.rank == 0 else None


def checkpoint_state(
    run: RunConfig,
    round_idx: int,
    global_model: torch.nn.Module,
    history: list[dict[str, Any]],
    costs: Any,
    server: Any,
    clients: dict[str, Any],
    world_size: int,
    wandb_id: str | None,
) -> dict[str, Any]:
    """What last.ckpt holds (see the module)."""
    return {
        "format": "fedlit",
        "version": CHECKPOINT_VERSION,
        "round": round_idx,
        "seed": run.seed,
        "model": {k: v.detach().cpu() for k, v in global_model.state_dict().items()},
        "metrics": history,
        "comm_bytes": costs.comm_bytes,
        "costs": costs.state_dict(),
        "config": run.config_yaml,
        "wandb_id": wandb_id,
        "world_size": world_size,
        "clients": clients,
        "algorithm": state_of(run.algorithm),
        "server": state_of(server),
        "callbacks": [state_of(c) for c in run.callbacks],
    }


def restore(
    state: dict[str, Any],
    run: RunConfig,
    context: Context,
    models: list[torch.nn.Module],
    costs: Any,
    server: Any,
) -> list[dict[str, Any]]:
    """Put a checkpoint's state back (after set-up and on_fit_start): the global weights into
    `models`, the costs, this rank's clients' state, the algorithm's, the server step's and the
    callbacks'; returns the metric history."""
    for model in models:
        model.load_state_dict(state["model"])
    costs.load_state_dict(state["costs"])
    context.state.load_state_dict(state["clients"], context.owns)
    load_state_of(run.algorithm, state["algorithm"], "the algorithm")
    load_state_of(server, state["server"], "the server step")
    if len(state["callbacks"]) != len(run.callbacks):
        raise ValueError(
            f"the checkpoint has the state of {len(state['callbacks'])} callbacks, the run has "
            f"{len(run.callbacks)}"
        )
    for callback, saved in zip(run.callbacks, state["callbacks"], strict=True):
        load_state_of(callback, saved, type(callback).__name__)
    return [dict(m) for m in state["metrics"]]
