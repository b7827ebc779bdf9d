"""Settings refused before any process starts or any data is read, each with a message naming
the setting and what would be valid."""

from __future__ import annotations

from fedlit.clients import clients_per_round
from fedlit.config import RunConfig
from fedlit.hooks import defines
from fedlit.launch import launch_settings
from fedlit.protocols import parse_protocols
from fedlit.schedule import layer_selectors


def check_before_launch(run: RunConfig) -> None:
    """Refuse what can be refused without data or processes.

    More ranks than clients per round is allowed: a rank with no sampled client in a round
    still joins every collective (it adds nothing to the sum), and the sample changes every
    round. More ranks than clients is refused: ranks beyond the last client would own no client
    (client c runs on rank c % world_size) and sit idle in every round.
    """
    clients_per_round(
        run.data.num_clients, run.trainer.clients_per_round, run.trainer.client_fraction
    )
    devices, num_nodes = launch_settings(run.trainer)
    if devices * num_nodes > run.data.num_clients:
        raise ValueError(
            f"{devices * num_nodes} ranks (trainer.devices x trainer.num_nodes, or torchrun's "
            f"world size) for data.num_clients={run.data.num_clients}: ranks beyond the last "
            "client would own no client and idle in every round; use at most "
            f"{run.data.num_clients} ranks"
        )
    selecting = [type(c).__name__ for c in layer_selectors(run.callbacks)]
    if selecting and not getattr(run.algorithm, "partial_rounds", True):
        raise ValueError(
            f"{type(run.algorithm).__name__} cannot train only some layers per round, but "
            f"callbacks {selecting} select layers; remove them or use an averaging algorithm "
            "(FedAvg, FedProx, MOON)"
        )
    if run.server_optimizer is not None and defines(run.algorithm, "make_server"):
        raise ValueError(
            f"server_optimizer steps from the global model towards the clients' average, but "
            f"{type(run.algorithm).__name__} has a server step of its own (no average); remove "
            "server_optimizer or use an averaging algorithm"
        )
    for protocol in parse_protocols(run.trainer.eval_bn):
        if protocol.kind == "client" and protocol.client >= run.data.num_clients:
            raise ValueError(
                f"trainer.eval_bn: {protocol.spec} names a client that does not exist; clients "
                f"are 0..{run.data.num_clients - 1} (data.num_clients={run.data.num_clients})"
            )
    if run.trainer.personal_eval and run.data.local_test == "none":
        raise ValueError(
            "trainer.personal_eval needs per-client test splits: set data.local_test to "
            "'label_mix' (with data.local_test_size) or 'natural'"
        )
