"""Real multi-rank runs through the CLI: Fabric's launcher and torchrun, 2 CPU ranks (gloo).

With the same seed, FedAvg must give the same global model whatever the number of ranks and
however they were started: only the floating-point order of the reduction may differ, and with
the default float64 reduction (and the same CPU thread count per rank) not even that shows.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from fedlit.checkpoint import load_checkpoint
from fedlit.loggers import read_metrics
from runs import fit_cases, fit_cases_on_two_ranks

pytestmark = pytest.mark.multiprocess

COMMON = [
    "fit",
    "--config",
    "configs/quickstart.yaml",
    "--trainer.rounds",
    "3",
    "--trainer.accelerator",
    "cpu",
    "--trainer.cpu_threads",
    "1",
    "--logger.quiet",
    "true",
]


def fit_with(cli, run_dir: Path, devices: int, launcher=None):
    result = cli(
        *COMMON, "--run_dir", str(run_dir), "--trainer.devices", str(devices), launcher=launcher
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt"), read_metrics(
        run_dir / "metrics.jsonl"
    )


def assert_same_run(a, b):
    (model_a, metrics_a), (model_b, metrics_b) = a, b
    assert model_a["model"].keys() == model_b["model"].keys()
    # n_k * w_k is exact in float64, so the order of the sum does not reach the float32 model
    for key, tensor in model_a["model"].items():
        assert torch.equal(tensor, model_b["model"][key]), key
    assert [m["round"] for m in metrics_a] == [m["round"] for m in metrics_b] == [1, 2, 3]
    for x, y in zip(metrics_a, metrics_b, strict=True):
        assert x["test/acc"] == y["test/acc"]
        assert x["comm/bytes"] == y["comm/bytes"]


def test_one_rank_and_two_ranks_give_the_same_global_model(cli, tmp_path):
    one = fit_with(cli, tmp_path / "one", devices=1)
    two = fit_with(cli, tmp_path / "two", devices=2)
    assert_same_run(one, two)
    # the 2-rank run really ran two ranks and evaluated the personalised splits of all clients
    assert (tmp_path / "two" / "summary.json").exists()
    assert "personal/acc_global" in two[1][-1]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
@pytest.mark.slow  # torchrun's launch also runs in test_resume's torchrun restart test
def test_torchrun_launch_matches_fabric_launch(cli, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launcher = [torchrun, "--standalone", "--nproc_per_node", "2", "-m"]
    # devices in the config says 1: torchrun's environment wins (2 ranks)
    under_torchrun = fit_with(cli, tmp_path / "torchrun", devices=1, launcher=launcher)
    fabric_launch = fit_with(cli, tmp_path / "fabric", devices=2)
    assert_same_run(under_torchrun, fabric_launch)


# ---- metrics.jsonl is the same file on 1 and 2 ranks, for every method ----------------------

QUIET = [
    "--trainer.devices", "1",  # torchrun's environment makes it 2 in fit_cases_on_two_ranks
    "--trainer.accelerator", "cpu",
    "--trainer.cpu_threads", "1",
    "--trainer.checkpoint_every", "0",
    "--logger.quiet", "true",
    "--logger.plots", "false",
    "--logger.wandb.mode", "disabled",
]  # fmt: skip
SHORT = ["--trainer.rounds", "2", "--trainer.local_epochs", "1"]


def case(config: str, *overrides: str) -> list[str]:
    return ["--config", f"configs/{config}", *QUIET, *SHORT, *overrides]


# one of each kind of logged sum: sampled clients, an extra forward pass (MOON), extra uploads
# and downloads (SCAFFOLD), a layer schedule (FedPart)
REPRESENTATIVE = {
    "fedavg_sampled": case("quickstart.yaml", "--trainer.clients_per_round", "4"),
    "moon": case(
        "quickstart.yaml",
        "--algorithm", '{"class_path": "fedlit.algorithms.MOON", "init_args": {"mu": 1.0}}',
    ),
    "scaffold": case("scaffold_synthetic.yaml"),
    "fedpart": case("gradnorm_digits_fedpart.yaml", "--trainer.rounds", "4"),
}  # fmt: skip
EVERY_OTHER = {
    "fedprox": case(
        "quickstart.yaml",
        "--algorithm", '{"class_path": "fedlit.algorithms.FedProx", "init_args": {"mu": 0.1}}',
    ),
    "fedmr": case("fedmr_digits.yaml", "--trainer.rounds", "3"),
    "lips": case("lips_digits_cnn_fedavg_lips.yaml", "--trainer.rounds", "6"),
    "probes": case("probes_digits_cnn.yaml", "--trainer.rounds", "5"),
    "feddyn": case("feddyn_synthetic.yaml"),
    "fednova": case("fednova_synthetic.yaml"),
    "fedadam": case("fedadam_synthetic.yaml"),
    "fedavg_local_bn": case(
        "quickstart.yaml",
        "--model", '{"class_path": "fedlit.models.ResNet8"}',
        "--algorithm.init_args.buffers", "local",
    ),
}  # fmt: skip


def assert_same_metrics_files(cases: dict[str, list[str]], tmp_path: Path, monkeypatch) -> None:
    """Every case's metrics.jsonl, bar the wall-clock times and FedMR's exchange bytes, is the
    same on one rank (in this process) and on two (one torchrun launch for all the cases)."""
    monkeypatch.chdir(ROOT)
    fit_cases(cases, tmp_path / "one")
    fit_cases_on_two_ranks(cases, tmp_path / "two")
    differing = []
    for name in cases:
        one, two = (
            [without_times(line) for line in (tmp_path / ranks / name / "metrics.jsonl").open()]
            for ranks in ("one", "two")
        )
        assert one, name
        if one != two:
            differing.append(name)
    assert differing == []


def comparable(key: str) -> bool:
    """Not a wall-clock time, and not FedMR's exchange bytes (ranks' traffic, by design)."""
    return not (
        key.startswith("time/") or key.endswith("seconds") or key.startswith("fedmr/exchange")
    )


def without_times(line: str) -> str:
    return json.dumps({k: v for k, v in json.loads(line).items() if comparable(k)})


def test_metrics_are_the_same_file_on_one_and_two_ranks(tmp_path, monkeypatch):
    assert_same_metrics_files(REPRESENTATIVE, tmp_path, monkeypatch)


@pytest.mark.slow
def test_metrics_of_every_other_method_are_the_same_file_on_one_and_two_ranks(
    tmp_path, monkeypatch
):
    assert_same_metrics_files(EVERY_OTHER, tmp_path, monkeypatch)
