"""Evaluation protocols of the global model's BatchNorm statistics (trainer.eval_bn) and the
tensors an algorithm keeps on its clients (algorithm.local)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import ROOT
from fedlit.algorithms import FedAvg, FedMR, FedProx
from fedlit.checkpoint import load_checkpoint
from fedlit.cli import main
from fedlit.comm import Communicator
from fedlit.compare import compare_runs
from fedlit.config import TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.data.datasets import load_dataset
from fedlit.data.device import DeviceData
from fedlit.engine import check_before_launch, fit
from fedlit.eval_bn import recalibrate, recalibration_indices, recalibration_shares
from fedlit.evaluation import evaluate_global
from fedlit.local_tensors import bn_stat_names, check_local, local_tensor_names
from fedlit.loggers import read_metrics
from fedlit.models import CNN, VGG11
from fedlit.protocols import Protocol, parse_protocols
from runs import fit_on_two_ranks, start, tiny_run

TINY_VGG = partial(VGG11, cfg=(4, "M", 8, "M", 8, "M"))
VGG_SPEC = '{"class_path": "fedlit.models.VGG11", "init_args": {"cfg": [4, "M", 8, "M", 8, "M"]}}'
PROTOCOLS = ["averaged", "client:0", "recalibrated"]


# ---- parsing ----------------------------------------------------------------------------------


def test_protocols_parse_with_names_and_refuse_bad_entries():
    assert parse_protocols(["client:0", "averaged", "recalibrated"]) == [
        Protocol("client", 0),
        Protocol("averaged"),
        Protocol("recalibrated"),
    ]
    assert [p.name for p in parse_protocols(["client:12", "averaged"])] == ["client12", "averaged"]
    for bad, message in (
        ([], "non-empty list"),
        ("averaged", "non-empty list"),
        (["client0"], "'client:K'"),
        (["client:-1"], "'client:K'"),
        (["mean"], "'averaged'"),
        (["averaged", "averaged"], "more than once"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainerConfig(eval_bn=bad)


def test_a_client_protocol_must_name_an_existing_client(tmp_path):
    run = tiny_run(tmp_path, model=partial(CNN, padding=2), eval_bn=["client:4"])
    with pytest.raises(
        ValueError, match=r"client:4 names a client that does not exist; clients are 0..3"
    ):
        check_before_launch(run)


def test_recalibration_sample_is_proportional_bounded_and_seeded():
    assert recalibration_shares([100, 300, 600], 100) == [10, 30, 60]
    assert sum(recalibration_shares([7, 13, 29, 51], 37)) == 37
    assert recalibration_shares([5, 5], 1000) == [5, 5]  # the whole federation
    clients = [torch.arange(0, 40), torch.arange(40, 100), torch.arange(100, 200)]
    first = recalibration_indices(clients, 50, seed=0, round_idx=3, device=torch.device("cpu"))
    again = recalibration_indices(clients, 50, seed=0, round_idx=3, device=torch.device("cpu"))
    other = recalibration_indices(clients, 50, seed=0, round_idx=4, device=torch.device("cpu"))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(first) == 50 and len(set(first.tolist())) == 50
    assert [
        int(((first >= a) & (first < b)).sum()) for a, b in ((0, 40), (40, 100), (100, 200))
    ] == [10, 15, 25]


def test_recalibrate_gives_the_sample_statistics_and_leaves_the_rest_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.Flatten())
    model[1].momentum = 0.3
    x = torch.randn(16, 1, 6, 6)
    recalibrate(model, iter([x]))
    conv_out = model[0](x)
    assert torch.allclose(model[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-6)
    var = conv_out.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True)
    assert torch.allclose(model[1].running_var, var, atol=1e-5)
    assert model[1].momentum == 0.3 and not model.training  # restored, in eval mode
    # dropout stayed off: the forward pass is deterministic in eval mode
    assert torch.equal(model(x), model(x))


# ---- in a run ---------------------------------------------------------------------------------


class RecordClient:
    """Keeps client `client`'s BN statistics after each of its local trainings."""

    def __init__(self, client: int) -> None:
        self.client = client
        self.stats: dict[str, torch.Tensor] = {}

    def on_client_end(self, client: int, model: nn.Module) -> None:
        if client == self.client:
            self.stats = {n: b.detach().clone() for n, b in model.named_buffers()}


def bn_run(tmp_path, **trainer):
    trainer.setdefault("eval_bn", PROTOCOLS)
    return tiny_run(tmp_path, model=TINY_VGG, rounds=2, **trainer)


def test_client_protocol_equals_global_weights_with_the_clients_own_statistics(tmp_path):
    recorder = RecordClient(0)
    run = bn_run(tmp_path / "run", clients_per_round=2)
    run.callbacks = [recorder]
    fit(run)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert set(records[-1]) >= {"test/acc", "test/acc@client0", "test/acc@recalibrated"}
    # by hand: the final global weights with client 0's statistics from its last training
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["model"]
    model = TINY_VGG(10, (1, 8, 8))
    model.load_state_dict(state)
    assert recorder.stats, "client 0 trained at least once"
    model.load_state_dict({**state, **recorder.stats})
    data = DeviceData(load_dataset(DataConfig()), torch.device("cpu"))
    by_hand = evaluate_global(model, data, Communicator(1), 0, 1024, nullcontext)
    assert records[-1]["test/acc@client0"] == by_hand["test/acc"]
    assert records[-1]["test/loss@client0"] == by_hand["test/loss"]
    # the protocols really differ on a BN model, and the summary carries each
    assert records[-1]["test/loss@client0"] != records[-1]["test/loss"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval_bn"] == "averaged"
    assert summary["final_test_acc@recalibrated"] == records[-1]["test/acc@recalibrated"]
    assert summary["best_test_acc@client0"] == max(r["test/acc@client0"] for r in records)


def test_recalibrated_is_deterministic_and_the_first_protocol_gives_test_acc(tmp_path):
    fit(bn_run(tmp_path / "a"))
    fit(bn_run(tmp_path / "b", eval_bn=["recalibrated", "averaged"]))
    a = read_metrics(tmp_path / "a" / "metrics.jsonl")
    b = read_metrics(tmp_path / "b" / "metrics.jsonl")
    for x, y in zip(a, b, strict=True):
        assert x["test/acc@recalibrated"] == y["test/acc"]
        assert x["test/loss@recalibrated"] == y["test/loss"]
        assert x["test/loss"] == y["test/loss@averaged"]
    assert a[-1]["test/loss@recalibrated"] != a[-1]["test/loss"]


def test_without_batchnorm_every_protocol_gives_the_same_numbers(tmp_path):
    fit(tiny_run(tmp_path, model=partial(CNN, padding=2), rounds=2, eval_bn=PROTOCOLS))
    for record in read_metrics(tmp_path / "metrics.jsonl"):
        assert record["test/acc"] == record["test/acc@client0"] == record["test/acc@recalibrated"]
        assert (
            record["test/loss"] == record["test/loss@client0"] == record["test/loss@recalibrated"]
        )


def test_fedmr_is_evaluated_under_every_protocol(tmp_path):
    run = tiny_run(
        tmp_path,
        model=TINY_VGG,
        algorithm=FedMR(),
        rounds=2,
        clients_per_round=2,
        eval_bn=PROTOCOLS,
    )
    fit(run)
    record = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert (
        0.0 <= record["test/acc@client0"] <= 1.0 and 0.0 <= record["test/acc@recalibrated"] <= 1.0
    )


def test_compare_refuses_mixed_protocols_and_compares_under_a_shared_one(tmp_path):
    fit(bn_run(tmp_path / "a"))
    fit(bn_run(tmp_path / "b", eval_bn=["client:0", "averaged"]))
    with pytest.raises(ValueError, match="different BatchNorm evaluation protocols .*--eval_bn"):
        compare_runs([tmp_path / "a", tmp_path / "b"])
    table, _ = compare_runs([tmp_path / "a", tmp_path / "b"], protocol="client0")
    assert [c.header for c in table.columns][:3] == ["run", "method", "eval BN"]
    assert list(table.columns[2].cells) == ["client0", "client0"]
    with pytest.raises(ValueError, match="no accuracy under the eval_bn protocol 'recalibrated'"):
        compare_runs([tmp_path / "a", tmp_path / "b"], protocol="recalibrated")


# ---- local tensors ----------------------------------------------------------------------------


def test_local_classes_name_the_right_tensors():
    model = TINY_VGG(10, (1, 8, 8))
    stats = set(bn_stat_names(model))
    assert stats == {
        f"body.bn{i}.{b}"
        for i in (1, 2, 3)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }
    affine = local_tensor_names(model, ["bn_affine"])
    assert affine == {f"body.bn{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}
    biases = local_tensor_names(model, ["bias"])
    assert biases == {"body.conv1.bias", "body.conv2.bias", "body.conv3.bias", "fc.bias"}
    assert check_local(None, "local") == ("bn_stats",)
    assert check_local(["bias", "bn_affine"], "average") == ("bn_affine", "bias")
    with pytest.raises(ValueError, match=r"unknown tensor class\(es\) \['bn'\]"):
        FedAvg(local=["bn"])
    with pytest.raises(ValueError, match="algorithm.buffers must be one of"):
        FedProx(buffers="shared")


def test_buffers_local_and_local_bn_stats_are_the_same_run(tmp_path):
    fit(tiny_run(tmp_path / "a", model=TINY_VGG, rounds=2, algorithm=FedAvg(buffers="local")))
    fit(tiny_run(tmp_path / "b", model=TINY_VGG, rounds=2, algorithm=FedAvg(local=["bn_stats"])))
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    untimed = [
        [{k: v for k, v in m.items() if not k.startswith("time/")} for m in c["metrics"]]
        for c in (a, b)
    ]
    assert untimed[0] == untimed[1]


def test_local_parameters_are_never_reduced_or_counted_and_stay_with_their_client(tmp_path):
    local = ["bn_stats", "bn_affine", "bias"]
    run = tiny_run(tmp_path, model=TINY_VGG, rounds=1, algorithm=FedAvg(local=local))
    fed = start(run)
    initial = {k: v.clone() for k, v in fed.global_model.state_dict().items()}
    from fedlit.engine import run_round

    metrics = run_round(fed, 1)
    model = fed.global_model
    local_names = local_tensor_names(model, local)
    params = dict(model.named_parameters())
    shared = [n for n in params if n not in local_names]
    float_stats = [n for n in bn_stat_names(model) if "num_batches" not in n]
    # bytes: each client uploads and downloads only the shared weights
    shared_bytes = 4 * sum(params[n].numel() for n in shared)
    assert metrics["comm/up_bytes"] == 4 * shared_bytes
    assert metrics["comm/down_bytes"] == 4 * shared_bytes
    # the round's all-reduce carried the shared weights, the statistics (for evaluation) and
    # the loss and weight slots, in float64: no local parameter; evaluation added its 3 numbers
    # per test batch (one batch of the 360 digits test images)
    stats_numel = sum(dict(model.named_buffers())[n].numel() for n in float_stats)
    shared_numel = sum(params[n].numel() for n in shared)
    assert fed.comm.collective_bytes == 8 * (shared_numel + stats_numel + 2) + 8 * 3
    # the global model keeps the initial local parameters; the shared ones moved
    for name in local_names & set(params):
        assert torch.equal(params[name], initial[name]), name
    assert not torch.equal(params["fc.weight"], initial["fc.weight"])
    # each client holds its own trained local tensors and receives them back
    own = fed.local.get(0)
    assert set(own) == local_names
    assert not torch.equal(own["fc.bias"], initial["fc.bias"])
    received = fed.load_client_model(0)
    assert torch.equal(dict(received.named_parameters())["fc.bias"], own["fc.bias"])
    assert torch.equal(dict(received.named_parameters())["fc.weight"], params["fc.weight"])


# ---- across ranks and resumes -----------------------------------------------------------------


def rank_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(
        devices=1, rounds=4, local_epochs=1, cpu_threads=1, checkpoint_every=1,
        eval_bn=["client:1", "averaged", "recalibrated"], eval_bn_samples=200,
    )  # fmt: skip
    config["data"].update(num_clients=4, local_test_size=30)
    config["model"] = yaml.safe_load(VGG_SPEC)
    config["algorithm"] = {
        "class_path": "fedlit.algorithms.FedAvg",
        "init_args": {"local": ["bn_stats", "bn_affine", "bias"]},
    }
    config["logger"] = {"quiet": True, "plots": False, "wandb": {"mode": "disabled"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def numbers(run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """Every metric but wall times, the final model, and every client's local tensors."""
    metrics = [
        {k: v for k, v in m.items() if not k.startswith("time/")}
        for m in read_metrics(run_dir / "metrics.jsonl")
    ]
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    local = state["clients"].get("local", {})
    return metrics, state["model"], local


def assert_same_numbers(a: Path, b: Path) -> None:
    metrics_a, model_a, local_a = numbers(a)
    metrics_b, model_b, local_b = numbers(b)
    assert metrics_a == metrics_b  # every protocol, personalised accuracy and cost, bitwise
    assert all(torch.equal(v, model_b[k]) for k, v in model_a.items())
    assert local_a.keys() == local_b.keys()
    for client, tensors in local_a.items():
        assert all(torch.equal(v, local_b[client][k]) for k, v in tensors.items())


@pytest.mark.multiprocess
def test_one_and_two_ranks_and_resumes_across_them_give_identical_numbers(tmp_path):
    config = rank_config(tmp_path)
    whole = tmp_path / "whole"
    main(["fit", "--config", str(config), "--run_dir", str(whole)])
    assert {"test/acc@averaged", "test/acc@recalibrated"} <= set(
        read_metrics(whole / "metrics.jsonl")[-1]
    )
    assert json.loads((whole / "summary.json").read_text())["eval_bn"] == "client1"
    # 2 ranks for 2 rounds (client 1, whose statistics are tested, lives on rank 1), then 1
    # rank to the end: rounds 1-2 compare 2 ranks with 1, rounds 3-4 the resharded state
    down = tmp_path / "down"
    fit_on_two_ranks(config, down, "--trainer.rounds", "2")
    main(["fit", "--config", str(config), "--run_dir", str(down), "--resume", "auto"])
    assert_same_numbers(whole, down)
    # 1 rank for 2 rounds, then 2 ranks to the end
    up = tmp_path / "up"
    main(["fit", "--config", str(config), "--run_dir", str(up), "--trainer.rounds", "2"])
    fit_on_two_ranks(config, up, "--resume", "auto")
    assert_same_numbers(whole, up)
