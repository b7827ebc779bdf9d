"""LayerInertia: per-layer distances to a reference round, per-round change, gradient norms."""

import math
from functools import partial

import pytest
import torch

from callbacks.inertia import (
    LayerInertia,
    distances_to,
    heatmap_grid,
    measured_tensors,
    relative_change,
)
from fedlit.engine import fit, run_round
from fedlit.loggers import read_metrics
from fedlit.models import CNN, VGG11, ResNet8
from runs import OnlyLayer, start, tiny_run

TINY_VGG = partial(VGG11, cfg=(4, "M", 8, "M", 8, "M"))


def make_run(tmp_path, callbacks, rounds=3, model=TINY_VGG, **trainer):
    return tiny_run(tmp_path / "run", model=model, callbacks=callbacks, rounds=rounds, **trainer)


def test_distances_by_hand():
    current = torch.tensor([3.0, 4.0], dtype=torch.float64)
    reference = torch.tensor([0.0, 5.0], dtype=torch.float64)
    cosine, l1, l2 = distances_to(current, reference).tolist()
    assert cosine == pytest.approx(20 / 25)  # (0 * 3 + 4 * 5) / (5 * 5)
    assert l1 == pytest.approx(3 + 1)
    assert l2 == pytest.approx(math.sqrt(10))
    assert relative_change(current, reference).item() == pytest.approx(math.sqrt(10) / 5)
    assert distances_to(current, current).tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_measured_tensors_are_conv_and_linear_weights():
    model = ResNet8(10)
    names = measured_tensors(model, model.layer_map(), "weights")
    assert names["stem"] == ["stem.conv.weight"]
    assert names["s2.downsample"] == ["s2.downsample.conv.weight"]
    assert names["fc"] == ["fc.weight"]
    assert len(names) == 10
    everything = measured_tensors(model, model.layer_map(), "params")
    assert everything["fc"] == ["fc.weight", "fc.bias"]
    assert everything["stem"] == ["stem.conv.weight", "stem.bn.weight", "stem.bn.bias"]


class Snapshots:
    """Copies the global model after every round, and each client's last-minibatch gradient
    norms per layer, to recompute the metrics independently."""

    def __init__(self, names):
        self.names = names
        self.models = {}
        self.grad_norms = {}

    def on_fit_start(self, context):
        model = context.global_model
        self.model = model
        self.models[0] = {k: v.detach().clone() for k, v in model.named_parameters()}

    def on_client_end(self, round, model):
        params = dict(model.named_parameters())
        norms = {
            layer: torch.cat([params[n].grad.reshape(-1) for n in names]).norm().item()
            for layer, names in self.names.items()
        }
        self.grad_norms.setdefault(round, []).append(norms)

    def on_round_end(self, round):
        self.models[round] = {k: v.detach().clone() for k, v in self.model.named_parameters()}


class CommCalls:
    """The federation's collective count when on_round_end reaches this callback."""

    def __init__(self):
        self.calls = []

    def on_fit_start(self, context):
        self.comm = context.comm

    def on_round_end(self):
        self.calls.append(self.comm.calls)


def vector(state, names):
    return torch.cat([state[n].reshape(-1) for n in names]).double()


def test_metrics_match_an_independent_computation(tmp_path):
    probe = TINY_VGG(10, (1, 8, 8))
    names = measured_tensors(probe, probe.layer_map(), "weights")
    assert list(names) == ["conv1", "conv2", "conv3", "fc"]
    inertia = LayerInertia(reference_round=2)
    snapshots = Snapshots(names)
    before, after = CommCalls(), CommCalls()
    fed = start(make_run(tmp_path, [before, inertia, after, snapshots]))
    metrics = [run_round(fed, r) for r in (1, 2, 3)]

    # before the reference round: the per-round change only
    assert "layer/conv2/cosine_to_ref" not in metrics[0]
    assert "layer/conv2/rel_change" in metrics[0]
    # at the reference round: identical to the reference
    for layer in names:
        assert metrics[1][f"layer/{layer}/cosine_to_ref"] == pytest.approx(1.0, abs=1e-12)
        assert metrics[1][f"layer/{layer}/l1_to_ref"] == 0.0
        assert metrics[1][f"layer/{layer}/l2_to_ref"] == 0.0
    # after it: recomputed from the snapshots
    models = snapshots.models
    for layer, tensors in names.items():
        w1, w2, w3 = (vector(models[r], tensors) for r in (1, 2, 3))
        m = metrics[2]
        assert m[f"layer/{layer}/cosine_to_ref"] == pytest.approx(
            (torch.dot(w3, w2) / (w3.norm() * w2.norm())).item(), rel=1e-9
        )
        assert m[f"layer/{layer}/l1_to_ref"] == pytest.approx((w3 - w2).abs().sum().item())
        assert m[f"layer/{layer}/l2_to_ref"] == pytest.approx((w3 - w2).norm().item())
        assert m[f"layer/{layer}/rel_change"] == pytest.approx(
            ((w3 - w2).norm() / w2.norm()).item()
        )
        assert metrics[1][f"layer/{layer}/rel_change"] == pytest.approx(
            ((w2 - w1).norm() / w1.norm()).item()
        )
        w0 = vector(models[0], tensors)
        assert metrics[0][f"layer/{layer}/rel_change"] == pytest.approx(
            ((w1 - w0).norm() / w0.norm()).item()
        )
        for r in (1, 2, 3):
            per_client = [n[layer] for n in snapshots.grad_norms[r]]
            assert len(per_client) == 4
            assert metrics[r - 1][f"layer/{layer}/grad_norm"] == pytest.approx(
                sum(per_client) / 4, rel=1e-6
            )
    assert [h["round"] for h in inertia.history] == [1, 2, 3]
    # the gradient norms of a round: one all-reduce, in on_round_end
    assert [a - b for a, b in zip(after.calls, before.calls, strict=True)] == [1, 1, 1]


def test_reference_round_zero_is_the_initial_model(tmp_path):
    inertia = LayerInertia(reference_round=0)
    snapshots = Snapshots({"fc": ["fc.weight"]})
    fed = start(make_run(tmp_path, [inertia, snapshots], rounds=1))
    metrics = run_round(fed, 1)
    w0, w1 = (vector(snapshots.models[r], ["fc.weight"]) for r in (0, 1))
    assert metrics["layer/fc/l2_to_ref"] == pytest.approx((w1 - w0).norm().item())
    assert metrics["layer/fc/l2_to_ref"] > 0


def test_every_and_frozen_layers(tmp_path):
    inertia = LayerInertia(reference_round=1, every=2)
    fed = start(make_run(tmp_path, [OnlyLayer("conv2"), inertia], rounds=3))
    metrics = [run_round(fed, r) for r in (1, 2, 3)]
    # measured on rounds divisible by 2 and on the last round
    assert not any(k.startswith("layer/") for k in metrics[0])
    assert [h["round"] for h in inertia.history] == [2, 3]
    # only conv2 trained: the others did not move and have no gradient norm
    assert metrics[1]["layer/conv1/rel_change"] == 0.0
    assert metrics[1]["layer/conv1/cosine_to_ref"] == pytest.approx(1.0, abs=1e-12)
    assert metrics[1]["layer/conv2/rel_change"] > 0
    assert "layer/conv1/grad_norm" not in metrics[1]
    assert metrics[1]["layer/conv2/grad_norm"] > 0


def test_short_run_writes_metric_keys_and_heat_maps(tmp_path):
    run = make_run(
        tmp_path, [LayerInertia(reference_round=1)], rounds=3, model=partial(CNN, padding=2)
    )
    fit(run)
    records = read_metrics(run.run_dir / "metrics.jsonl")
    layers = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for record in records:
        for layer in layers:
            for metric in ("rel_change", "grad_norm", "cosine_to_ref", "l1_to_ref", "l2_to_ref"):
                assert isinstance(record[f"layer/{layer}/{metric}"], float)
    assert records[0]["layer/fc3/cosine_to_ref"] == pytest.approx(1.0, abs=1e-12)
    assert records[-1]["layer/fc3/cosine_to_ref"] < 1.0
    for name in ("inertia_cosine.png", "inertia_rel_change.png", "inertia_grad_norm.png"):
        assert (run.run_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_heatmap_grid_leaves_missing_values_blank():
    history = [
        {"round": 2, "layer/a/cosine_to_ref": 1.0},
        {"round": 4, "layer/a/cosine_to_ref": 0.5, "layer/b/cosine_to_ref": 0.25},
    ]
    rounds, grid = heatmap_grid(history, ["a", "b"], "cosine_to_ref")
    assert rounds.tolist() == [2.0, 4.0]
    assert grid[0].tolist() == [1.0, 0.5]
    assert math.isnan(grid[1, 0]) and grid[1, 1] == 0.25


def test_state_dict_round_trip(tmp_path):
    inertia = LayerInertia(reference_round=1)
    fed = start(make_run(tmp_path, [inertia], rounds=2))
    run_round(fed, 1)
    state = inertia.state_dict()
    assert set(state["reference"]) == {"conv1", "conv2", "conv3", "fc"}
    restored = LayerInertia(reference_round=1)
    restored.load_state_dict(state)
    assert torch.equal(restored.state_dict()["previous"]["fc"], state["previous"]["fc"])
    assert restored.history == inertia.history


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reference_round": -1}, "LayerInertia.reference_round must be >= 0"),
        ({"every": 0}, "LayerInertia.every must be an integer >= 1"),
        ({"include": "biases"}, "LayerInertia.include must be 'weights' or 'params'"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerInertia(**kwargs)
