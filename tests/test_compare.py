"""`fedlit compare`: a table of several runs and one accuracy plot, from their run dirs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedlit.cli import main
from fedlit.compare import compare_runs, load_run, load_runs, print_table, run_labels
from fedlit.loggers import RunFiles

CONFIG = "algorithm:\n  class_path: fedlit.algorithms.{name}\n  init_args:\n    mu: 0.1\n"


def write_run(path, name: str, accs: list[float], summary: bool = True):
    """A run directory as RunFiles writes it during and after a fit."""
    files = RunFiles(path)
    files.write_config(CONFIG.format(name=name))
    for r, acc in enumerate(accs, start=1):
        files.append_metrics(
            {"round": r, "test/acc": acc, "test/loss": 1.0, "comm/bytes": r * 1024}
        )
    if summary:
        best = max(range(len(accs)), key=accs.__getitem__)
        files.write_summary(
            {
                "best_test_acc": accs[best],
                "best_round": best + 1,
                "final_test_acc": accs[-1],
                "rounds": len(accs),
                "wall_seconds": 12.5,
                "comm_bytes": len(accs) * 1024,
            }
        )
    return path


def text_of(table) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(table)
    return console.file.getvalue()


def test_compare_table_and_plot(tmp_path):
    a = write_run(tmp_path / "runs" / "fedavg", "FedAvg", [0.5, 0.8, 0.7])
    b = write_run(tmp_path / "runs" / "prox", "FedProx", [0.6, 0.75])
    c = write_run(tmp_path / "other" / "prox", "FedProx", [0.4], summary=False)  # still running
    table, figures = compare_runs([a, b, c])
    plot = tmp_path / "runs" / "compare_accuracy.png"
    assert figures.written == [
        ("accuracy per round", plot),
        ("accuracy against communication", plot.with_name("compare_accuracy_vs_comm.png")),
    ]
    assert figures.notes == []  # no run recorded gradient norms: nothing to say about them
    assert plot.read_bytes()[:4] == b"\x89PNG"
    rows = [line.split("│")[1:-1] for line in text_of(table).splitlines() if line.count("│") > 2]
    cells = [[cell.strip() for cell in row] for row in rows]
    # comm in GB (10^9 bytes); runs without cost accounting show "-" for ratios and FLOPs
    gb = [f"{k * 1024 / 1e9:.3g}" for k in (3, 2, 1)]
    assert cells == [
        [
            "fedavg",
            "FedAvg(mu=0.1)",
            "averaged",
            "0.8000",
            "2",
            "0.7000",
            "3",
            gb[0],
            *"---",
            "12.5 s",
        ],
        [
            str(b),
            "FedProx(mu=0.1)",
            "averaged",
            "0.7500",
            "2",
            "0.7500",
            "2",
            gb[1],
            *"---",
            "12.5 s",
        ],
        [
            str(c),
            "FedProx(mu=0.1)",
            "averaged",
            "0.4000",
            "1",
            "0.4000",
            "1",
            gb[2],
            *"---",
            "running",
        ],
    ]
    assert run_labels([a, b, c]) == ["fedavg", str(b), str(c)]
    assert load_run(b, "b").curve == ([1, 2], [0.6, 0.75])


def test_compare_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich fits the table to the terminal's width
    a = write_run(tmp_path / "a", "FedAvg", [0.5, 0.9])
    b = write_run(tmp_path / "b", "MOON", [0.7, 0.8])
    main(["compare", str(a), str(b), "--plot", str(tmp_path / "cmp.png")])
    out = capsys.readouterr().out
    assert "MOON(mu=0.1)" in out and "0.9000" in out
    assert f"accuracy per round written to {tmp_path / 'cmp.png'}" in out
    assert f"accuracy against communication written to {tmp_path / 'cmp_vs_comm.png'}" in out
    assert "gradnorm" not in out  # no run recorded gradient norms: no line per run about it
    assert (tmp_path / "cmp.png").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(a), str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "missing: no metrics.jsonl here" in capsys.readouterr().err


def test_at_rounds_reads_runs_as_if_they_had_stopped_there(tmp_path):
    a = write_run(tmp_path / "runs" / "fedavg", "FedAvg", [0.5, 0.8, 0.7, 0.9])
    table, figures = compare_runs([a], at_rounds=[1, 3])
    plot = figures.written[0][1]
    rows = [line.split("│")[1:-1] for line in text_of(table).splitlines() if line.count("│") > 2]
    cells = [[cell.strip() for cell in row] for row in rows]
    # best accuracy among the rounds up to N, communication accumulated until N, no wall time
    assert [c[0] for c in cells] == ["fedavg @1", "fedavg @3"]
    assert [c[3:8] for c in cells] == [
        ["0.5000", "1", "0.5000", "1", f"{1024 / 1e9:.3g}"],
        ["0.8000", "2", "0.7000", "3", f"{3 * 1024 / 1e9:.3g}"],
    ]
    assert [c[-1] for c in cells] == ["-", "-"]
    assert (plot.parent / "compare_accuracy_vs_comm.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no evaluated round at or before round 0"):
        load_run(a, "fedavg", upto=0)


def test_compare_refuses_to_overwrite_its_figures_unless_asked(tmp_path, capsys):
    a = write_run(tmp_path / "a", "FedAvg", [0.5, 0.9])
    plot = tmp_path / "cmp.png"
    main(["compare", str(a), "--plot", str(plot)])
    first = plot.stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(a), "--plot", str(plot)])
    assert exit_info.value.code == 2
    assert "pass --overwrite true" in capsys.readouterr().err
    assert plot.stat().st_mtime_ns == first
    main(["compare", str(a), "--plot", str(plot), "--overwrite", "true"])
    assert f"accuracy per round written to {plot}" in capsys.readouterr().out


def test_compare_fits_an_80_column_terminal(tmp_path):
    a = write_run(tmp_path / "a", "FedAvg", [0.5, 0.9])
    b = write_run(tmp_path / "b", "MOON", [0.7, 0.8])
    console = Console(file=io.StringIO(), width=80, color_system=None, force_terminal=True)
    print_table(load_runs([a, b]), console)
    lines = console.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert any("MOON(mu=0.1)" in line for line in lines)
    assert any("0.9000" in line for line in lines)
