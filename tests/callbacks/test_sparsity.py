"""TransientSparsity (LIPS): schedule, exact per-tensor zero counts, per-client masks."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from callbacks.sparsity import (
    TransientSparsity,
    density_at,
    eligible_tensors,
    is_scheduled,
    kept_count,
    zero_lowest,
)
from conftest import ROOT
from fedlit.algorithms import FedAvg
from fedlit.cli import main
from fedlit.data.config import DataConfig
from fedlit.engine import fit, run_round
from fedlit.loggers import read_metrics
from fedlit.models import CNN, VGG11, ResNet8
from runs import OnlyLayer, start, tiny_run

TINY_VGG = partial(VGG11, cfg=(4, "M", 8, "M", 8, "M"))
ELIGIBLE = {"body.conv2.weight": "conv2", "body.conv3.weight": "conv3"}


def make_run(tmp_path, callbacks, rounds=3, **trainer):
    return tiny_run(tmp_path / "run", model=TINY_VGG, callbacks=callbacks, rounds=rounds, **trainer)


def test_density_schedule():
    # official round i = fedlit round - 1; d_i = min(1, u + (1 - u) i / T)
    assert density_at(1, 300, 0.5) == 0.5
    assert density_at(6, 300, 0.5) == pytest.approx(0.5 + 0.5 * 5 / 300)
    assert density_at(151, 300, 0.3) == pytest.approx(0.65)
    assert density_at(296, 300, 0.3) == pytest.approx(0.3 + 0.7 * 295 / 300)
    assert density_at(301, 300, 0.5) == 1.0
    assert density_at(400, 300, 0.5) == 1.0
    assert [r for r in range(1, 17) if is_scheduled(r, 5)] == [1, 6, 11, 16]
    assert all(is_scheduled(r, 1) for r in range(1, 5))
    assert kept_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996
    assert kept_count(2400, 0.5 + 0.5 * 5 / 300) == math.floor(2400 * (0.5 + 0.5 / 60))
    assert kept_count(7, 1.0) == 7


def test_eligible_tensors_skip_stem_classifier_linear_bias_and_bn():
    vgg = TINY_VGG(10, (1, 8, 8))
    assert eligible_tensors(vgg, vgg.layer_map()) == ELIGIBLE
    cnn = CNN(10, (1, 8, 8), padding=2)
    assert eligible_tensors(cnn, cnn.layer_map()) == {"conv2.weight": "conv2"}
    resnet = ResNet8(10)
    assert list(eligible_tensors(resnet, resnet.layer_map())) == [
        "s1.conv1.weight",
        "s1.conv2.weight",
        "s2.conv1.weight",
        "s2.conv2.weight",
        "s2.downsample.conv.weight",
        "s3.conv1.weight",
        "s3.conv2.weight",
        "s3.downsample.conv.weight",
    ]


def test_zero_lowest_is_exact_with_ties():
    weight = torch.ones(10)
    zero_lowest(weight, torch.zeros(10), 0.35)  # keep floor(3.5) = 3
    assert weight.tolist() == [0.0] * 7 + [1.0] * 3
    weight = torch.arange(1.0, 9.0)
    scores = torch.tensor([5.0, 1.0, 1.0, 1.0, 9.0, 1.0, 7.0, 8.0])
    zero_lowest(weight, scores, 0.5)
    assert weight.tolist() == [1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 7.0, 8.0]


class Received:
    """After the sparsity callback (placed before it): what each client starts training from,
    the global model it was derived from, and each client's last-minibatch gradient."""

    def __init__(self):
        self.models = {}
        self.grads = {}

    def on_fit_start(self, context):
        self.global_model = context.global_model

    def on_client_start(self, round, client, model):
        self.models[round, client] = {
            "received": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "global": {k: v.detach().clone() for k, v in self.global_model.state_dict().items()},
        }

    def on_client_end(self, round, client, model):
        params = dict(model.named_parameters())
        self.grads[round, client] = {
            n: params[n].grad.clone() for n in ELIGIBLE if params[n].grad is not None
        }


def expected_mask(scores, density):
    keep = kept_count(scores.numel(), density)
    order = torch.sort(scores.reshape(-1), stable=True).indices
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[order[: scores.numel() - keep]] = False
    return mask.view_as(scores)


def test_exact_zeros_in_eligible_tensors_only_on_scheduled_rounds(tmp_path):
    received = Received()
    sparsity = TransientSparsity(period=2, initial_density=0.5, score="magnitude")
    fed = start(make_run(tmp_path, [sparsity, received], rounds=3))
    metrics = [run_round(fed, r) for r in (1, 2, 3)]
    for (round, client), seen in received.models.items():
        density = density_at(round, 3, 0.5) if round in (1, 3) else 1.0
        for name, tensor in seen["received"].items():
            original = seen["global"][name]
            if name not in ELIGIBLE or round == 2:
                assert torch.equal(tensor, original), (round, client, name)
                continue
            assert torch.count_nonzero(original) == original.numel()
            zeros = tensor.numel() - kept_count(tensor.numel(), density)
            assert int((tensor == 0).sum()) == zeros, (round, name)
            mask = expected_mask(original.abs(), density)
            assert torch.equal(tensor, original * mask)
    assert metrics[0]["sparsity/target_density"] == 0.5
    assert metrics[0]["sparsity/density"] == pytest.approx(0.5, abs=0.01)
    assert metrics[2]["sparsity/target_density"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert "sparsity/density" not in metrics[1]
    assert metrics[0]["layer/conv3/density"] == 288 / 576  # 8 * 8 * 3 * 3 weights


def test_grad_weight_masks_follow_each_clients_own_gradient(tmp_path):
    received = Received()
    sparsity = TransientSparsity(period=2, initial_density=0.5, score="grad_weight")
    fed = start(make_run(tmp_path, [sparsity, received], rounds=3))
    metrics = [run_round(fed, r) for r in (1, 2, 3)]
    masks = {}
    for client in range(4):
        first, third = received.models[1, client], received.models[3, client]
        for name in ELIGIBLE:
            # first participation: no gradient yet, |w| decides
            w = first["global"][name]
            assert torch.equal(first["received"][name], w * expected_mask(w.abs(), 0.5))
            # later: |g * w| with the client's last minibatch gradient of round 2
            w = third["global"][name]
            density = density_at(3, 3, 0.5)
            mask = expected_mask((received.grads[2, client][name] * w).abs(), density)
            assert torch.equal(third["received"][name], w * mask)
            masks[client, name] = mask
    for name in ELIGIBLE:
        assert not torch.equal(masks[0, name], masks[1, name])
        assert not torch.equal(masks[2, name], masks[3, name])
    assert metrics[0]["sparsity/grad_scored"] == 0.0
    assert metrics[2]["sparsity/grad_scored"] == 1.0


def test_random_scores_are_per_client_and_reproducible(tmp_path):
    def masks(path):
        received = Received()
        fed = start(make_run(path, [TransientSparsity(score="random"), received], rounds=1))
        run_round(fed, 1)
        return {c: received.models[1, c]["received"]["body.conv3.weight"] != 0 for c in range(4)}

    first, second = masks(tmp_path / "a"), masks(tmp_path / "b")
    assert all(torch.equal(first[c], second[c]) for c in range(4))
    assert not torch.equal(first[0], first[1])
    assert all(int(m.sum()) == 288 for m in first.values())


def test_frozen_layers_are_left_dense(tmp_path):
    received = Received()
    callbacks = [OnlyLayer("conv2"), TransientSparsity(score="magnitude"), received]
    fed = start(make_run(tmp_path, callbacks, rounds=1))
    metrics = run_round(fed, 1)
    seen = received.models[1, 0]
    assert torch.equal(seen["received"]["body.conv3.weight"], seen["global"]["body.conv3.weight"])
    assert int((seen["received"]["body.conv2.weight"] == 0).sum()) == 4 * 8 * 9 // 2
    assert "layer/conv3/density" not in metrics and metrics["sparsity/density"] == 0.5


def test_stored_gradients_are_client_state_a_resumed_run_gets_back(tmp_path):
    sparsity = TransientSparsity(period=2)
    fed = start(make_run(tmp_path, [sparsity], rounds=2))
    run_round(fed, 1)
    saved = fed.context.state.state_dict()
    grads = saved["sparsity/grads"]
    assert sorted(grads) == [0, 1, 2, 3]
    assert set(grads[0]) == set(ELIGIBLE)
    restored = TransientSparsity(period=2)
    resumed = start(make_run(tmp_path / "resumed", [restored], rounds=2))
    resumed.context.state.load_state_dict(saved, resumed.context.owns)
    for client, tensors in grads.items():
        for name, tensor in tensors.items():
            assert torch.equal(restored._grads.get(client)[name], tensor)


def test_metrics_in_a_short_run(tmp_path):
    run = make_run(tmp_path, [TransientSparsity(period=2, initial_density=0.3)], rounds=3)
    fit(run)
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [("sparsity/density" in r) for r in records] == [True, False, True]
    assert records[0]["sparsity/target_density"] == pytest.approx(0.3)
    assert records[2]["sparsity/density"] == pytest.approx(0.3 + 0.7 * 2 / 3, abs=0.01)
    assert records[-1]["test/acc"] > 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"period": 0}, "TransientSparsity.period must be an integer >= 1"),
        ({"initial_density": 0.0}, r"TransientSparsity.initial_density must be in \(0, 1\]"),
        ({"initial_density": 1.5}, r"TransientSparsity.initial_density must be in \(0, 1\]"),
        ({"score": "taylor"}, "TransientSparsity.score must be one of"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransientSparsity(**kwargs)


def quickstart_with_lips(tmp_path, devices):
    """The demo config (digits, CNN, 10 clients) with both LIPS callbacks, on `devices` ranks."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    run_dir = tmp_path / f"ranks{devices}"
    config["run_dir"] = str(run_dir)
    config["trainer"].update(rounds=3, devices=devices, accelerator="cpu", cpu_threads=1)
    config["callbacks"] = [
        {"class_path": "callbacks.sparsity.TransientSparsity", "init_args": {"period": 2}},
        {"class_path": "callbacks.inertia.LayerInertia", "init_args": {"reference_round": 1}},
    ]
    config["logger"] = {"quiet": True, "wandb": {"mode": "disabled"}}
    path = tmp_path / f"config{devices}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, run_dir


# -m slow: the default suite checks 2-rank metrics on FedAvg, MOON, SCAFFOLD and FedPart
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_log_what_one_rank_logs(cli, tmp_path):
    """Per-client gradients stay on their owner's rank and the per-rank sums of both callbacks
    are reduced across ranks: 1 and 2 ranks log the same LIPS metrics."""
    records = {}
    for devices in (1, 2):
        config, run_dir = quickstart_with_lips(tmp_path, devices)
        if devices == 1:  # in this process, through the same CLI entry point
            main(["fit", "--config", str(config)])
        else:
            result = cli("fit", "--config", str(config))
            assert result.returncode == 0, result.stderr[-3000:]
        records[devices] = read_metrics(run_dir / "metrics.jsonl")
    lips_keys = [k for k in records[1][-1] if k.startswith(("layer/", "sparsity/"))]
    assert "layer/conv2/grad_norm" in lips_keys and "sparsity/grad_scored" in lips_keys
    for one, two in zip(records[1], records[2], strict=True):
        assert {k for k in one if k.startswith(("layer/", "sparsity/"))} == {
            k for k in two if k.startswith(("layer/", "sparsity/"))
        }
        for key in one:
            if key.startswith(("layer/", "sparsity/")):
                assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key
    assert (tmp_path / "ranks2" / "plots" / "inertia_cosine.png").exists()


# ---- LIPS's official timing -------------------------------------------------------------------

TINY_VGG = partial(VGG11, cfg=(4, "M", 8, "M", 8, "M"))


class Density:
    """Density of the eligible weights each client starts training with, per round."""

    def __init__(self) -> None:
        self.seen: dict[int, list[float]] = {}

    def on_fit_start(self, context) -> None:
        self.eligible = list(eligible_tensors(context.global_model, context.layers))

    def on_client_start(self, round: int, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        kept = sum(int(torch.count_nonzero(params[n])) for n in self.eligible)
        total = sum(params[n].numel() for n in self.eligible)
        self.seen.setdefault(round, []).append(kept / total)


def lips_run(tmp_path: Path, sparsity: TransientSparsity, density: Density):
    return tiny_run(
        tmp_path,
        model=TINY_VGG,
        algorithm=FedAvg(local=["bn_stats", "bn_affine", "bias"]),
        callbacks=[sparsity, density],
        rounds=4,
        personal_eval=True,
        data=DataConfig(
            num_clients=4, partition="dirichlet", min_samples=20,
            local_test="label_mix", local_test_size=20,
        ),
    )  # fmt: skip


def test_after_aggregation_sparsifies_the_model_trained_next_round_never_the_initial(tmp_path):
    sparsity = TransientSparsity(
        period=2, initial_density=0.5, timing="after_aggregation", horizon=100
    )
    density = Density()
    fit(lips_run(tmp_path, sparsity, density))
    mean = {r: sum(v) / len(v) for r, v in density.seen.items()}
    assert mean[1] == 1.0  # the initial model is never sparsified
    assert mean[2] == pytest.approx(0.5, abs=0.01)  # event of round 1: d = 0.5
    assert mean[3] == 1.0  # round 2 is no event (period 2: rounds 1, 3, ...)
    assert mean[4] == pytest.approx(0.5 + 0.5 * 2 / 100, abs=0.01)  # horizon 100, not 4
    metrics = {m["round"]: m for m in read_metrics(tmp_path / "metrics.jsonl")}
    assert "sparsity/target_density" not in metrics[1]
    assert metrics[2]["sparsity/target_density"] == 0.5
    assert metrics[4]["sparsity/target_density"] == pytest.approx(0.51)


def test_after_aggregation_evaluates_the_sparse_model_the_clients_receive(tmp_path):
    """Round 1's personalised accuracy after aggregation is that of the sparsified models: a
    run that sparsifies them differs from one that does not only from round 1's evaluation on."""
    runs = {}
    for timing in ("after_aggregation", "client_start"):
        sparsity = TransientSparsity(period=2, initial_density=0.2, timing=timing, horizon=100)
        fit(lips_run(tmp_path / timing, sparsity, Density()))
        runs[timing] = {m["round"]: m for m in read_metrics(tmp_path / timing / "metrics.jsonl")}
    after, start = runs["after_aggregation"], runs["client_start"]
    # client_start sparsified round 1's training, after_aggregation round 1's received model
    assert after[1]["personal/acc_local"] != start[1]["personal/acc_local"]
    plain_density = Density()
    fit(
        lips_run(
            tmp_path / "none", TransientSparsity(period=1000, initial_density=1.0), plain_density
        )
    )
    plain = {m["round"]: m for m in read_metrics(tmp_path / "none" / "metrics.jsonl")}
    assert after[1]["personal/acc_local"] == plain[1]["personal/acc_local"]  # same training
    assert after[1]["personal/acc_global"] != plain[1]["personal/acc_global"]  # sparse received


def test_sparsity_timing_and_horizon_are_checked():
    with pytest.raises(ValueError, match="timing must be one of"):
        TransientSparsity(timing="end")
    with pytest.raises(ValueError, match="horizon must be null"):
        TransientSparsity(horizon=0)
