"""Shared fixtures: process-group teardown and running the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

# A fit logs to W&B in a test only when the test asks for it (logger.wandb.mode offline or
# online, which override this); with the default `auto` and no API key every fit would
# otherwise create an offline run under ./wandb.
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _teardown_process_group():
    """A test that initialised torch.distributed must not leak it into the next one."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_cli(*args: str, timeout: float = 240, launcher: list[str] | None = None):
    """Run `python -m fedlit ARGS` (or under `launcher`, e.g. torchrun) from the repo root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = (launcher or [sys.executable, "-m"]) + ["fedlit", *args]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli
