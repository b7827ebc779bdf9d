"""GradientNorms: per local step gradient and update norms, per layer and in total."""

import io
import json
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from callbacks.gradnorm import (
    FILENAME,
    GradientNorms,
    GradNormCurves,
    StepNorms,
    plot_gradnorm_comparison,
    steps_per_round,
)
from fedlit.data.config import DataConfig
from fedlit.data.datasets import load_dataset
from fedlit.data.device import DeviceData
from fedlit.engine import fit, run_round
from fedlit.models import CNN
from runs import OnlyLayer, free_port, join_as_torchrun_rank, start, tiny_run

SMALL_CNN = partial(CNN, padding=2, channels=(4, 8), hidden=(16, 12))
LAYERS = ["conv1", "conv2", "fc1", "fc2", "fc3"]


def make_run(run_dir, callbacks, rounds=1, **trainer):
    return tiny_run(run_dir, model=SMALL_CNN, callbacks=callbacks, rounds=rounds, **trainer)


def run_rounds(run, rounds):
    fed = start(run)
    metrics = [run_round(fed, r) for r in range(1, rounds + 1)]
    return fed, metrics


class NaiveNorms:
    """An independent per-client record of every step's norms: float64 concatenations of the
    trainable parameters of each layer, and copies of the weights before each step."""

    def __init__(self, layers):
        self.layers = layers
        self.steps = {}  # client -> list of {row: (grad norm, update norm)}

    def on_client_start(self, client, model):
        self.model = model
        self.client = client
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.steps[client] = []

    def on_train_batch_end(self):
        params = dict(self.model.named_parameters())
        rows = {}
        groups = {layer.name: layer.params for layer in self.layers}
        groups["total"] = [n for layer in self.layers for n in layer.params]
        for row, names in groups.items():
            names = [n for n in names if params[n].requires_grad]
            if not names:
                continue
            grad = torch.cat([params[n].grad.reshape(-1).double() for n in names])
            step = torch.cat([(params[n] - self.before[n]).reshape(-1).double() for n in names])
            rows[row] = (grad.norm().item(), step.norm().item())
        self.steps[self.client].append(rows)
        self.before = {n: p.detach().clone() for n, p in params.items()}


# ---- pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_steps_per_round_counts_the_batches_device_data_makes(batch_size):
    data = DeviceData(load_dataset(DataConfig(dataset="digits")), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for size in range(1, 30):
        made = sum(1 for _ in data.train_batches(torch.arange(size), batch_size, 2, generator))
        assert steps_per_round(size, batch_size, 2) == made, size
    # a lone last sample joins the batch before it: 9 samples in batches of 4 are 2 steps
    assert steps_per_round(9, 4, 1) == 2
    assert steps_per_round(0, 4, 3) == 0


class TwoLayers(nn.Module):
    """out = b * (a . x): layer "a" holds a (2 weights), layer "b" holds b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([3.0]))

    def forward(self, x):
        return self.b * (x @ self.a)


def test_step_norms_by_hand():
    model = TwoLayers()
    params = [model.a, model.b]
    # rows: layer a, layer b, total
    groups = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    meter = StepNorms(params, groups)
    optimizer = torch.optim.SGD(params, lr=0.1)
    x = torch.tensor([1.0, 1.0])
    # loss = out^2 with out = 3 * (1 + 2) = 9: dL/db = 2 * 9 * 3 = 54, dL/da = 2 * 9 * 3 * x
    model(x).square().sum().backward()
    optimizer.step()
    grad, update = meter.measure().tolist()
    root2, root3 = math.sqrt(2), math.sqrt(3)
    assert grad == pytest.approx([54 * root2, 54, 54 * root3], rel=1e-6)
    assert update == pytest.approx([5.4 * root2, 5.4, 5.4 * root3], rel=1e-6)
    # the next step is measured from the weights after this one: a = [-4.4, -3.4], b = -2.4
    optimizer.zero_grad()
    model(x).square().sum().backward()  # out = -2.4 * -7.8 = 18.72
    optimizer.step()
    grad, update = meter.measure().tolist()
    out = 18.72
    assert grad[1] == pytest.approx(2 * out * 7.8, rel=1e-5)  # dL/db = 2 * out * (a . x)
    assert grad[0] == pytest.approx(2 * out * 2.4 * root2, rel=1e-5)  # |dL/da| = 2 out |b| |x|
    assert update == pytest.approx([0.1 * g for g in grad], rel=1e-5)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="GradientNorms.every must be an integer >= 0"):
        GradientNorms(every=-1)
    with pytest.raises(ValueError, match="GradientNorms.every"):
        GradientNorms(every=True)
    with pytest.raises(ValueError, match="GradientNorms.rounds must list rounds >= 1"):
        GradientNorms(rounds=[0, 3])
    with pytest.raises(ValueError, match="records no round with every=0"):
        GradientNorms(every=0)
    with pytest.raises(ValueError, match="GradientNorms.max_steps must be an integer >= 1"):
        GradientNorms(max_steps=0)
    callback = GradientNorms(every=3, rounds=[1, 4])
    assert [r for r in range(1, 10) if callback.records(r)] == [1, 3, 4, 6, 9]
    assert [r for r in range(1, 10) if GradientNorms(every=0, rounds=[2]).records(r)] == [2]


# ---- through the engine -----------------------------------------------------------------------


def test_curves_are_the_mean_over_clients_of_each_step(tmp_path):
    callback = GradientNorms()
    run = make_run(tmp_path / "run", [callback], rounds=2)
    naive = NaiveNorms(SMALL_CNN(10, (1, 8, 8)).layer_map())
    run.callbacks.insert(0, naive)
    fed, metrics = run_rounds(run, 2)
    steps = {c: len(s) for c, s in naive.steps.items()}
    # the Dirichlet split gives the clients different sizes, hence different step counts
    assert len(set(steps.values())) > 1
    assert callback.curves.grad_norm.shape == (2, 6, max(steps.values()))
    assert callback.curves.rows == [*LAYERS, "total"]
    curves = callback.curves
    # round 2 only (naive.steps holds the last round of each client)
    for s in range(max(steps.values())):
        reached = [naive.steps[c][s] for c in naive.steps if steps[c] > s]
        for i, row in enumerate(curves.rows):
            grad = np.mean([r[row][0] for r in reached])
            update = np.mean([r[row][1] for r in reached])
            assert curves.grad_norm[1, i, s] == pytest.approx(grad, rel=1e-5)
            assert curves.update_norm[1, i, s] == pytest.approx(update, rel=1e-5)
            assert curves.clients[1, i, s] == len(reached)
    total = curves.grad_norm[1, -1]
    assert metrics[1]["gradnorm/first_step"] == total[0]
    assert metrics[1]["gradnorm/last_step"] == total[-1]
    assert metrics[1]["gradnorm/mean"] == pytest.approx(total.mean())
    assert metrics[1]["gradnorm/spike"] == pytest.approx(total[0] / np.median(total))
    assert metrics[1]["gradnorm/steps"] == max(steps.values())
    update = curves.update_norm[1, -1]
    assert metrics[1]["update_norm/first_step"] == update[0]
    # across the aggregation: round 2's first step over round 1's last step
    previous = curves.grad_norm[0, -1][curves.clients[0, -1] > 0]
    assert metrics[1]["gradnorm/jump"] == pytest.approx(total[0] / previous[-1])
    assert "gradnorm/jump" not in metrics[0]
    for i, layer in enumerate(LAYERS):
        assert metrics[1][f"layer/{layer}/step_grad_norm"] == pytest.approx(
            curves.grad_norm[1, i].mean()
        )
        assert metrics[1][f"layer/{layer}/step_update_norm"] == pytest.approx(
            curves.update_norm[1, i].mean()
        )


def test_frozen_layers_have_no_values_and_the_total_covers_the_trained_layer(tmp_path):
    callback = GradientNorms()
    _, metrics = run_rounds(make_run(tmp_path / "run", [OnlyLayer("fc2"), callback]), 1)
    curves = callback.curves
    fc2 = LAYERS.index("fc2")
    for i, layer in enumerate(LAYERS):
        if i == fc2:
            assert (curves.clients[0, i] == curves.clients[0, -1]).all()
            assert np.isfinite(curves.grad_norm[0, i]).all()
        else:  # frozen: no client trained it, NaN curves, no metric
            assert (curves.clients[0, i] == 0).all()
            assert np.isnan(curves.grad_norm[0, i]).all()
            assert np.isnan(curves.update_norm[0, i]).all()
            assert f"layer/{layer}/step_grad_norm" not in metrics[0]
    # the total covers the trainable parameters only: here exactly fc2's
    assert np.array_equal(curves.grad_norm[0, fc2], curves.grad_norm[0, -1])
    assert np.array_equal(curves.update_norm[0, fc2], curves.update_norm[0, -1])
    assert metrics[0]["layer/fc2/step_grad_norm"] > 0


def test_update_norm_is_lr_times_grad_norm_for_plain_sgd(tmp_path):
    callback = GradientNorms()
    sgd = partial(torch.optim.SGD, lr=0.05)
    run_rounds(make_run(tmp_path / "run", [callback], rounds=2, optimizer=sgd), 2)
    curves = callback.curves
    taken = curves.clients > 0
    assert taken.any()
    np.testing.assert_allclose(curves.update_norm[taken], 0.05 * curves.grad_norm[taken], rtol=1e-5)


def test_the_callback_does_not_change_training(tmp_path):
    plain_fed, plain = run_rounds(make_run(tmp_path / "plain", []), 1)
    measured_fed, measured = run_rounds(make_run(tmp_path / "measured", [GradientNorms()]), 1)
    assert plain[0]["train/loss"] == measured[0]["train/loss"]
    assert plain[0]["test/acc"] == measured[0]["test/acc"]
    for (name, a), (_, b) in zip(
        plain_fed.global_model.state_dict().items(),
        measured_fed.global_model.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name


def test_unrecorded_rounds_cost_nothing_and_max_steps_caps(tmp_path):
    callback = GradientNorms(every=2, max_steps=3, per_layer=False)
    fed = start(make_run(tmp_path / "run", [callback], rounds=2))
    calls = []
    metrics = []
    for r in (1, 2):
        before = fed.comm.calls
        metrics.append(run_round(fed, r))
        calls.append(fed.comm.calls - before)
        if r == 1:  # nothing was kept for the unrecorded round
            assert callback._sums is None and callback._meters == {}
    assert calls[1] == calls[0] + 1  # one all-reduce, in the recorded round only
    assert not any(k.startswith(("gradnorm/", "update_norm/")) for k in metrics[0])
    assert metrics[1]["gradnorm/steps"] == 3
    assert "gradnorm/jump" not in metrics[1]  # round 1 was not recorded
    assert not any(k.startswith("layer/") for k in metrics[1])
    assert callback.curves.rows == ["total"]
    assert callback.curves.grad_norm.shape == (1, 1, 3)
    assert callback.curves.rounds.tolist() == [2]


def test_state_dict_round_trip_keeps_the_history(tmp_path):
    first = GradientNorms()
    run_rounds(make_run(tmp_path / "first", [first], rounds=2), 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain tensors, lists and dicts only
    resumed = GradientNorms()
    fed = start(make_run(tmp_path / "resumed", [resumed], rounds=3))
    resumed.load_state_dict(state)
    for name in ("grad_norm", "update_norm", "clients", "rounds"):
        np.testing.assert_array_equal(getattr(resumed.curves, name), getattr(first.curves, name))
    run_round(fed, 3)
    assert resumed.curves.rounds.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(resumed.curves.grad_norm[:2], first.curves.grad_norm)


def test_fit_writes_the_curves_and_the_plots(tmp_path):
    fit(make_run(tmp_path / "a", [GradientNorms()], rounds=2))
    fit(make_run(tmp_path / "b", [OnlyLayer("fc1"), GradientNorms()], rounds=2))
    for run in ("a", "b"):
        assert (tmp_path / run / "plots" / "gradnorm_steps.png").stat().st_size > 10_000
        assert (tmp_path / run / "plots" / "gradnorm_layers.png").stat().st_size > 10_000
    curves = GradNormCurves.load(tmp_path / "a" / FILENAME)
    assert curves.rounds.tolist() == [1, 2] and curves.rows == [*LAYERS, "total"]
    out = tmp_path / "compare.png"
    runs = [tmp_path / "a", tmp_path / "b", tmp_path / "nothing"]
    assert plot_gradnorm_comparison(runs, ["full", "fc1", "none"], out) == out
    assert out.stat().st_size > 10_000
    assert plot_gradnorm_comparison([tmp_path / "nothing"], ["none"], tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="2 run directories but 1 labels"):
        plot_gradnorm_comparison(runs[:2], ["full"], out)


# ---- two ranks ----------------------------------------------------------------------------------


def rank_run(run_dir):
    run = make_run(run_dir, [GradientNorms()], rounds=2)
    run.logger.plots = False
    return run


def _rank_worker(rank, port, run_dir):
    join_as_torchrun_rank(rank, port)
    fit(rank_run(run_dir))


@pytest.mark.multiprocess
def test_two_ranks_save_the_same_curves_as_one(tmp_path):
    mp.spawn(_rank_worker, args=(free_port(), tmp_path / "two"), nprocs=2, join=True)
    fit(rank_run(tmp_path / "one"))
    one = GradNormCurves.load(tmp_path / "one" / FILENAME)
    two = GradNormCurves.load(tmp_path / "two" / FILENAME)
    assert one.rows == two.rows
    for name in ("rounds", "grad_norm", "update_norm", "clients"):
        # bit for bit: float32 values summed in float64 are exact in any order
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    assert (one.clients[:, -1, 0] == 4).all()  # all 4 clients, 2 on each rank
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
