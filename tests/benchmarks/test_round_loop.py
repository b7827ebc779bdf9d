"""The benchmark measures what it says: a tiny case end to end, numbers checked for sense."""

import math

from benchmarks.round_loop import Case, cifar_shaped, measure


def test_cifar_shaped_data_is_seeded_and_shaped_like_cifar10():
    a, b = cifar_shaped(64, 16, seed=3), cifar_shaped(64, 16, seed=3)
    assert a.train.x.shape == (64, 3, 32, 32) and a.train.x.dtype.is_floating_point is False
    assert a.test.x.shape == (16, 3, 32, 32) and a.num_classes == 10
    assert (a.train.x == b.train.x).all() and (a.train.y == b.train.y).all()


def test_a_tiny_case_reports_time_throughput_and_overhead():
    case = Case(model="cnn", clients=3, samples_per_client=40, batch_size=16, rounds=1)
    record = measure(case)
    # 3 clients x ceil(40 / 16) batches each
    assert record["sgd_steps_per_round"] == 9
    assert record["seconds_per_round"] > 0 and record["plain_seconds_per_round"] > 0
    assert math.isclose(
        record["samples_per_second"], 3 * 40 / record["seconds_per_round"], rel_tol=1e-9
    )
    assert math.isclose(
        record["overhead"],
        record["seconds_per_round"] / record["plain_seconds_per_round"] - 1,
        rel_tol=1e-9,
    )
    assert record["collective_calls_per_round"] == 1.0
    assert record["peak_memory_mb_rank0"] > 0
