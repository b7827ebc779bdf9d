"""Default torch threads per CPU rank: ranks x threads never exceed the cores."""

from __future__ import annotations

import logging

import pytest

from fedlit.threads import available_cores, default_cpu_threads, describe_threads


@pytest.mark.parametrize(
    ("ranks", "cores", "threads"), [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5)]
)
def test_default_threads_do_not_oversubscribe(ranks, cores, threads):
    assert default_cpu_threads(ranks, cores, busy=0.0) == threads
    assert ranks * threads <= max(cores, ranks)


@pytest.mark.parametrize(
    ("ranks", "cores", "busy", "threads"),
    [(1, 2, 0.4, 2), (1, 2, 1.2, 1), (1, 2, 8.0, 1), (1, 16, 4.5, 12), (2, 16, 4.5, 6)],
)
def test_cores_other_jobs_keep_busy_are_left_to_them(ranks, cores, busy, threads):
    assert default_cpu_threads(ranks, cores, busy) == threads


def test_the_panel_row_names_threads_ranks_and_cores(monkeypatch):
    monkeypatch.setattr("torch.get_num_threads", lambda: 4)
    cores = available_cores()
    row = describe_threads("cpu", 2)
    assert row.startswith(f"4 torch thread(s) per rank x 2 rank(s), {cores} core(s), load ")
    assert ("oversubscribed" in row) == (cores < 8)


def test_quiet_silences_lightning_s_start_up_banner(tmp_path):
    from test_engine import make_run

    from fedlit.config import LoggerConfig
    from fedlit.launch import make_fabric

    run = make_run(tmp_path, rounds=1, cpu_threads=1)
    run.logger = LoggerConfig(quiet=True)
    make_fabric(run)
    for name in ("lightning.fabric", "lightning.pytorch"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
