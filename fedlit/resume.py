"""Resuming a run: what a checkpoint holds, how every rank's state gets into it and back.

A checkpoint (rank 0 writes it, atomically) holds the global model, the round, the metrics
history, the communication count, the resolved config, the W&B run id and one entry per rank
with that rank's per-client state: local BN statistics, the algorithm's state (MOON's previous
models), the server step's state (FedMR's slots) and each callback's state (LIPS's gradients,
LayerInertia's snapshots, the probes' history). Ranks send their entry to rank 0 with one
`gather_object` per checkpoint.

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

if TYPE_CHECKING:
    from fedlit.engine import Federation

CHECKPOINT_VERSION = 2
LAST = Path("checkpoints") / "last.ckpt"

# Keys that may change between a checkpoint and its resume: they do not change what a round
# computes. trainer.rounds extends (or shortens) a run; where and how the ranks run, how often
# checkpoints are written, what is logged where and the number of CPU threads do not touch the
# numbers. A different number of ranks is checked separately (the per-rank state must match).
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


def load_for_resume(
    path: Path, config_yaml: str, world_size: int, force: bool = False
) -> dict[str, Any]:
    """Load and check a checkpoint before anything is launched: a fedlit checkpoint of this
    format, with the same config (unless `force`) and the same number of ranks."""
    state = load_checkpoint(path)
    if state.get("version") != CHECKPOINT_VERSION or "ranks" not in state:
        raise ValueError(
            f"{path} is a fedlit checkpoint of format version {state.get('version', 1)}, which "
            f"cannot be resumed: this fedlit resumes version {CHECKPOINT_VERSION} (start afresh)"
        )
    differing = config_differences(state["config"], config_yaml)
    if differing and not force:
        raise ValueError(
            f"the config differs from the checkpoint's ({path}) in: {', '.join(differing)}; "
            "restore those values, or pass --resume_force true to resume anyway "
            f"(keys that may change: {', '.join(MAY_CHANGE)})"
        )
    saved_world = len(state["ranks"])
    if saved_world != world_size:
        raise ValueError(
            f"{path} was written by {saved_world} rank(s) and this run has {world_size}: "
            "per-client state lives on the rank that owns the client, and resuming with a "
            f"different number of ranks is not supported; resume with {saved_world} rank(s)"
        )
    return state


# ---- one rank's state -----------------------------------------------------------------------


def _state_of(obj: Any) -> Any:
    state_dict = getattr(obj, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def rank_state(fed: Federation) -> dict[str, Any]:
    """This rank's per-client state, as plain CPU tensors, dicts and numbers."""
    return {
        "local_buffers": fed.local_buffers.state_dict(),
        "algorithm": _state_of(fed.run.algorithm),
        "server": _state_of(fed.server),
        "callbacks": [_state_of(c) for c in fed.run.callbacks],
    }


def restore_rank_state(fed: Federation, state: dict[str, Any]) -> None:
    """Load `rank_state` back (after setup and on_fit_start)."""
    fed.local_buffers.load_state_dict(state["local_buffers"])
    if state["algorithm"] is not None:
        fed.run.algorithm.load_state_dict(state["algorithm"])
    if state["server"] is not None:
        fed.server.load_state_dict(state["server"])
    saved = state["callbacks"]
    if len(saved) != len(fed.run.callbacks):
        raise ValueError(
            f"the checkpoint has the state of {len(saved)} callbacks, the run has "
            f"{len(fed.run.callbacks)}"
        )
    for callback, callback_state in zip(fed.run.callbacks, saved, strict=True):
        if callback_state is not None:
            callback.load_state_dict(callback_state)


def gather_rank_states(fed: Federation) -> list[dict[str, Any]] | None:
    """Every rank's `rank_state`, on rank 0 (None elsewhere). A collective: all ranks call it."""
    mine = rank_state(fed)
    if not (dist.is_available() and dist.is_initialized()) or fed.world_size == 1:
        return [mine]
    gathered: list[Any] | None = [None] * fed.world_size if fed.rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def checkpoint_state(
    fed: Federation, round_idx: int, ranks: list[dict[str, Any]], wandb_id: str | None
) -> dict[str, Any]:
    return {
        "format": "fedlit",
        "version": CHECKPOINT_VERSION,
        "round": round_idx,
        "seed": fed.run.seed,
        "model": {k: v.detach().cpu() for k, v in fed.global_model.state_dict().items()},
        "metrics": fed.history,
        "comm_bytes": fed.comm_bytes,
        "config": fed.run.config_yaml,
        "wandb_id": wandb_id,
        "world_size": fed.world_size,
        "ranks": ranks,
    }


def restore(fed: Federation, state: dict[str, Any]) -> int:
    """Put a checkpoint's state into this rank's federation; returns the checkpoint's round."""
    if len(state["ranks"]) != fed.world_size:
        raise ValueError(
            f"the checkpoint was written by {len(state['ranks'])} rank(s), this run has "
            f"{fed.world_size}: resume with the same number of ranks"
        )
    fed.global_model.load_state_dict(state["model"])
    fed.working.load_state_dict(state["model"])
    fed.history = [dict(m) for m in state["metrics"]]
    fed.comm_bytes = int(state["comm_bytes"])
    restore_rank_state(fed, state["ranks"][fed.rank])
    return int(state["round"])


def first_nonfinite_layer(fed: Federation, model: torch.nn.Module) -> str | None:
    """The first layer of the layer map with a NaN or inf parameter or float buffer."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    floats = [t for t in tensors.values() if t.is_floating_point()]
    if bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):  # one device read
        return None
    for layer in fed.layers:
        for name in (*layer.params, *layer.buffers):
            t = tensors[name]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{layer.name} ({name})"
    return None
