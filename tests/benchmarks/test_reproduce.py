"""`make results`: every row of docs/results.md has a config, missing rounds are run or resumed,
and the tables read the runs the way the docs say."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from benchmarks import reproduce
from benchmarks.reproduce import PAPERS, Row, mean_pm, run_rows
from fedlit.cli import build_parser
from fedlit.loggers import RunFiles, read_metrics

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


def test_every_row_parses_with_its_overlays_and_fits_its_rounds():
    parser = build_parser()
    run_dirs = set()
    for paper in PAPERS.values():
        for row in paper.rows:
            args = ["fit"]
            for path in row.configs:
                assert path.is_file(), (row.name, path)
                args += ["--config", str(path)]
            cfg = parser.parse_args(args)
            init = parser.instantiate(cfg).fit
            assert init.model is not None, row.name
            assert row.wanted_rounds() == cfg.fit.trainer.rounds, row.name
            # every row runs on one CPU thread, quietly, without W&B
            trainer = cfg.fit.trainer
            assert (trainer.devices, trainer.accelerator, trainer.cpu_threads) == (1, "cpu", 1)
            assert cfg.fit.logger.quiet and cfg.fit.logger.wandb.mode == "disabled"
            assert row.run_dir not in run_dirs
            run_dirs.add(row.run_dir)
    fedpart = [row for row in PAPERS["fedpart"].rows]
    assert all(row.wanted_rounds() % reproduce.FEDPART_CYCLE == 0 for row in fedpart)
    # the FedPart rows are the official configs: client 0's statistics first, all three logged
    for row in fedpart:
        config = yaml.safe_load(row.configs[0].read_text())
        assert config["trainer"]["eval_bn"] == ["client:0", "averaged", "recalibrated"]


def test_row_command_applies_its_configs_in_order_and_resumes_only_from_a_checkpoint(
    results_dirs,
):
    configs = (results_dirs / "configs" / "a.yaml", results_dirs / "configs" / "b.yaml")
    row = Row("fedpart_fedavg", configs, seed=1, rounds=25)
    command = row.command()
    assert command == [
        "fedlit", "fit", "--config", str(configs[0]), "--config", str(configs[1]),
        "--seed", "1", "--run_dir", str(results_dirs / "runs" / "fedpart_fedavg_s1"),
        "--trainer.rounds", "25",
    ]  # fmt: skip
    assert row.finished_rounds() == 0
    (row.run_dir / "checkpoints").mkdir(parents=True)
    (row.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert row.command()[-2:] == ["--resume", "auto"]
    assert "--resume" not in row.command(resume=False)
    # without `rounds`: the last config that sets trainer.rounds
    configs[0].write_text("trainer:\n  rounds: 125\n")
    configs[1].write_text("data:\n  num_clients: 10\n")
    assert Row("x", configs).wanted_rounds() == 125
    configs[1].write_text("trainer:\n  rounds: 50\n")
    assert Row("x", configs).wanted_rounds() == 50


def test_mean_pm_gives_the_mean_and_half_the_range_over_seeds():
    assert mean_pm([0.5, 0.6]) == "55.0 ± 5.0"
    assert mean_pm([0.6193]) == "61.9"
    assert mean_pm([0.3, 0.31, 0.29], scale=1.0, digits=3) == "0.300 ± 0.010"
    assert mean_pm([]) == "-"


def test_run_rows_runs_what_is_missing_skips_what_is_done_and_resumes(results_dirs, capsys):
    config = results_dirs / "configs" / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    row = Row("tiny", (config,), seed=3)
    run_rows([row], jobs=1)
    assert [r["round"] for r in read_metrics(row.run_dir / "metrics.jsonl")] == [1, 2]
    assert yaml.safe_load((row.run_dir / "config.yaml").read_text())["seed"] == 3
    log = row.run_dir.parent / "tiny_s3.log"
    before = log.read_text()

    run_rows([row], jobs=1)  # nothing left to run
    assert log.read_text() == before
    assert f"done    {row.run_dir} (2 rounds)" in capsys.readouterr().out

    longer = Row("tiny", (config,), seed=3, rounds=3)  # the same run, one round further: resumed
    run_rows([longer], jobs=1)
    assert [r["round"] for r in read_metrics(row.run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert "--resume auto" in capsys.readouterr().out
    assert json.loads((row.run_dir / "summary.json").read_text())["rounds"] == 3


def test_finished_rows_are_archived_without_checkpoints_and_read_back_on_a_fresh_clone(
    results_dirs, capsys
):
    config = results_dirs / "configs" / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    done, unfinished = Row("tiny", (config,), seed=1), Row("tiny", (config,), seed=2, rounds=5)
    run_rows([done], jobs=1)
    files = RunFiles(unfinished.run_dir)  # a row still running: two of its five rounds
    files.write_config("seed: 2\n")
    for k in (1, 2):
        files.append_metrics({"round": k, "test/acc": 0.5})

    reproduce.archive([done, unfinished])
    assert sorted(p.name for p in done.archive_dir.iterdir()) == [
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]
    assert not unfinished.archive_dir.exists()
    accuracy = [r["test/acc"] for r in read_metrics(done.run_dir / "metrics.jsonl")]

    shutil.rmtree(reproduce.RUNS)  # a clone that never ran the rows
    assert (done.finished_rounds(), unfinished.finished_rounds()) == (2, 0)
    assert done.results_dir == done.archive_dir
    assert reproduce.complete([done, unfinished]) == [done]
    [(_, result)] = reproduce.available([done])
    assert result.final_acc == accuracy[-1]
    assert result.best_acc == max(accuracy)
    run_rows([done], jobs=1)  # kept: not run again
    assert not done.run_dir.exists()
    assert f"done    {done.archive_dir} (2 rounds)" in capsys.readouterr().out


def write_run(run_dir, accs, first="averaged", others=(), every=1, extra=None):
    """A run directory with test accuracies per evaluated round under `first` (test/acc) and
    under each protocol of `others` (test/acc@<name>, shifted by 0.01 per position)."""
    files = RunFiles(run_dir)
    protocols = [first, *others]
    files.write_config(
        "algorithm:\n  class_path: fedlit.algorithms.FedAvg\n"
        f"trainer:\n  eval_bn: [{', '.join(p.replace('client', 'client:') for p in protocols)}]\n"
    )
    for k, acc in enumerate(accs, start=1):
        record = {"round": every * k, "test/acc": acc}
        for position, name in enumerate(others, start=1):
            record[f"test/acc@{name}"] = acc + 0.01 * position
        record.update((extra or {}).get(every * k, {}))
        files.append_metrics(record)


def test_fedpart_table_pairs_seeds_and_reads_each_cycle_under_every_protocol(results_dirs):
    cycle = reproduce.FEDPART_CYCLE
    rows = [
        Row("fedpart_fedavg", (), 0, rounds=2 * cycle),
        Row("fedpart_fedpart", (), 0, rounds=2 * cycle),
        Row("fedpart_fedavg", (), 1, rounds=2 * cycle),
        Row("fedpart_fedpart", (), 1, rounds=cycle),  # one cycle only: no C = 2 pair for seed 1
        Row("fedpart40_fedavg", (), 0, rounds=cycle),
        Row("fedpart40_fedpart", (), 0, rounds=cycle),
    ]
    others = ("averaged", "recalibrated")
    ramp = [0.5] * cycle + [0.6] * cycle
    write_run(rows[0].run_dir, ramp, "client0", others)
    write_run(rows[1].run_dir, [a + 0.02 for a in ramp], "client0", others)
    write_run(rows[2].run_dir, [0.4] * 2 * cycle, "client0", others)
    write_run(rows[3].run_dir, [0.38] * cycle, "client0", others)
    write_run(rows[4].run_dir, [0.3] * cycle, "client0", others)
    write_run(rows[5].run_dir, [0.35] * cycle, "client0", others)
    table = reproduce.fedpart_report(rows)
    lines = [line.split(" | ") for line in table.splitlines()[2:]]
    cells = [[c.strip("| ") for c in line] for line in lines]
    assert cells[0] == [
        "10", "1", "56.0 → 57.7 (+1.7)",
        "45.0 ± 5.0 → 45.0 ± 7.0 (+0.0 ± 2.0)",
        "46.0 ± 5.0 → 46.0 ± 7.0 (+0.0 ± 2.0)",
        "47.0 ± 5.0 → 47.0 ± 7.0 (+0.0 ± 2.0)",
        "0, 1",
    ]  # fmt: skip
    assert cells[1] == [
        "10", "2", "58.6 → 60.2 (+1.6)", "60.0 → 62.0 (+2.0)", "61.0 → 63.0 (+2.0)",
        "62.0 → 64.0 (+2.0)", "0",
    ]  # fmt: skip
    assert cells[2][:4] == ["40", "1", "56.0 → 57.7 (+1.7)", "30.0 → 35.0 (+5.0)"]
    assert (results_dirs / "figures" / "fedpart_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_fedpart_table_reads_unfinished_pairs_where_both_runs_are_and_says_so(results_dirs):
    cycle = reproduce.FEDPART_CYCLE
    rows = [
        Row("fedpart40_fedavg", (), 0, rounds=cycle),
        Row("fedpart40_fedpart", (), 0, rounds=cycle),
    ]
    others = ("averaged", "recalibrated")
    write_run(rows[0].run_dir, [0.3, 0.5, 0.4, 0.9], "client0", others)  # 4 rounds
    write_run(rows[1].run_dir, [0.2, 0.6, 0.55, 0.58, 0.7, 0.99], "client0", others)  # 6
    table = reproduce.fedpart_report(rows)
    lines = [[c.strip("| ") for c in line.split(" | ")] for line in table.splitlines()[2:]]
    assert [line[:2] for line in lines[:2]] == [["10", "1"], ["10", "2"]]  # no runs: "-"
    assert lines[0][3:6] == ["-", "-", "-"]
    cells = lines[2]
    # best over rounds 1-3 (the FedPart run's later rounds ignored), under each protocol
    assert cells[:4] == ["40", "1, rounds 1–4 of 25 (unfinished)", "56.0 → 57.7 (+1.7)",
                         "90.0 → 60.0 (-30.0)"]  # fmt: skip


def test_probes_table_reads_the_last_probed_round_per_layer_for_both_methods(results_dirs):
    rows = [Row(f"cfd_{m}", (), seed, rounds=10) for seed in (0, 1) for m in ("fedavg", "fedbn")]
    key = "layer/{}/probe/{}_rel_change"
    for row in rows:
        seed = row.seed
        fedbn = row.name == "cfd_fedbn"
        write_run(
            row.run_dir, [0.3, 0.4], "averaged", ("recalibrated",), every=5,
            extra={
                5: {key.format("stem", "train_ratio"): 9.0},
                10: {
                    "personal/acc_local": 0.8,
                    "personal/acc_global": 0.5 + seed / 10 + 0.2 * fedbn,
                    key.format("stem", "train_ratio"): 0.1,
                    key.format("s1", "train_ratio"): 0.2 + seed - 0.1 * fedbn,
                    key.format("s1", "test_ratio"): -0.5,
                    key.format("s1", "train_var_w"): 7.0,  # not a column of the table
                },
            },
        )  # fmt: skip
    table = reproduce.probes_report(rows).splitlines()
    assert table[2:4] == [
        "| stem | 10.0 ± 0.0 % | - | - | 10.0 ± 0.0 % | - | - |",
        "| s1 | 70.0 ± 50.0 % | -50.0 ± 0.0 % | - | 60.0 ± 50.0 % | -50.0 ± 0.0 % | - |",
    ]
    assert table[7:] == [
        "| FedAvg | 80.0 ± 0.0 | 55.0 ± 5.0 | 40.0 ± 0.0 | 41.0 ± 0.0 | 0, 1 |",
        "| FedBN | 80.0 ± 0.0 | 75.0 ± 5.0 | 40.0 ± 0.0 | 41.0 ± 0.0 | 0, 1 |",
    ]
    # both methods' curves on one axis (a missing layer/metric is a gap, not an error)
    assert (results_dirs / "figures" / "probes_cfd_compare.png").stat().st_size > 10_000


def test_fedmr_table_gives_best_final_and_the_mean_of_the_last_rounds(results_dirs):
    rows = [Row(f"fedmr_{m}", (), 0, rounds=80) for m in ("fedavg", "fedmr")]
    rows.append(Row("fedmr_fedavg", (), 1, rounds=80))  # still running: left out
    curves = [[0.2, 0.6, 0.3, 0.4], [0.2, 0.4, 0.5, 0.5], [0.9]]  # evaluated every 20 rounds
    for row, curve in zip(rows, curves, strict=True):
        write_run(row.run_dir, curve, every=20)
    table = reproduce.fedmr_report(rows).splitlines()
    assert table[0].startswith("| method | best acc | final acc | mean of the last 50 rounds")
    # the last 50 rounds of an 80-round run hold the evaluations at rounds 40, 60 and 80
    assert table[2:] == [
        "| FedAvg | 60.0 | 40.0 | 43.3 | 80 | 0 |",
        "| FedMR | 50.0 | 50.0 | 46.7 | 80 | 0 |",
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
