"""The one way fedlit calls a hook: by name, passing only the keyword arguments its signature
names.

Algorithms, server steps, callbacks and the rank-0 observers are plain objects without a base
class; a hook is any method with the hook's name. `call` asks one object (queries such as
`select_layers` return an answer), `call_all` tells every object of a list in order (events).
A method that takes `**kwargs` receives everything. Signatures are read once per function.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

_ACCEPTED: dict[Callable[..., Any], frozenset[str] | None] = {}


def _accepted(method: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names `method` takes, or None when it takes **kwargs."""
    function = getattr(method, "__func__", method)
    if function not in _ACCEPTED:
        parameters = inspect.signature(method).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            _ACCEPTED[function] = None
        else:
            _ACCEPTED[function] = frozenset(p.name for p in parameters)
    return _ACCEPTED[function]


def defines(obj: Any, name: str) -> bool:
    """Whether `obj` has a hook called `name`."""
    return callable(getattr(obj, name, None))


def call(obj: Any, name: str, **kwargs: Any) -> Any:
    """`obj.name(**the kwargs it names)`; None when `obj` has no such hook."""
    method = getattr(obj, name, None)
    if not callable(method):
        return None
    accepted = _accepted(method)
    if accepted is None:
        return method(**kwargs)
    return method(**{k: v for k, v in kwargs.items() if k in accepted})


def call_all(objects: Iterable[Any], name: str, **kwargs: Any) -> list[Any]:
    """`call` on every object in order; the answers, None where an object has no such hook."""
    return [call(obj, name, **kwargs) for obj in objects]
