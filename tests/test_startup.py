"""Start-up cost of the command line: help and config printing never import Lightning.

Each case runs in a fresh interpreter (a module imported by an earlier test would hide an
import), and reports which heavy modules the command left in sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

HEAVY = ("lightning", "torch._dynamo", "torchmetrics", "torchvision", "scipy.signal", "matplotlib")
PROBE = (
    "import json, sys\n"
    "from fedlit.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit:\n"
    "    pass\n"
    "heavy = {heavy!r}\n"
    "print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)\n"
)


def heavy_imports(*argv: str, modules: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of `modules` `fedlit ARGV` imports."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=modules), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ("fit", "--help"),
        ("fit", "--config", "configs/quickstart.yaml", "--print_config"),
        ("partition", "--help"),
    ],
    ids=" ".join,
)
def test_run_help_and_print_config_import_no_lightning(argv):
    assert heavy_imports(*argv) == []


@pytest.mark.parametrize("argv", [("--help",), ("compare", "--help")], ids=" ".join)
def test_top_level_and_compare_help_import_not_even_torch(argv):
    assert heavy_imports(*argv, modules=(*HEAVY, "torch")) == []
