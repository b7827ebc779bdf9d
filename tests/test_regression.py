"""Numbers never move by accident: short digits runs of every method, one CPU thread, one rank,
compared bit for bit with the values recorded in tests/regression_values.json.

Each case is the real `fedlit fit` entry point on a reference config with a few overrides.
What is compared: every round's train/loss, every evaluated round's test/acc and test/loss, and
a SHA-256 of the final global model's tensors. A change that moves any of them is either a bug
or a deliberate change of numbers; for the latter, re-record with

    uv run python tests/test_regression.py --record

and say in the commit which cases moved and why.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

VALUES = Path(__file__).with_name("regression_values.json")
COMMON = [
    "--trainer.devices", "1",
    "--trainer.accelerator", "cpu",
    "--trainer.cpu_threads", "1",
    "--trainer.checkpoint_every", "0",
    "--logger.quiet", "true",
    "--logger.plots", "false",
    "--logger.wandb.mode", "disabled",
]  # fmt: skip

# name -> (config, extra overrides); 3 rounds unless the overrides say otherwise.
CASES: dict[str, tuple[str, list[str]]] = {
    "fedavg_cnn": ("configs/quickstart.yaml", []),
    "fedavg_sampled": ("configs/quickstart.yaml", ["--trainer.clients_per_round", "4"]),
    "fedavg_resnet8_local_bn": (
        "configs/quickstart.yaml",
        [
            "--model", '{"class_path": "fedlit.models.ResNet8"}',
            "--algorithm.init_args.buffers", "local",
            "--trainer.rounds", "2",
        ],
    ),
    "fedavg_resnet8_average_bn": (
        "configs/quickstart.yaml",
        ["--model", '{"class_path": "fedlit.models.ResNet8"}', "--trainer.rounds", "2"],
    ),
    "fedprox_squared": (
        "configs/quickstart.yaml",
        ["--algorithm", '{"class_path": "fedlit.algorithms.FedProx", "init_args": {"mu": 0.1}}'],
    ),
    "fedprox_unsquared": (
        "configs/quickstart.yaml",
        [
            "--algorithm",
            '{"class_path": "fedlit.algorithms.FedProx", '
            '"init_args": {"mu": 0.01, "variant": "unsquared"}}',
        ],
    ),
    "moon_projection": (
        "configs/quickstart.yaml",
        ["--algorithm", '{"class_path": "fedlit.algorithms.MOON", "init_args": {"mu": 1.0}}'],
    ),
    "moon_no_projection": (
        "configs/quickstart.yaml",
        [
            "--algorithm",
            '{"class_path": "fedlit.algorithms.MOON", '
            '"init_args": {"mu": 1.0, "projection": false}}',
        ],
    ),
    "fedmr_layer": ("configs/fedmr_digits.yaml", ["--trainer.rounds", "20"]),
    "fedmr_tensor_two_stage": (
        "configs/fedmr_digits.yaml",
        [
            "--trainer.rounds", "20",
            "--algorithm.init_args.unit", "tensor",
            "--algorithm.init_args.first_stage_rounds", "10",
        ],
    ),
    "fedpart_schedule": ("configs/gradnorm_digits_fedpart.yaml", ["--trainer.rounds", "8"]),
    "lips_sparsity": ("configs/lips_digits_cnn_fedavg_lips.yaml", ["--trainer.rounds", "7"]),
    "probes": ("configs/probes_digits_cnn.yaml", ["--trainer.rounds", "5"]),
}  # fmt: skip


def model_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_case(name: str, run_dir: Path) -> dict:
    """Run one case through the CLI in this process; its numbers as plain JSON values."""
    from fedlit.checkpoint import load_checkpoint
    from fedlit.cli import main
    from fedlit.loggers import read_metrics

    config, overrides = CASES[name]
    rounds = [] if "--trainer.rounds" in overrides else ["--trainer.rounds", "3"]
    main(["fit", "--config", str(ROOT / config), *COMMON, *rounds, *overrides,
          "--run_dir", str(run_dir)])  # fmt: skip
    records = read_metrics(run_dir / "metrics.jsonl")
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return {
        "train_loss": [m["train/loss"] for m in checkpoint["metrics"]],
        "test_acc": [r["test/acc"] for r in records],
        "test_loss": [r["test/loss"] for r in records],
        "model_sha256": model_digest(checkpoint["model"]),
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_numbers_are_unchanged(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' relative paths (data/cache) resolve from the repo
    expected = json.loads(VALUES.read_text())[name]
    assert run_case(name, tmp_path / name) == expected


def record() -> None:
    import tempfile

    values = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES):
            values[name] = run_case(name, Path(tmp) / name)
            print(name, values[name]["test_acc"][-1], values[name]["model_sha256"][:12])
    VALUES.write_text(json.dumps(values, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_regression.py --record")
    record()
