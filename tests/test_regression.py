"""Numbers never move by accident: short digits runs of every method, one CPU thread, one rank,
compared bit for bit with the values recorded in tests/regression_values.json.

Each case is the real `fedlit fit` entry point on a reference config with a few overrides.
What is compared: every round's train/loss, every evaluated round's test/acc and test/loss, and
a SHA-256 of the final global model's tensors. A change that moves any of them is either a bug
or a deliberate change of numbers; for the latter, re-record with

    uv run python tests/test_regression.py --record

and say in the commit which cases moved and why.

Bit-for-bit numbers belong to a CPU as well as to the code: the BLAS and convolution kernels
torch picks differ between CPU generations (AVX2 or AVX-512, the vendor's tuning), and a few
roundings apart the runs drift. The file therefore keeps one set of values per CPU profile
(vendor, family, model, torch's kernel level, torch version). A case passes when its numbers
equal one recorded set; on a CPU that has its own set, anything else fails with the difference;
on a CPU with none, whose numbers match no recorded set, the case is skipped, naming the
profile to record (`--record` adds or replaces the set of the machine it runs on).
"""

from __future__ import annotations

import hashlib
import json
import platform
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


def cpu_profile() -> str:
    """What decides this machine's floating-point results besides the code: the CPU's vendor,
    family and model, the kernel level torch dispatches to, and torch's version."""
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    vendor = fields.get("vendor_id", platform.machine())
    family, model = fields.get("cpu family", "?"), fields.get("model", "?")
    name = fields.get("model name", platform.processor() or "?")
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        f"{vendor} {name}, family {family} model {model}, {capability}, torch {torch.__version__}"
    )


def recorded_profiles() -> list[dict]:
    """[{"cpu": profile, "values": {case: numbers}}], one per CPU profile recorded."""
    return json.loads(VALUES.read_text())["profiles"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_numbers_are_unchanged(name, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs' relative paths (data/cache) resolve from the repo
    got = run_case(name, tmp_path / name)
    profiles = recorded_profiles()
    if any(profile["values"][name] == got for profile in profiles):
        return
    here = cpu_profile()
    own = [profile["values"][name] for profile in profiles if profile["cpu"] == here]
    if not own:
        pytest.skip(
            f"no regression values recorded for this CPU ({here}) and its numbers match none "
            "of the recorded CPUs'; record them with: uv run python tests/test_regression.py "
            "--record"
        )
    assert got == own[0]


def record() -> None:
    """Run every case and store its numbers as this CPU profile's set, keeping the others."""
    import tempfile

    values = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES):
            values[name] = run_case(name, Path(tmp) / name)
            print(name, values[name]["test_acc"][-1], values[name]["model_sha256"][:12])
    here = cpu_profile()
    others = [profile for profile in recorded_profiles() if profile["cpu"] != here]
    profiles = [*others, {"cpu": here, "values": values}]
    VALUES.write_text(json.dumps({"profiles": profiles}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python tests/test_regression.py --record")
    record()
