"""The console: start-up panel, progress over rounds and clients, closing table, quiet mode."""

from __future__ import annotations

import io

from rich.console import Console
from test_engine import make_run

from fedlit.algorithms import FedAvg
from fedlit.config import LoggerConfig, WandbConfig
from fedlit.console import ConsoleReport, status_line, summary_table
from fedlit.engine import fit, prepare, run_round
from fedlit.loggers import method_label
from fedlit.units import human_bytes


def rendered(*objects) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(*objects)
    return console.file.getvalue()


def test_human_bytes_uses_binary_units():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 1024**2) == "5.0 MiB"
    assert human_bytes(3 * 1024**4) == "3072.0 GiB"


def test_status_keeps_the_latest_evaluation_between_evaluated_rounds():
    report = ConsoleReport(enabled=False, total_rounds=3)
    report.round_done({"round": 1, "train/loss": 1.5, "test/acc": 0.41, "comm/bytes": 2048})
    report.round_done({"round": 2, "train/loss": 1.25, "comm/bytes": 4096})
    status = status_line(report.latest)
    assert status == "acc 0.410 loss 1.250 comm 4.0 KiB"
    assert report.progress.tasks[report.rounds].completed == 2


def test_summary_table_shows_units_and_method_label_reads_the_config():
    summary = {
        "best_test_acc": 0.97777,
        "comm_bytes": 3 * 1024**2,
        "wall_seconds": 2.04,
        "train_flops": 21_865_392_000,
    }
    text = rendered(summary_table(summary))
    assert "0.9778" in text and "3.0 MiB" in text and "2.0 s" in text and "21.9 GFLOP" in text
    config = {"algorithm": {"class_path": "fedlit.algorithms.FedProx", "init_args": {"mu": 0.1}}}
    assert method_label(config) == "FedProx(mu=0.1)"
    assert method_label({}, FedAvg(buffers="local")) == "FedAvg(buffers=local)"


def test_run_round_reports_each_of_its_clients(tmp_path):
    fed = prepare(
        make_run(tmp_path, rounds=1, personal_eval=False, clients_per_round=4, cpu_threads=1)
    )
    seen = []

    class Progress:  # a rank-0 observer of the round loop
        def on_client_done(self, done, total):
            seen.append((done, total))

    run_round(fed, 1, observers=[Progress()])
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4), (4, 4)]  # announced, then each one


def test_console_shows_panel_progress_and_table_and_quiet_shows_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "loud", rounds=1, cpu_threads=1)
    run.logger = LoggerConfig(quiet=False, wandb=WandbConfig(mode="disabled"))
    fit(run)
    err = capsys.readouterr().err
    for row in ("algorithm", "dataset", "partition", "model", "ranks", "rounds", "run_dir"):
        assert f"│ {row}" in err, row
    assert "FedAvg(buffers=average)" in err  # from the algorithm object: no config given
    assert "digits: 1,437 train / 360 test, 10 classes" in err
    assert "dirichlet(alpha=0.5) over 6 clients" in err
    assert "1 on cpu, 6 clients per rank" in err
    assert "round=1/1 train_loss=" in err  # stderr is not a terminal: one log line per round
    assert "threads" in err
    assert "fedlit run summary" in err and "best_test_acc" in err
    assert "W&B" not in err  # disabled explicitly: no notice

    quiet = make_run(tmp_path / "quiet", rounds=1, cpu_threads=1)
    quiet.logger = LoggerConfig(quiet=True, wandb=WandbConfig(mode="disabled"))
    fit(quiet)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
