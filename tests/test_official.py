"""Paper-faithful options: the official codes' initialisations, normalisation, FedMR's capped
Dirichlet split and LIPS's sparsity timing."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from callbacks.sparsity import TransientSparsity, eligible_tensors
from fedlit.algorithms import FedAvg
from fedlit.data.config import DataConfig
from fedlit.data.datasets import load_dataset
from fedlit.data.device import DeviceData
from fedlit.data.partition import PartitionError, dirichlet, dirichlet_capped
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import CNN, VGG11, VGG16, ResNet8, ResNet20
from runs import tiny_run

ROOT = Path(__file__).resolve().parents[1]

# ---- initialisation ---------------------------------------------------------------------------


def conv_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize(
    ("cls", "bn_weight", "linear_std"),
    [(ResNet8, 1.0, None), (VGG11, 1.0, 0.01), (ResNet20, 0.5, None)],
)
def test_official_init_is_he_fan_out_with_the_papers_bn_and_linear(cls, bn_weight, linear_std):
    torch.manual_seed(0)
    model = cls(10, (3, 32, 32), init="official")
    for weight in conv_weights(model):
        fan_out = weight.shape[0] * weight[0, 0].numel()
        expected = math.sqrt(2.0 / fan_out)
        assert abs(weight.std().item() / expected - 1) < 0.2, weight.shape
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == bn_weight) and torch.all(module.bias == 0)
        if isinstance(module, nn.Conv2d) and module.bias is not None:
            assert torch.all(module.bias == 0)
    fc = model.fc
    if linear_std is None:  # PyTorch's default: uniform within 1/sqrt(fan_in)
        assert fc.weight.abs().max() <= 1 / math.sqrt(fc.in_features)
        assert fc.bias.abs().max() > 0
    else:
        assert abs(fc.weight.std().item() / linear_std - 1) < 0.1
        assert torch.all(fc.bias == 0)


@pytest.mark.parametrize("cls", [CNN, VGG11, VGG16, ResNet8, ResNet20])
def test_default_init_is_unchanged(cls):
    torch.manual_seed(3)
    plain = cls(10, (3, 32, 32)).state_dict()
    torch.manual_seed(3)
    named = cls(10, (3, 32, 32), init="pytorch").state_dict()
    assert all(torch.equal(v, named[k]) for k, v in plain.items())
    with pytest.raises(ValueError, match="model init must be one of"):
        cls(10, (3, 32, 32), init="kaiming")


def test_official_init_of_fedmr_models_is_pytorchs():
    for cls in (CNN, VGG16):
        torch.manual_seed(1)
        plain = cls(10, (3, 32, 32)).state_dict()
        torch.manual_seed(1)
        official = cls(10, (3, 32, 32), init="official").state_dict()
        assert all(torch.equal(v, official[k]) for k, v in plain.items())


# ---- normalisation ----------------------------------------------------------------------------


def test_explicit_normalisation_replaces_the_dataset_statistics():
    bundle = load_dataset(DataConfig())
    data = DeviceData(bundle, torch.device("cpu"), mean=[0.5], std=[0.5])
    x, _ = next(data.eval_batches("test", None, 16))
    raw = bundle.test.x[:16].float() / 255.0
    assert torch.allclose(x, (raw - 0.5) / 0.5, atol=1e-6)
    plain = DeviceData(bundle, torch.device("cpu"), normalize=False)
    assert torch.allclose(next(plain.eval_batches("test", None, 16))[0], raw, atol=1e-7)
    with pytest.raises(ValueError, match=r"data.norm_mean has 3 values; digits images have 1"):
        DeviceData(bundle, torch.device("cpu"), mean=[0.5, 0.5, 0.5], std=[0.5])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(norm_mean=[0.5]), "go together"),
        (dict(norm_mean=[0.5], norm_std=[0.0]), "norm_std value > 0"),
        (dict(norm_mean=[0.5], norm_std=[0.5], normalize=False), "need data.normalize true"),
        (dict(norm_mean=[0.5], norm_std=[0.5], dataset="synthetic"), "feature vectors"),
    ],
)
def test_normalisation_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**settings)


# ---- FedMR's capped Dirichlet split -----------------------------------------------------------


def test_capped_dirichlet_gives_no_later_class_to_a_full_client():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 500)
    rng.shuffle(labels)
    clients = 20
    parts = dirichlet_capped(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(labels)))  # a partition
    assert min(len(p) for p in parts) >= 10
    counts = np.stack([np.bincount(labels[p], minlength=10) for p in parts])
    cap = len(labels) / clients
    held = np.zeros(clients)
    for c in range(10):  # classes are dealt in order; full clients get none of class c
        assert np.all(counts[held >= cap, c] == 0), c
        held += counts[:, c]
    # the cap keeps the largest client far below the uncapped rule's
    uncapped = dirichlet(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert max(len(p) for p in parts) < max(len(p) for p in uncapped)
    again = dirichlet_capped(labels, clients, 0.1, np.random.default_rng(1), min_samples=10)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_capped_dirichlet_fails_with_a_message_instead_of_looping():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(PartitionError, match="dirichlet_capped: 30 clients x data.min_samples"):
        dirichlet_capped(labels, 30, 0.1, np.random.default_rng(0), min_samples=10)
    with pytest.raises(PartitionError, match="could not give each of the 5 clients"):
        dirichlet_capped(labels, 5, 0.01, np.random.default_rng(0), min_samples=4, max_attempts=3)


def test_capped_dirichlet_is_a_partition_setting(tmp_path):
    data = DataConfig(num_clients=10, partition="dirichlet_capped", alpha=0.3, min_samples=10)
    fit(tiny_run(tmp_path, model=partial(CNN, padding=2), data=data, rounds=1))
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["test/acc"] > 0
    with pytest.raises(ValueError, match="data.samples_per_client is only used by"):
        DataConfig(partition="dirichlet_capped", samples_per_client=20)


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


# ---- the official configs ---------------------------------------------------------------------


def test_every_official_config_says_where_each_choice_comes_from():
    configs = sorted((ROOT / "configs" / "official").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        text = path.read_text()
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert len(header) >= 8, path.name
        assert "official" in text.lower()
        config = yaml.safe_load(text)
        assert config["model"]["init_args"]["init"] == "official", path.name
