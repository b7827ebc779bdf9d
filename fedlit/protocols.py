"""The names of the evaluation protocols of `trainer.eval_bn` (what they compute: fedlit.eval_bn).

Plain string parsing, importable without torch, so that the config and `fedlit compare` can check
and read protocols cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PROTOCOL_FORMS = "'averaged', 'client:K' (K a client id) or 'recalibrated'"
_CLIENT = re.compile(r"client:(\d+)")


@dataclass(frozen=True)
class Protocol:
    """One way of choosing the global model's BatchNorm statistics for evaluation."""

    kind: str  # "averaged", "client" or "recalibrated"
    client: int | None = None

    @property
    def name(self) -> str:
        """The metric suffix: test/acc@<name>."""
        return f"client{self.client}" if self.kind == "client" else self.kind

    @property
    def spec(self) -> str:
        """As written in the config."""
        return f"client:{self.client}" if self.kind == "client" else self.kind


def parse_protocol(value: object) -> Protocol:
    if value in ("averaged", "recalibrated"):
        return Protocol(str(value))
    match = _CLIENT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"trainer.eval_bn: each entry must be {PROTOCOL_FORMS}, got {value!r}")
    return Protocol("client", int(match.group(1)))


def parse_protocols(values: Sequence[object]) -> list[Protocol]:
    """The protocols of `trainer.eval_bn`, checked: at least one, none twice."""
    if isinstance(values, str) or not values:
        raise ValueError(
            f"trainer.eval_bn must be a non-empty list of {PROTOCOL_FORMS}, got {values!r}"
        )
    protocols = [parse_protocol(v) for v in values]
    names = [p.name for p in protocols]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"trainer.eval_bn lists {repeated} more than once")
    return protocols


def metric_suffix(position: int, protocol: Protocol) -> str:
    """'' for the first protocol (test/acc), '@<name>' for the others."""
    return "" if position == 0 else f"@{protocol.name}"
