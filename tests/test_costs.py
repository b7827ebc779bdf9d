"""Cost accounting: FLOPs counted on the meta device agree with the analytic formulas and with a
real training step; bytes follow the "download what changed since you last synced" rule; the
numbers reach metrics.jsonl, summary.json and `fedlit compare`, and survive a resume."""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fedlit.engine as engine
from fedlit.algorithms import MOON, FedMR
from fedlit.checkpoint import load_checkpoint, save_checkpoint
from fedlit.compare import compare_runs
from fedlit.costs import CommLedger, StepFlops, meta_copy
from fedlit.data.config import DataConfig
from fedlit.engine import fit, prepare, run_round
from fedlit.hooks import call_all
from fedlit.loggers import read_metrics
from fedlit.models import CNN, VGG11, ResNet8
from fedlit.plots import MIB, communication_figure
from fedlit.resume import load_for_resume
from runs import context_for, tiny_run

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
METRIC_KEYS = {
    "comm/up_bytes",
    "comm/down_bytes",
    "comm/round_bytes",
    "comm/bytes",
    "comm/full_bytes",
    "comm/ratio",
    "cost/flops",
    "cost/flops_total",
    "cost/full_flops_total",
    "cost/flops_ratio",
}
SUMMARY_KEYS = {"comm_bytes", "comm_gb", "comm_ratio", "train_flops", "train_tflops", "flops_ratio"}


def params_of(model: nn.Module, layer: str) -> tuple[str, ...]:
    return next(entry.params for entry in model.layer_map() if entry.name == layer)


# ---- FLOPs of one step ----------------------------------------------------------------------


def test_cnn_step_flops_match_a_count_by_hand():
    counter = StepFlops(CNN(10, DIGITS, padding=2), DIGITS, batch=16)
    # forward per sample, 2 FLOPs per multiply-add: conv1 1->6 5x5 on 8x8, conv2 6->16 5x5 on
    # 4x4, fc 64->120->84->10
    conv1, conv2 = 2 * 6 * 25 * 64, 2 * 16 * 6 * 25 * 16
    fc1, fc2, fc3 = 2 * 64 * 120, 2 * 120 * 84, 2 * 84 * 10
    forward = conv1 + conv2 + fc1 + fc2 + fc3
    assert counter.features() == forward - fc3
    # all trainable: weight gradients everywhere, input gradients everywhere but conv1 (the
    # input image needs none)
    assert counter.full_step() == 3 * forward - conv1
    # only fc3: the forward and fc3's weight gradient, no backward below it
    assert counter.step(["fc3.weight", "fc3.bias"]) == forward + fc3
    # only conv2: its weight gradient and the input gradients of the layers above it
    assert counter.step(["conv2.weight", "conv2.bias"]) == forward + conv2 + fc1 + fc2 + fc3


@pytest.mark.parametrize(
    ("model", "shape"),
    [(partial(CNN, padding=2), DIGITS), (ResNet8, CIFAR), (VGG11, CIFAR)],
    ids=["cnn", "resnet8", "vgg11"],
)
def test_flop_counter_and_analytic_count_agree_for_full_and_single_layer_steps(model, shape):
    net = model(10, shape)
    counter = StepFlops(net, shape, batch=4)
    full = counter.full_step()
    assert full == counter.analytic_step(counter.all_params) > 0
    for layer in net.layer_map():
        partial_step = counter.step(layer.params)
        assert partial_step == counter.analytic_step(layer.params), layer.name
        # below the full step by exactly the backward work the frozen layers skip
        assert 0 < partial_step < full
        skipped = counter.analytic_step(counter.all_params) - counter.analytic_step(layer.params)
        assert full - partial_step == skipped


def test_resnet8_with_only_fc_trainable_costs_the_forward_plus_fc_weight_gradient():
    net = ResNet8(10, CIFAR)
    counter = StepFlops(net, CIFAR, batch=4)
    fc = 2 * net.fc.in_features * net.fc.out_features
    assert counter.features() + fc == 28_939_264  # one forward pass per sample
    assert counter.step(params_of(net, "fc")) == counter.features() + fc + fc


def real_step_flops(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one real local step on the CPU, counted while it runs."""
    with FlopCounterMode(display=False) as counting:
        loss_fn(model, x, y).backward()
    model.zero_grad(set_to_none=True)
    return counting.get_total_flops()


def test_the_meta_count_equals_a_real_partial_step_and_touches_nothing():
    torch.manual_seed(0)
    net = ResNet8(10, (3, 8, 8))
    layer = params_of(net, "s2.conv1")
    for name, p in net.named_parameters():
        p.requires_grad_(name in layer)
    seen = []
    net.fc.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    counter = StepFlops(net, (3, 8, 8), batch=4)
    per_sample = counter.step(layer)
    counter.full_step(), counter.features(), counter.analytic_step(layer)
    # the real model: same weights and BN statistics, no hook fired, same RNG, same flags
    assert seen == [] and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert {n for n, p in net.named_parameters() if p.requires_grad} == set(layer)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    net.train()
    real = real_step_flops(net, lambda m, x, y: F.cross_entropy(m(x), y), x, y)
    assert real == 4 * per_sample


def test_meta_copy_shares_nothing_with_the_model():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    meta = meta_copy(net)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert all(b.device.type == "meta" for b in meta.buffers())
    rng = torch.get_rng_state()
    meta.train()(torch.zeros(3, 4, device="meta")).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)  # dropout on meta draws nothing
    assert all(p.grad is None for p in net.parameters())


def test_moon_counts_its_frozen_forward_passes():
    torch.manual_seed(0)
    moon = MOON(mu=1.0, projection_dim=16, history=2)
    global_model = moon.build_model(CNN(10, DIGITS, padding=2))
    moon.setup(context=context_for(global_model))
    counter = StepFlops(global_model, DIGITS, batch=4)
    assert [moon.frozen_forwards(taken_part=k) for k in range(4)] == [2, 2, 3, 3]
    assert MOON(mu=0.0).frozen_forwards(taken_part=3) == 0
    # a real MOON step on a client's first round: its model, the global one and the initial one
    model = copy.deepcopy(global_model)
    moon.client_start(client=0, model=model)
    x, y = torch.randn(4, *DIGITS), torch.tensor([0, 1, 2, 3])
    model.train()
    real = real_step_flops(model, moon.loss, x, y)
    assert real == 4 * (counter.full_step() + 2 * counter.features())


# ---- bytes: the ledger ----------------------------------------------------------------------


def test_ledger_downloads_what_changed_since_the_last_sync():
    ledger = CommLedger(["a", "b", "c"], [100, 20, 3], num_clients=3)
    assert [ledger.download_bytes(c) for c in range(3)] == [123] * 3  # nothing held yet
    ledger.sync([0, 1], round_idx=1)
    ledger.mark_changed(["a", "b", "c"], round_idx=1)  # a full round
    ledger.sync([0], round_idx=2)
    ledger.mark_changed(["b"], round_idx=2)
    ledger.sync([0, 2], round_idx=3)
    ledger.mark_changed(["c"], round_idx=3)
    # client 0 synced at round 3 (holds round 2's model): needs c; client 1 holds the initial
    # model: needs all; client 2 holds round 2's model too
    assert [ledger.download_bytes(c) for c in range(3)] == [3, 123, 3]
    restored = CommLedger(["a", "b", "c"], [100, 20, 3], num_clients=3)
    restored.load_state_dict(ledger.state_dict())
    assert [restored.download_bytes(c) for c in range(3)] == [3, 123, 3]


class ClientRecorder:
    """Records each round's sampled clients."""

    def __init__(self):
        self.clients: dict[int, list[int]] = {}

    def on_round_start(self, round, clients):
        self.clients[round] = list(clients)


class FullOnOddRounds(ClientRecorder):
    """Trains one layer on even rounds, the whole network on odd ones; and, as an oracle, keeps
    the model each client last received to count which layers really changed since."""

    def __init__(self, layer: str):
        super().__init__()
        self.layer = layer
        self.held: dict[int, dict[str, torch.Tensor]] = {}
        self.sizes: dict[str, int] = {}
        self.downloads: dict[int, int] = {}

    def on_fit_start(self, context):
        params = dict(context.global_model.named_parameters())
        self.groups = {entry.name: entry.params for entry in context.layers}
        self.sizes = {n: 4 * sum(params[p].numel() for p in ps) for n, ps in self.groups.items()}

    def select_layers(self, round, layers):
        return [self.layer] if round % 2 == 0 else None

    def on_client_start(self, round, client, model):
        received = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = self.held.get(client)
        changed = [
            name
            for name, params in self.groups.items()
            if before is None or any(not torch.equal(before[p], received[p]) for p in params)
        ]
        self.downloads[round] = self.downloads.get(round, 0) + sum(self.sizes[n] for n in changed)
        self.held[client] = received


def digits_run(tmp_path, rounds, algorithm=None, callbacks=(), **trainer):
    data = DataConfig(dataset="digits", num_clients=6, partition="dirichlet", min_samples=20)
    run = tiny_run(
        tmp_path / "run",
        model=partial(CNN, padding=2),
        algorithm=algorithm,
        callbacks=callbacks,
        data=data,
        rounds=rounds,
        clients_per_round=3,
        **trainer,
    )
    run.config_yaml = "seed: 0\n"
    return run


def test_partial_schedule_with_sampling_counts_honest_bytes_and_flops(tmp_path):
    oracle = FullOnOddRounds("fc2")
    run = digits_run(tmp_path, rounds=6, callbacks=[oracle], local_epochs=2)
    fed = prepare(run)
    call_all(run.callbacks, "on_fit_start", context=fed.context)
    history = [run_round(fed, r) for r in range(1, 7)]
    model_bytes, fc2_bytes = sum(oracle.sizes.values()), oracle.sizes["fc2"]
    counter = fed.costs.flops
    full_step, fc2_step = counter.full_step(), counter.step(params_of(fed.global_model, "fc2"))
    for metrics in history:
        r, clients = metrics["round"], oracle.clients[metrics["round"]]
        assert metrics["comm/down_bytes"] == oracle.downloads[r]
        assert metrics["comm/up_bytes"] == 3 * (fc2_bytes if r % 2 == 0 else model_bytes)
        samples = 2 * sum(fed.context.client_sizes[c] for c in clients)
        assert metrics["cost/flops"] == samples * (fc2_step if r % 2 == 0 else full_step)
        assert metrics["comm/full_bytes"] == 2 * 3 * model_bytes * r
    # by hand: after a full round every client downloads everything; after a partial round a
    # client that took part in it needs only fc2, one that skipped it everything
    mixed = 0
    for r in range(2, 7):
        recent = len(set(oracle.clients[r]) & set(oracle.clients[r - 1])) if r % 2 else 0
        assert oracle.downloads[r] == recent * fc2_bytes + (3 - recent) * model_bytes
        mixed += 0 < recent < 3
    assert mixed  # the sample made both kinds of client meet in one round
    last = history[-1]
    assert last["comm/bytes"] == sum(m["comm/round_bytes"] for m in history)
    assert last["comm/ratio"] == last["comm/bytes"] / last["comm/full_bytes"] < 1
    assert last["cost/flops_total"] == sum(m["cost/flops"] for m in history)
    assert 0 < last["cost/flops_ratio"] < 1


def test_fedavg_moves_the_whole_model_both_ways_and_ratios_are_one(tmp_path):
    run = digits_run(tmp_path, rounds=3)
    summary = fit(run)
    records = read_metrics(run.run_dir / "metrics.jsonl")
    model_bytes = 4 * sum(p.numel() for p in CNN(10, DIGITS, padding=2).parameters())
    for record in records:
        assert record.keys() >= METRIC_KEYS
        assert record["comm/up_bytes"] == record["comm/down_bytes"] == 3 * model_bytes
        assert record["comm/ratio"] == record["cost/flops_ratio"] == 1.0
    saved = json.loads((run.run_dir / "summary.json").read_text())
    assert saved.keys() >= SUMMARY_KEYS and saved == pytest.approx(summary)
    assert saved["comm_bytes"] == records[-1]["comm/bytes"] == 3 * 2 * 3 * model_bytes
    assert saved["comm_gb"] == saved["comm_bytes"] / 1e9
    assert saved["train_flops"] == records[-1]["cost/flops_total"] > 0
    assert saved["train_tflops"] == saved["train_flops"] / 1e12
    assert saved["comm_ratio"] == saved["flops_ratio"] == 1.0


def test_moon_rounds_count_the_frozen_passes_of_each_client(tmp_path):
    recorder = ClientRecorder()
    moon = MOON(mu=1.0, projection_dim=16, history=2)
    fed = prepare(digits_run(tmp_path, rounds=4, algorithm=moon, callbacks=[recorder]))
    counter, taken = fed.costs.flops, [0] * 6
    for r in range(1, 5):
        metrics = run_round(fed, r)
        expected = 0
        for c in recorder.clients[r]:
            passes = 1 + max(1, min(2, taken[c]))
            expected += fed.context.client_sizes[c] * (
                counter.full_step() + passes * counter.features()
            )
            taken[c] += 1
        assert metrics["cost/flops"] == expected
    assert max(taken) >= 3  # some client used two previous models
    assert metrics["cost/flops_ratio"] == 1.0


def test_fedmr_clients_move_their_whole_slot(tmp_path):
    fed = prepare(digits_run(tmp_path, rounds=2, algorithm=FedMR()))
    slot_bytes = 4 * sum(p.numel() for p in fed.global_model.parameters())
    for r in (1, 2):
        metrics = run_round(fed, r)
        assert metrics["comm/up_bytes"] == metrics["comm/down_bytes"] == 3 * slot_bytes
        assert metrics["comm/ratio"] == 1.0


def test_counting_leaves_training_bitwise_unchanged(tmp_path):
    plain = prepare(digits_run(tmp_path / "plain", rounds=2))
    busy = prepare(digits_run(tmp_path / "busy", rounds=2))
    for r in (1, 2):
        run_round(plain, r)
        # extra counts at odd moments: new trainable sets, the analytic check, the features
        for layer in busy.context.layers:
            busy.costs.flops.step(layer.params)
            busy.costs.flops.analytic_step(layer.params)
        busy.costs.flops.features()
        run_round(busy, r)
    for (name, a), b in zip(
        plain.global_model.state_dict().items(),
        busy.global_model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name


# ---- compare and resume ---------------------------------------------------------------------


def test_compare_shows_costs_and_a_resumed_run_has_the_same_totals(tmp_path, monkeypatch):
    schedule = partial(FullOnOddRounds, "fc1")
    whole = digits_run(tmp_path / "whole", rounds=4, callbacks=[schedule()], checkpoint_every=1)
    fit(whole)

    def crash_at_round_3(rank, round_idx):
        if round_idx == 3:
            raise RuntimeError("killed")

    broken_dir = tmp_path / "broken"
    with monkeypatch.context() as patch:
        patch.setattr(engine, "inject_fault", crash_at_round_3)
        with pytest.raises(RuntimeError, match="killed"):
            fit(digits_run(broken_dir, rounds=4, callbacks=[schedule()], checkpoint_every=1))
    resumed = digits_run(broken_dir, rounds=4, callbacks=[schedule()], checkpoint_every=1)
    resumed.resume = load_for_resume(broken_dir / "run" / "checkpoints" / "last.ckpt", "seed: 0\n")
    fit(resumed)

    a, b = (read_metrics(d / "metrics.jsonl") for d in (whole.run_dir, resumed.run_dir))
    for key in sorted(METRIC_KEYS):
        assert [m[key] for m in a] == [m[key] for m in b], key
    summaries = [
        json.loads((d / "summary.json").read_text()) for d in (whole.run_dir, resumed.run_dir)
    ]
    for key in SUMMARY_KEYS:
        assert summaries[0][key] == summaries[1][key], key
    state = load_checkpoint(whole.run_dir / "checkpoints" / "last.ckpt")
    assert state["costs"]["totals"]["bytes"] == a[-1]["comm/bytes"]
    del state["costs"]  # as written before costs were counted (version 2): refused
    state["version"] = 2
    save_checkpoint(tmp_path / "old.ckpt", state)
    with pytest.raises(ValueError, match="format version 2, which cannot be resumed"):
        load_for_resume(tmp_path / "old.ckpt", "seed: 0\n")

    table, _ = compare_runs([whole.run_dir, resumed.run_dir], tmp_path / "cmp.png")
    header = [column.header for column in table.columns]
    assert header[7:11] == ["comm GB", "comm ratio", "TFLOPs", "FLOPs ratio"]
    cells = [list(column.cells) for column in table.columns]
    ratio = summaries[0]["comm_ratio"]
    assert cells[8] == [f"{ratio:.3f}"] * 2 and 0 < ratio < 1
    assert cells[9] == [f"{summaries[0]['train_flops'] / 1e12:.3g}"] * 2


def test_communication_plot_stacks_downloads_under_uploads_next_to_the_full_network():
    records = [
        {
            "round": r,
            "comm/up_bytes": MIB,
            "comm/down_bytes": 2 * MIB,
            "comm/round_bytes": 3 * MIB,
            "comm/bytes": 3 * MIB * r,
            "comm/full_bytes": 4 * MIB * r,
        }
        for r in (1, 2)
    ]
    bars, totals = communication_figure(records).axes
    assert [(p.get_y(), p.get_height()) for p in bars.patches] == [(0, 2), (0, 2), (2, 1), (2, 1)]
    actual, full = totals.lines
    assert list(actual.get_ydata()) == [3, 6] and list(full.get_ydata()) == [4, 8]
    assert full.get_linestyle() == "--"
