"""Resolving the class paths a config names (`model`, `callbacks`, `data.source`).

A config is code: it names classes and functions that fedlit imports and calls. Every import
goes through `import_path`, so that a wrong path is reported the same way, naming the setting.
"""

from __future__ import annotations

import importlib
from typing import Any


def import_path(class_path: str, key: str) -> Any:
    """The object `class_path` ("package.module.Name") names; a ValueError naming `key`."""
    module_name, _, attribute = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{key}: cannot import {class_path!r} ({error})") from None
