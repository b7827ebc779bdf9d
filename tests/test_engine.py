"""End-to-end runs of the engine in this process (one CPU rank) on the bundled digits."""

import json
from functools import partial

import pytest
import torch

from fedlit.algorithms import FedAvg
from fedlit.checkpoint import load_checkpoint
from fedlit.data.config import DataConfig
from fedlit.engine import fit, prepare, run_round
from fedlit.loggers import read_metrics
from fedlit.models import CNN, ResNet8
from runs import GradRecorder, OnlyLayer, tiny_run

REQUIRED_METRICS = {"round", "test/acc", "test/loss", "comm/bytes", "train/loss"}


def make_run(tmp_path, rounds=3, callbacks=(), model=None, buffers="average", **trainer):
    """6 clients with label-mix local test splits, personalised evaluation on."""
    trainer.setdefault("personal_eval", True)
    data = DataConfig(
        dataset="digits",
        num_clients=6,
        partition="dirichlet",
        alpha=0.5,
        min_samples=20,
        local_test="label_mix",
        local_test_size=30,
    )
    run = tiny_run(
        tmp_path / "run",
        model=model or partial(CNN, padding=2),
        algorithm=FedAvg(buffers=buffers),
        callbacks=callbacks,
        data=data,
        rounds=rounds,
        **trainer,
    )
    run.config_yaml = "seed: 0\n"
    return run


def test_fit_learns_and_writes_every_output(tmp_path):
    run = make_run(tmp_path, rounds=10, local_epochs=2)
    summary = fit(run)
    run_dir = run.run_dir
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 11))
    for record in records:
        assert record.keys() >= REQUIRED_METRICS
        assert 0.0 <= record["test/acc"] <= 1.0
    # learning: far above the 10% of chance, and the loss falls
    assert records[-1]["test/acc"] > 0.85
    assert records[-1]["test/loss"] < 0.5 * records[0]["test/loss"]
    assert records[-1]["personal/acc_global"] > 0.8
    # every client sends and receives every parameter once per round
    n_params = sum(p.numel() for p in CNN(10, (1, 8, 8), padding=2).parameters())
    assert [r["comm/bytes"] for r in records] == [2 * 6 * 4 * n_params * k for k in range(1, 11)]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == pytest.approx(summary)
    assert saved["best_test_acc"] == max(r["test/acc"] for r in records)
    assert saved["final_test_acc"] == records[-1]["test/acc"]
    assert saved["rounds"] == 10 and saved["comm_bytes"] == records[-1]["comm/bytes"]
    assert saved["wall_seconds"] > 0
    assert (run_dir / "config.yaml").read_text() == "seed: 0\n"
    plots = ("accuracy", "loss", "client_accuracy", "communication", "partition")
    for plot in (f"{name}.png" for name in plots):
        assert (run_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["round"] == 10 and len(checkpoint["metrics"]) == 10


def test_same_seed_gives_bitwise_identical_models(tmp_path):
    first = prepare(make_run(tmp_path / "a", rounds=2))
    second = prepare(make_run(tmp_path / "b", rounds=2))
    for round_idx in (1, 2):
        run_round(first, round_idx)
        run_round(second, round_idx)
    for a, b in zip(
        first.global_model.state_dict().values(),
        second.global_model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


class Recorder:
    """Records which hooks ran, with the arguments it asked for."""

    def __init__(self):
        self.calls = []

    def on_fit_start(self, context):
        self.calls.append(("fit_start", len(context.layers)))

    def on_round_start(self, round, clients):
        self.calls.append(("round_start", round, tuple(clients)))

    def on_client_start(self, client):
        self.calls.append(("client_start", client))

    def on_train_batch_end(self, step):
        if step == 0:
            self.calls.append(("first_batch",))

    def on_client_end(self, client, model):
        self.calls.append(("client_end", client))

    def on_aggregate_end(self, round, global_model):
        self.calls.append(("aggregate_end", round))

    def on_evaluate_end(self, metrics):
        self.calls.append(("evaluate_end", "test/acc" in metrics))

    def on_round_end(self, round):
        self.calls.append(("round_end", round))

    def on_fit_end(self, summary):
        self.calls.append(("fit_end", summary["rounds"]))


def test_hooks_run_in_order_with_only_the_arguments_they_name(tmp_path):
    recorder = Recorder()
    fit(make_run(tmp_path, rounds=2, callbacks=[recorder], clients_per_round=2, eval_every=2))
    calls = recorder.calls
    assert calls[0] == ("fit_start", 5)
    assert calls[-1] == ("fit_end", 2)
    first_round = calls[1 : calls.index(("round_end", 1)) + 1]
    clients = first_round[0][2]
    assert first_round[0][:2] == ("round_start", 1) and len(clients) == 2
    assert first_round[1:] == [
        ("client_start", clients[0]),
        ("first_batch",),
        ("client_end", clients[0]),
        ("client_start", clients[1]),
        ("first_batch",),
        ("client_end", clients[1]),
        ("aggregate_end", 1),
        ("round_end", 1),
    ]
    # evaluation only on its schedule (eval_every=2: round 2, the last)
    assert [c for c in calls if c[0] == "evaluate_end"] == [("evaluate_end", True)]


def test_select_layers_limits_what_is_aggregated_and_counted(tmp_path):
    fed = prepare(make_run(tmp_path, rounds=1, callbacks=[OnlyLayer("fc3")]))
    before = {k: v.clone() for k, v in fed.global_model.state_dict().items()}
    metrics = run_round(fed, 1)
    after = fed.global_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc3.weight", "fc3.bias"}
    fc3_bytes = 4 * (84 * 10 + 10)
    # each client uploads fc3 only; in round 1 it downloads the whole initial model
    model_bytes = 4 * sum(p.numel() for p in fed.global_model.parameters())
    assert metrics["comm/up_bytes"] == 6 * fc3_bytes
    assert metrics["comm/down_bytes"] == 6 * model_bytes
    assert metrics["comm/round_bytes"] == 6 * (fc3_bytes + model_bytes)


def test_layers_outside_the_selection_are_frozen_during_local_training(tmp_path):
    recorder = GradRecorder()
    fed = prepare(make_run(tmp_path, rounds=1, callbacks=[OnlyLayer("conv2"), recorder]))
    run_round(fed, 1)
    # autograd computed weight gradients for the chosen layer only, for every client
    assert recorder.with_grad == [{"conv2.weight", "conv2.bias"}] * 6


class AlgorithmProbe:
    """FedAvg's loss with every optional algorithm hook recording its call."""

    buffers = "average"

    def __init__(self):
        self.calls = []

    def loss(self, model, x, y):
        return torch.nn.functional.cross_entropy(model(x), y)

    def setup(self, context):
        self.calls.append(("setup", len(context.layers)))

    def client_start(self, round, client, model, global_model):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.calls.append(("client_start", round, client, len(trainable)))

    def client_end(self, round, client):
        self.calls.append(("client_end", round, client))


class CallbackProbe:
    """Records on_client_start into the algorithm probe's list, to check the order."""

    def __init__(self, calls):
        self.calls = calls

    def on_client_start(self, client):
        self.calls.append(("on_client_start", client))


def test_optional_algorithm_hooks_are_called_around_each_client(tmp_path):
    algorithm = AlgorithmProbe()
    run = make_run(tmp_path, rounds=1, callbacks=[OnlyLayer("fc3"), CallbackProbe(algorithm.calls)])
    run.algorithm = algorithm
    fed = prepare(run)
    run_round(fed, 1)
    calls = algorithm.calls
    assert calls[0] == ("setup", len(fed.context.layers))
    # client_start sees the frozen layers already set (only fc3's two tensors train) and
    # comes before callbacks may perturb the received weights (LIPS)
    expected = []
    for client in range(6):
        expected += [
            ("client_start", 1, client, 2),
            ("on_client_start", client),
            ("client_end", 1, client),
        ]
    assert calls[1:] == expected


def test_local_bn_buffers_stay_with_each_client(tmp_path):
    run = make_run(tmp_path, rounds=1, model=ResNet8, buffers="local", personal_eval=False)
    fed = prepare(run)
    metrics = run_round(fed, 1)
    assert len(fed.local) == 6
    means = [fed.local.get(c)["stem.bn.running_mean"] for c in range(6)]
    assert not torch.allclose(means[0], means[1])
    # only parameters travel: BN statistics are not counted as communication
    n_params = sum(p.numel() for p in fed.global_model.parameters())
    assert metrics["comm/round_bytes"] == 2 * 6 * 4 * n_params
    # a client starts its next round from its own statistics, not the global ones
    fed.load_client_model(3)
    own = dict(fed.working.named_buffers())["stem.bn.running_mean"]
    assert torch.equal(own, means[3])


def test_bf16_mixed_precision_trains_under_autocast(tmp_path):
    seen = []

    class DtypeProbe:
        def on_client_start(self, model):
            self.handle = model.fc3.register_forward_hook(lambda m, i, out: seen.append(out.dtype))

        def on_client_end(self):
            self.handle.remove()

    run = make_run(tmp_path, rounds=2, precision="bf16-mixed", callbacks=[DtypeProbe()])
    fed = prepare(run)
    metrics = [run_round(fed, r) for r in (1, 2)]
    assert torch.bfloat16 in seen
    # weights stay float32; autocast only changes the compute dtype
    assert all(p.dtype == torch.float32 for p in fed.global_model.parameters())
    assert metrics[-1]["test/loss"] < metrics[0]["test/loss"]
    assert 0.0 <= metrics[-1]["test/acc"] <= 1.0
