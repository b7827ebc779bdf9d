"""The run's figures: what each one draws, read back from the matplotlib objects."""

from __future__ import annotations

import numpy as np
import pytest

from fedlit.plots import (
    MIB,
    accuracy_limits,
    client_accuracy_figure,
    communication_figure,
    curves_figure,
    plot_comparison,
    plot_curves,
    plot_layer_metrics,
    save_figure,
)

PNG = b"\x89PNG\r\n\x1a\n"


def history(rounds: int = 4) -> list[dict]:
    return [
        {
            "round": r,
            "train/loss": 2.0 / r,
            "comm/round_bytes": 2 * MIB,
            "comm/bytes": 2 * MIB * r,
            "test/acc": 0.2 * r,
            "personal/acc_global": 0.15 * r,
            "personal/acc_global_std": 0.05,
            "layer/conv1/norm": 1.0 + r,
            "layer/fc/norm": 3.0 - r / 2,
        }
        for r in range(1, rounds + 1)
    ]


def test_communication_per_round_and_cumulative_in_mib():
    figure = communication_figure(history())
    bars_axes, total_axes = figure.axes
    assert [p.get_height() for p in bars_axes.patches] == [2.0] * 4
    (line,) = total_axes.lines
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == [2.0, 4.0, 6.0, 8.0]
    assert total_axes.get_ylim()[0] == 0


def test_client_accuracy_sorts_clients_and_shows_the_spread_band():
    final = [0.9, 0.3, 0.6]
    figure = client_accuracy_figure(history(), final, "test")
    spread, bars = figure.axes
    (mean_line,) = spread.lines
    assert list(mean_line.get_ydata()) == pytest.approx([0.15, 0.3, 0.45, 0.6])
    band = spread.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.10) and band.max() == pytest.approx(0.65)
    assert [p.get_height() for p in bars.patches] == [0.3, 0.6, 0.9]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1", "2", "0"]
    labels = [line.get_label() for line in bars.lines]
    assert labels == ["mean 0.600", "global test 0.800"]
    # without personalised metrics only the per-client bars remain
    plain = [{k: v for k, v in r.items() if not k.startswith("personal")} for r in history()]
    assert len(client_accuracy_figure(plain, final, "train").axes) == 1


def test_layer_metrics_get_one_figure_per_metric_with_a_curve_per_layer(tmp_path):
    records = history()
    records[0]["layer/conv1/grad norm"] = 0.5
    paths = plot_layer_metrics(records, tmp_path)
    assert [p.name for p in paths] == ["layer_norm.png", "layer_grad_norm.png"]
    assert all(p.read_bytes()[:8] == PNG for p in paths)
    figure = curves_figure({"a": ([1, 2], [0.1, 0.2]), "b": ([1], [0.3])}, "acc", "t")
    assert [line.get_label() for line in figure.axes[0].lines] == ["a", "b"]
    assert np.array_equal(figure.axes[0].lines[1].get_ydata(), [0.3])


def test_comparison_plot_is_written(tmp_path):
    path = plot_comparison({"run": ([1, 2], [0.5, 0.6])}, tmp_path / "deep" / "cmp.png")
    assert path.read_bytes()[:8] == PNG


def test_client_accuracy_axis_fits_clients_close_to_one():
    final = [0.95, 0.97, 1.0]
    high = [{"round": 1, "test/acc": 0.98}]
    low, top = client_accuracy_figure(high, final, "test").axes[-1].get_ylim()
    assert 0.9 < low < 0.95 and 1.0 <= top <= 1.02  # not 0-1: the differences stay visible
    assert accuracy_limits([0.1, 0.9]) == pytest.approx((0.02, 0.98))


def test_a_run_s_figures_carry_its_name(tmp_path):
    (path,) = plot_curves(history(), tmp_path, run_name="fedavg_cifar")[:1]
    assert path.read_bytes()[:8] == PNG
    figure = curves_figure({"a": ([1, 2], [0.1, 0.2])}, "acc", "acc per round")
    save_figure(figure, tmp_path / "c.png", run_name="fedavg_cifar")
    assert figure.get_suptitle() == "run fedavg_cifar"
