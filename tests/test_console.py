"""The console of a run: bars that fit 80 columns on a terminal, plain lines in a log."""

from __future__ import annotations

import io
import re

from rich.console import Console

from fedlit.console import ConsoleReport, summary_rows


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def console(terminal: bool, width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_a_log_gets_one_parseable_line_per_round_with_pace_and_eta():
    clock = Clock()
    out = console(terminal=False)
    report = ConsoleReport(True, total_rounds=4, console=out, clock=clock)
    with report:
        for round_ in (1, 2):
            clock.now += 10.0
            report.round_done(
                {"round": round_, "train/loss": 0.5 / round_, "test/acc": 0.8, "comm/bytes": 2048}
            )
    lines = out.file.getvalue().splitlines()
    assert lines == [
        "round=1/4 train_loss=0.5000 test_acc=0.8000 comm_bytes=2048 elapsed_s=10.0 "
        "s_per_round=10.00 eta_s=30",
        "round=2/4 train_loss=0.2500 test_acc=0.8000 comm_bytes=2048 elapsed_s=20.0 "
        "s_per_round=10.00 eta_s=20",
    ]
    fields = dict(item.split("=") for item in lines[1].split())
    assert fields["round"] == "2/4" and float(fields["eta_s"]) == 20


def test_a_long_client_logs_its_steps_at_a_bounded_rate():
    clock = Clock()
    out = console(terminal=False)
    report = ConsoleReport(True, total_rounds=2, console=out, clock=clock, every=30.0)
    with report:
        report.client_done(0, 3)
        for step in range(1, 101):
            clock.now += 1.0  # 100 steps of one second: a line every 30 s, not every step
            report.client_step(step, 100)
    lines = out.file.getvalue().splitlines()
    assert lines == [
        "round=1/2 client=1/3 step=30/100",
        "round=1/2 client=1/3 step=60/100",
        "round=1/2 client=1/3 step=90/100",
    ]


def test_a_resumed_run_starts_its_bar_at_the_resumed_round():
    clock = Clock()
    out = console(terminal=False)
    report = ConsoleReport(True, total_rounds=22, console=out, first_round=21, clock=clock)
    assert report.progress.tasks[report.rounds].completed == 20
    with report:
        clock.now += 5.0
        report.round_done({"round": 21, "train/loss": 0.1})
    # the pace counts this segment's rounds only: one round in 5 s, one to go
    assert out.file.getvalue().split() == [
        "round=21/22", "train_loss=0.1000", "elapsed_s=5.0", "s_per_round=5.00", "eta_s=5"
    ]  # fmt: skip


def test_terminal_bars_fit_80_columns_and_leave_no_stale_client_line():
    out = console(terminal=True, width=80)
    report = ConsoleReport(True, total_rounds=3, console=out)
    with report:
        for round_ in (1, 2, 3):
            report.client_done(0, 5)
            report.client_step(40, 100)
            report.client_done(5, 5)
            report.phase(f"evaluation of round {round_}")
            report.round_done(
                {
                    "round": round_,
                    "train/loss": 0.123,
                    "test/acc": 0.987,
                    "test/loss": 0.05,
                    "personal/acc_global": 0.99,
                    "comm/bytes": 123 * 1024**2,
                }
            )
        report.phase("final evaluation of every client")
    text = plain(out.file.getvalue())
    assert max(len(line) for line in text.splitlines()) <= 80
    final = text.split("\r")[-1]  # what stays on screen once the bars stop
    assert "round" in final and "3/3" in final
    assert "client" not in final and "eval" not in final


def test_the_summary_shows_each_figure_once_in_one_unit_family():
    summary = {
        "best_test_acc": 0.97777,
        "rounds": 22,
        "wall_seconds": 754.0,
        "segments": 2,
        "comm_bytes": 34_200_000,
        "comm_gb": 0.0342,
        "train_flops": 2.5e12,
        "train_tflops": 2.5,
    }
    assert summary_rows(summary) == [
        ("best_test_acc", "0.9778"),
        ("rounds", "22"),
        ("wall_seconds", "12:34 (2 segments)"),
        ("comm_bytes", "32.6 MiB"),
        ("train_flops", "2.5 TFLOP"),
    ]
    # without the raw count, the scaled figure is shown in its proper unit, not as "0 FLOP"
    assert summary_rows({"train_tflops": 2.5}) == [("train_tflops", "2.5 TFLOP")]
