"""Resuming a run: what a checkpoint holds, how every rank's state gets into it and back.

A checkpoint (rank 0 writes it, atomically) holds the global model, the round, the metrics
history, the communication count, the cost accounting (`fedlit.costs`: which layer changed when,
which model each client holds, the running totals; the same on every rank), the resolved
config, the W&B run id and one entry per rank with that rank's per-client state: local BN
statistics (and any other tensor the algorithm keeps local), the statistics an eval_bn
`client:K` protocol evaluates with, the algorithm's state (MOON's previous models), the server step's state (FedMR's
slots) and each callback's state (LIPS's gradients, LayerInertia's snapshots, the probes'
history). Ranks send their entry to rank 0 with one `gather_object` per checkpoint.

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
from fedlit.clients import owner

if TYPE_CHECKING:
    from fedlit.engine import Federation

CHECKPOINT_VERSION = 3
LAST = Path("checkpoints") / "last.ckpt"

# Keys that may change between a checkpoint and its resume: they do not change what a round
# computes. trainer.rounds extends (or shortens) a run; where and how the ranks run, how often
# checkpoints are written, what is logged where and the number of CPU threads do not touch the
# numbers. The number of ranks may change as well: the per-rank state is re-sharded (reshard).
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
    per-client state is re-sharded (`reshard`) when the number differs."""
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
    return state


# ---- one rank's state -----------------------------------------------------------------------


def _state_of(obj: Any) -> Any:
    state_dict = getattr(obj, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def rank_state(fed: Federation) -> dict[str, Any]:
    """This rank's per-client state, as plain CPU tensors, dicts and numbers."""
    return {
        "local_buffers": fed.local_buffers.state_dict(),
        "eval_bn": fed.eval_models.state_dict(),
        "algorithm": _state_of(fed.run.algorithm),
        "server": _state_of(fed.server),
        "callbacks": [_state_of(c) for c in fed.run.callbacks],
    }


def restore_rank_state(fed: Federation, state: dict[str, Any]) -> None:
    """Load `rank_state` back (after setup and on_fit_start)."""
    fed.local_buffers.load_state_dict(state["local_buffers"])
    fed.eval_models.load_state_dict(state.get("eval_bn", {}))
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
        "costs": fed.costs.state_dict(),
        "config": fed.run.config_yaml,
        "wandb_id": wandb_id,
        "world_size": fed.world_size,
        "ranks": ranks,
    }


def restore(fed: Federation, state: dict[str, Any]) -> int:
    """Put a checkpoint's state into this rank's federation; returns the checkpoint's round."""
    ranks = state["ranks"]
    mine = ranks[fed.rank] if len(ranks) == fed.world_size else reshard(fed, ranks)
    fed.global_model.load_state_dict(state["model"])
    fed.working.load_state_dict(state["model"])
    fed.history = [dict(m) for m in state["metrics"]]
    fed.costs.load_state_dict(state["costs"])
    restore_rank_state(fed, mine)
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


# ---- a different number of ranks ------------------------------------------------------------


def _owned(parts: list[dict[Any, Any]], rank: int, world_size: int) -> dict[int, Any]:
    """Client-keyed dicts of every saved rank, merged, keeping the clients `rank` now owns."""
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update({int(c): v for c, v in part.items()})
    return {c: v for c, v in merged.items() if owner(c, world_size) == rank}


def reshard(fed: Federation, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """This rank's state out of a checkpoint written by a different number of ranks.

    Per-client entries (local BN statistics, MOON's previous models and participation counts,
    LIPS's gradients) go to the rank that now owns the client (client c on rank c % world
    size); FedMR's slots go to the owner of the client each slot is for in the saved round.
    State that is identical on every rank (LayerInertia's snapshots, the probes' history,
    MOON's initial model) is taken from rank 0.
    """
    rank, world = fed.rank, fed.world_size
    first = ranks[0]
    state: dict[str, Any] = {
        "local_buffers": _owned([r["local_buffers"] for r in ranks], rank, world),
        "eval_bn": _owned([r.get("eval_bn", {}) for r in ranks], rank, world),
        "algorithm": first["algorithm"],
        "server": first["server"],
        "callbacks": list(first["callbacks"]),
    }
    algorithm = first["algorithm"]
    if algorithm is not None:
        if not {"taken_part", "slots"} <= set(algorithm):
            raise ValueError(
                f"cannot re-shard the state of {type(fed.run.algorithm).__name__} over a "
                "different number of ranks: resume with the number of ranks that wrote it"
            )
        slots = [
            _owned([r["algorithm"]["slots"][i] for r in ranks], rank, world)
            for i in range(len(algorithm["slots"]))
        ]
        taken = _owned([r["algorithm"]["taken_part"] for r in ranks], rank, world)
        state["algorithm"] = {**algorithm, "slots": slots, "taken_part": taken}
    server = first["server"]
    if server is not None:
        if not {"round", "slots"} <= set(server) or not hasattr(fed.server, "held"):
            raise ValueError(
                f"cannot re-shard the state of {type(fed.server).__name__} over a different "
                "number of ranks: resume with the number of ranks that wrote it"
            )
        merged = {int(i): s for r in ranks for i, s in r["server"]["slots"].items()}
        held = set(fed.server.held(int(server["round"])))
        state["server"] = {**server, "slots": {i: s for i, s in merged.items() if i in held}}
    for i, callback_state in enumerate(first["callbacks"]):
        if isinstance(callback_state, dict) and set(callback_state) == {"grads"}:
            grads = _owned([r["callbacks"][i]["grads"] for r in ranks], rank, world)
            state["callbacks"][i] = {"grads": grads}
    return state
