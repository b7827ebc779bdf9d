"""The layer-peeled probe on real digits runs: it reads models without changing them or training,
reduces its numbers in one collective, logs and draws them, and agrees across rank counts."""

from functools import partial

import pytest
import torch
import yaml
from test_engine import make_run

from callbacks.probes import LayerPeeledProbe, plan_taps
from conftest import ROOT
from fedlit.engine import fit, prepare, run_round
from fedlit.loggers import read_metrics
from fedlit.models import VGG11

# a small VGG with BatchNorm: conv1 (8 channels), conv2 (16), fc
TINY_VGG = partial(VGG11, cfg=(8, "M", 16, "M"))


def prepared(tmp_path, probe, **kwargs):
    fed = prepare(make_run(tmp_path, callbacks=[probe] if probe else [], **kwargs))
    if probe is not None:
        probe.on_fit_start(context=fed.context)  # train() calls it; prepare() + run_round do not
    return fed


def hooks(model):
    return [
        (name, kind)
        for name, module in model.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")
        if getattr(module, kind)
    ]


def test_taps_of_the_tiny_vgg(tmp_path):
    model = TINY_VGG(10, (1, 8, 8))
    taps, classifier = plan_taps(model, model.layer_map(), (1, 8, 8), 10)
    assert classifier == "fc.weight"
    # conv1's feature is read after its ReLU and pool; conv2's is the classifier's input
    assert [(t.layer, t.module, t.dim, t.read_input, t.next_weight) for t in taps] == [
        ("conv1", "body.pool1", 8, False, "body.conv2.weight"),
        ("conv2", "fc", 64, True, "fc.weight"),
    ]
    assert hooks(model) == []


def test_probing_a_client_leaves_its_model_and_rng_untouched(tmp_path):
    probe = LayerPeeledProbe(samples=40, batch_size=16)
    fed = prepared(tmp_path, probe, rounds=1, model=TINY_VGG, personal_eval=False)
    model = fed.working
    fed.load_client_model(2, into=model)
    model.train()
    model.body.bn2.eval()  # a mix of modes must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    probe.on_round_start(round=1, clients=list(range(6)))
    probe.on_client_end(round=1, client=2, model=model)

    assert probe._round_state.local[2]  # it did measure
    assert hooks(model) == [] and hooks(probe._probe_model) == []
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running statistics included
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_the_probe_does_not_change_training_and_reduces_once_per_probed_round(tmp_path):
    kwargs = dict(rounds=3, model=TINY_VGG, buffers="local", personal_eval=False)
    probe = LayerPeeledProbe(every=2, samples=64)
    with_probe = prepared(tmp_path / "a", probe, **kwargs)
    without = prepared(tmp_path / "b", None, **kwargs)
    for round_idx in (1, 2, 3):
        metrics = run_round(with_probe, round_idx)
        run_round(without, round_idx)
        assert any(k.startswith("layer/conv1/probe/") for k in metrics) == (round_idx == 2)
    for key, value in with_probe.global_model.state_dict().items():
        assert torch.equal(value, without.global_model.state_dict()[key]), key
    # round 2 was the only probed round: one extra all-reduce in the whole run
    assert with_probe.comm.calls == without.comm.calls + 1
    assert hooks(with_probe.working) == [] and hooks(with_probe.global_model) == []
    assert [entry["round"] for entry in probe.history] == [2]


def test_relative_change_is_zero_when_the_aggregate_is_the_local_model(tmp_path):
    # one client per round and averaged buffers: the weighted average of one model is that
    # model, bit for bit (n * w is exact in float64), so every number is the same on both sides
    probe = LayerPeeledProbe(samples=64)
    fed = prepared(tmp_path, probe, rounds=1, clients_per_round=1, personal_eval=False)
    metrics = run_round(fed, 1)
    changes = {k: v for k, v in metrics.items() if k.endswith("_rel_change")}
    assert len(changes) >= 4 * 3 * 2  # 4 layers, at least 3 metrics each, 2 splits
    assert set(changes.values()) == {0.0}
    for key, value in metrics.items():
        if key.endswith("_local"):
            assert metrics[key.removesuffix("_local") + "_global"] == value
    assert metrics["probe/clients"] == 1


def test_probe_metrics_and_plots_of_a_short_run(tmp_path):
    probe = LayerPeeledProbe(every=1, clients=3, samples=48, linear_probe=True)
    run = make_run(tmp_path, rounds=2, callbacks=[probe], personal_eval=False)
    fit(run)
    records = read_metrics(run.run_dir / "metrics.jsonl")
    assert [r["probe/clients"] for r in records] == [3, 3]
    last = records[-1]
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        for split in ("train", "test"):
            for suffix in ("local", "global", "rel_change"):
                assert f"layer/{layer}/probe/{split}_ratio_{suffix}" in last
                assert last[f"layer/{layer}/probe/{split}_var_w_local"] >= 0
    # the classifier itself is not a feature layer; cosine only at the penultimate layer
    assert not any(k.startswith("layer/fc3/") for k in last)
    assert "layer/fc2/probe/train_cls_cos_local" in last
    assert "layer/fc1/probe/train_cls_cos_local" not in last
    for layer in ("conv1", "fc2"):  # the read-out is fitted on train, scored on test
        assert 0.0 <= last[f"layer/{layer}/probe/test_probe_acc_local"] <= 1.0
        assert f"layer/{layer}/probe/train_probe_acc_local" not in last
    assert "probe/penultimate_ratio_rel_change" in last and last["probe/seconds"] > 0
    for name in ("probe_cfd.png", "probe_cfd_rounds.png"):
        assert (run.run_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # history round-trips through state_dict
    restored = LayerPeeledProbe()
    restored.load_state_dict(probe.state_dict())
    assert restored.history == probe.history and len(probe.history) == 2


def test_an_unscheduled_probe_does_nothing(tmp_path):
    probe = LayerPeeledProbe(every=0)
    fed = prepared(tmp_path, probe, rounds=1, personal_eval=False)
    metrics = run_round(fed, 1)
    assert probe._probe_model is None and probe._taps == []
    assert not any("probe" in k for k in metrics) and probe.history == []
    assert fed.comm.calls == 2  # the aggregation and the evaluation only


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": -1}, "LayerPeeledProbe.every must be >= 0"),
        ({"clients": 0}, "LayerPeeledProbe.clients must be >= 1"),
        ({"clients": []}, "LayerPeeledProbe.clients must be null"),
        ({"samples": 0}, "LayerPeeledProbe.samples must be >= 1"),
        ({"splits": ("train", "val")}, "LayerPeeledProbe.splits must be distinct entries"),
        ({"ridge": 0.0}, "LayerPeeledProbe.ridge must be > 0"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerPeeledProbe(**kwargs)


# -m slow: the default suite checks 2-rank metrics on FedAvg, MOON, SCAFFOLD and FedPart
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_give_the_same_probe_numbers_as_one(cli, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(rounds=2, eval_every=1, personal_eval=False, cpu_threads=1)
    config["callbacks"] = [
        {"class_path": "callbacks.probes.LayerPeeledProbe", "init_args": {"clients": 4}}
    ]
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = []
    for devices in (1, 2):
        run_dir = tmp_path / f"ranks{devices}"
        result = cli(
            "fit", "--config", str(path), "--run_dir", str(run_dir),
            "--trainer.devices", str(devices), "--logger.quiet", "true",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(read_metrics(run_dir / "metrics.jsonl"))
    one, two = runs
    for a, b in zip(one, two, strict=True):
        probe_keys = {k for k in a if "/probe/" in k}
        assert probe_keys and probe_keys == {k for k in b if "/probe/" in k}
        # same clients, samples and models; only the order of the float64 sum over ranks differs
        for key in probe_keys:
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
        assert a["probe/clients"] == b["probe/clients"] == 4
