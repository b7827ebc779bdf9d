"""Real multi-rank runs through the CLI: Fabric's launcher and torchrun, 2 CPU ranks (gloo).

With the same seed, FedAvg must give the same global model whatever the number of ranks and
however they were started: only the floating-point order of the reduction may differ, and with
the default float64 reduction (and the same CPU thread count per rank) not even that shows.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch

from fedlit.checkpoint import load_checkpoint
from fedlit.loggers import read_metrics

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
