"""`make results`: every row of docs/results.md has a config, missing rounds are run or resumed,
and the tables read the runs the way the docs say."""

from __future__ import annotations

import json

import pytest
import yaml

from benchmarks import reproduce
from benchmarks.reproduce import PAPERS, Row, mean_pm, run_rows
from callbacks.freezing import FedPartSchedule
from fedlit.cli import build_parser
from fedlit.loggers import RunFiles, read_metrics
from fedlit.schedule import planned_layers

TINY_CONFIG = """seed: 0
run_dir: unused
trainer:
  rounds: 2
  devices: 1
  accelerator: cpu
  cpu_threads: 1
  local_epochs: 1
  batch_size: 32
data:
  dataset: digits
  num_clients: 3
model:
  class_path: fedlit.models.MLP
logger:
  quiet: true
  plots: false
  wandb:
    mode: disabled
"""


@pytest.fixture
def results_dirs(tmp_path, monkeypatch):
    """configs/results, runs/results and docs/results of the module, moved under tmp_path."""
    for name in ("CONFIGS", "RUNS", "FIGURES"):
        path = tmp_path / name.lower()
        path.mkdir()
        monkeypatch.setattr(reproduce, name, path)
    return tmp_path


def test_every_row_has_a_config_that_parses_and_fits_its_rounds():
    parser = build_parser()
    run_dirs = set()
    for paper in PAPERS.values():
        for row in paper.rows:
            assert row.config_path.is_file(), row.config
            cfg = parser.parse_args(["fit", "--config", str(row.config_path)])
            assert row.wanted_rounds() <= cfg.fit.trainer.rounds, row
            assert cfg.fit.run_dir == f"runs/results/{row.config}_s0", row.config
            assert row.run_dir not in run_dirs
            run_dirs.add(row.run_dir)
    fedpart = [row for row in PAPERS["fedpart"].rows]
    assert all(row.wanted_rounds() % reproduce.FEDPART_CYCLE == 0 for row in fedpart)


def test_row_command_seeds_names_and_resumes_only_from_a_checkpoint(results_dirs):
    row = Row("fedpart_cifar10_fedavg_full", seed=1, rounds=25)
    command = row.command()
    assert command[:4] == ["fedlit", "fit", "--config", str(row.config_path)]
    assert command[4:] == [
        "--seed", "1", "--run_dir", str(results_dirs / "runs" / "fedpart_cifar10_fedavg_full_s1"),
        "--trainer.rounds", "25",
    ]  # fmt: skip
    assert row.finished_rounds() == 0
    (row.run_dir / "checkpoints").mkdir(parents=True)
    (row.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert row.command()[-2:] == ["--resume", "auto"]
    assert "--resume" not in row.command(resume=False)


def test_mean_pm_gives_the_mean_and_half_the_range_over_seeds():
    assert mean_pm([0.5, 0.6]) == "55.0 ± 5.0"
    assert mean_pm([0.6193]) == "61.9"
    assert mean_pm([0.3, 0.31, 0.29], scale=1.0, digits=3) == "0.300 ± 0.010"
    assert mean_pm([]) == "-"


def test_run_rows_runs_what_is_missing_skips_what_is_done_and_resumes(results_dirs, capsys):
    (results_dirs / "configs" / "tiny.yaml").write_text(TINY_CONFIG)
    row = Row("tiny", seed=3)
    run_rows([row], jobs=1)
    assert [r["round"] for r in read_metrics(row.run_dir / "metrics.jsonl")] == [1, 2]
    assert yaml.safe_load((row.run_dir / "config.yaml").read_text())["seed"] == 3
    log = row.run_dir.parent / "tiny_s3.log"
    before = log.read_text()

    run_rows([row], jobs=1)  # nothing left to run
    assert log.read_text() == before
    assert f"done    {row.run_dir} (2 rounds)" in capsys.readouterr().out

    longer = Row("tiny", seed=3, rounds=3)  # the same run, one round further: resumed
    run_rows([longer], jobs=1)
    assert [r["round"] for r in read_metrics(row.run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert "--resume auto" in capsys.readouterr().out
    assert json.loads((row.run_dir / "summary.json").read_text())["rounds"] == 3


def write_fedpart_run(run_dir, accs, comm_ratio, flops_ratio):
    files = RunFiles(run_dir)
    files.write_config("algorithm:\n  class_path: fedlit.algorithms.FedAvg\n")
    for r, acc in enumerate(accs, start=1):
        record = {"round": r, "test/acc": acc, "comm/bytes": int(r * comm_ratio * 10**8)}
        record.update({"comm/ratio": comm_ratio, "cost/flops_ratio": flops_ratio})
        files.append_metrics(record)


def test_fedpart_table_pairs_seeds_and_reads_each_cycle(results_dirs):
    cycle = reproduce.FEDPART_CYCLE
    rows = [
        Row("fedpart_cifar10_fedavg_full", 0),
        Row("fedpart_cifar10_fedavg_fedpart", 0),
        Row("fedpart_cifar10_fedavg_full", 1, rounds=cycle),
        Row("fedpart_cifar10_fedavg_fedpart", 1, rounds=cycle),
    ]
    # seed 0 ran two cycles, seed 1 one; accuracy rises by 0.1 per cycle. FedPart's 50 rounds
    # move what full training moves in 15, before its accuracy rose: 50.0 at FedPart's bytes
    ramp = [0.5] * cycle + [0.6] * cycle
    write_fedpart_run(rows[0].run_dir, ramp, 1.0, 1.0)
    write_fedpart_run(rows[1].run_dir, [a + 0.02 for a in ramp], 0.3, 0.6)
    write_fedpart_run(rows[2].run_dir, [0.4] * cycle, 1.0, 1.0)
    write_fedpart_run(rows[3].run_dir, [0.38] * cycle, 0.3, 0.6)
    table = reproduce.fedpart_report(rows).split("\n\n")[0]
    lines = [line.split(" | ") for line in table.splitlines()[2:]]
    cells = [[c.strip("| ") for c in line] for line in lines]
    assert cells == [
        ["FedAvg", "1", "56.0 → 57.7", "45.0 ± 5.0", "45.0 ± 7.0", "0.0 ± 2.0", "45.0 ± 5.0",
         "0.300 ± 0.000", "0.600 ± 0.000", "0, 1"],
        ["FedAvg", "2", "58.6 → 60.2", "60.0", "62.0", "2.0", "50.0", "0.300", "0.600", "0"],
    ]  # fmt: skip
    for name in ("fedpart_accuracy.png", "fedpart_vs_comm.png"):
        assert (results_dirs / "figures" / name).read_bytes()[:4] == b"\x89PNG"


def test_probes_table_reads_the_last_probed_round_per_layer(results_dirs):
    rows = [Row("cfd_cifar10_fedavg", 0, rounds=10), Row("cfd_cifar10_fedavg", 1, rounds=10)]
    for seed, row in enumerate(rows):
        files = RunFiles(row.run_dir)
        files.write_config("algorithm:\n  class_path: fedlit.algorithms.FedAvg\n")
        key = "layer/{}/probe/{}_rel_change"
        files.append_metrics({"round": 5, "test/acc": 0.3, key.format("stem", "train_ratio"): 9.0})
        files.append_metrics(
            {
                "round": 10,
                "test/acc": 0.4,
                "personal/acc_local": 0.8,
                "personal/acc_global": 0.5 + seed / 10,
                key.format("stem", "train_ratio"): 0.1,
                key.format("s1", "train_ratio"): 0.2 + seed,
                key.format("s1", "test_ratio"): -0.5,
                key.format("s1", "train_var_w"): 7.0,  # not a column of the table
            }
        )
    table = reproduce.probes_report(rows).splitlines()
    assert table[2:4] == [
        "| stem | 10.0 ± 0.0 % | - | - |",
        "| s1 | 70.0 ± 50.0 % | -50.0 ± 0.0 % | - |",
    ]
    assert table[5] == "| model (last round, seeds 0, 1) | accuracy on the clients' local test |"
    assert table[7:] == ["| local model | 80.0 ± 0.0 |", "| received | 55.0 ± 5.0 |"]


def test_spike_blocks_follow_the_fedpart_schedule():
    names = [f"layer{i}" for i in range(10)]  # ResNet-8's count: 25-round cycles
    plan = planned_layers([FedPartSchedule()], names, 75)
    assert reproduce.spike_blocks(plan) == [
        ("C1 partial", 6, 25),
        ("C2 full", 26, 30),
        ("C2 partial", 31, 50),
        ("C3 full", 51, 55),
        ("C3 partial", 56, 75),
    ]
    # full rounds with no partial round after them are no block
    assert reproduce.spike_blocks(plan[:30]) == [("C1 partial", 6, 25)]


def test_fedmr_table_gives_best_final_and_the_mean_of_the_last_rounds(results_dirs):
    rows = [Row(f"fedmr_cifar10_{m}_dir0.1", 0, rounds=80) for m in ("fedavg", "fedmr")]
    rows.append(Row("fedmr_cifar10_fedavg_dir0.1", 1, rounds=80))  # still running: left out
    curves = {0: [0.2, 0.6, 0.3, 0.4], 1: [0.2, 0.4, 0.5, 0.5]}  # evaluated every 20 rounds
    curves[2] = [0.9]
    for index, row in enumerate(rows):
        files = RunFiles(row.run_dir)
        files.write_config("algorithm:\n  class_path: fedlit.algorithms.FedAvg\n")
        for k, acc in enumerate(curves[index], start=1):
            files.append_metrics({"round": 20 * k, "test/acc": acc})
    table = reproduce.fedmr_report(rows).splitlines()
    assert table[0].startswith("| Dirichlet alpha | method | best acc | final acc | mean of the")
    # the last 50 rounds of an 80-round run hold the evaluations at rounds 40, 60 and 80
    assert table[2:] == [
        "| 0.1 | FedAvg | 60.0 | 40.0 | 43.3 | 80 | 0 |",
        "| 0.1 | FedMR | 50.0 | 50.0 | 46.7 | 80 | 0 |",
    ]
    assert (results_dirs / "figures" / "fedmr_accuracy.png").is_file()


def test_last_moving_round_is_the_last_whose_median_layer_still_moves(tmp_path):
    files = RunFiles(tmp_path)
    changes = [(0.5, 0.02, 0.001), (0.011, 0.01, 0.5), (0.02, 0.009, 0.0)]
    for r, (a, b, c) in enumerate(changes, start=1):
        files.append_metrics(
            {"round": r, "layer/a/rel_change": a, "layer/b/rel_change": b, "layer/c/rel_change": c}
        )
    files.append_metrics({"round": 4, "test/acc": 0.5})  # nothing measured: not counted
    assert reproduce.last_moving_round(tmp_path) == 2  # medians 0.02, 0.011, 0.009
