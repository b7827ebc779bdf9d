"""A resumed run's wall time continues the clock of the run it resumes."""

from __future__ import annotations

from fedlit.wallclock import WallClock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_wall_time_accumulates_over_segments():
    clock = Clock()
    first = WallClock(clock)
    first.start()
    clock.now += 30.0
    saved = first.state_dict()
    assert saved == {"seconds": 30.0, "segments": 1}

    resumed = WallClock(clock)
    resumed.load_state_dict(saved)
    clock.now += 500.0  # start-up of the second process: not part of the rounds' time
    resumed.start()
    clock.now += 12.0
    assert resumed.seconds() == 42.0 and resumed.segments == 2


def test_a_checkpoint_without_a_clock_starts_from_zero():
    clock = Clock()
    resumed = WallClock(clock)
    resumed.load_state_dict(None)
    resumed.start()
    clock.now += 5.0
    assert resumed.seconds() == 5.0 and resumed.segments == 1


def test_an_extended_run_counts_the_time_of_both_segments(tmp_path):
    from functools import partial

    from fedlit.engine import fit
    from fedlit.models import CNN
    from fedlit.resume import load_for_resume
    from runs import tiny_run

    runs = [tiny_run(tmp_path, model=partial(CNN, padding=2), rounds=n) for n in (1, 2)]
    for run in runs:
        run.logger.plots = False
    first, extended = fit(runs[0]), runs[1]
    extended.resume = load_for_resume(tmp_path / "checkpoints" / "last.ckpt", extended.config_yaml)
    second = fit(extended)
    assert (first["segments"], second["segments"]) == (1, 2)
    assert second["wall_seconds"] > first["wall_seconds"] > 0
