"""SCAFFOLD, FedDyn, FedNova and the server optimizers: hand computations on tiny models, the
settings where the math says they are FedAvg, their bytes, and 1 vs 2 ranks and resumes."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fedlit.algorithms import SCAFFOLD, FedAvg, FedDyn, FedNova, RoundSums
from fedlit.algorithms.feddyn import feddyn_penalty
from fedlit.algorithms.fednova import A_NORM, accumulated_steps
from fedlit.checkpoint import load_checkpoint
from fedlit.cli import main
from fedlit.config import TrainerConfig
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import CNN, MLP
from fedlit.server import FedAdagrad, FedAdam, FedYogi, ServerSGD
from runs import context_for, tiny_run

ROOT = Path(__file__).resolve().parents[1]


def linear() -> nn.Module:
    torch.manual_seed(0)
    return MLP(3, (4,), hidden=())


# ---- server optimizers ------------------------------------------------------------------------


def test_server_sgd_with_lr_one_and_no_momentum_is_the_average_bit_for_bit():
    x = {"w": torch.randn(5), "b": torch.randn(2)}
    t = {"w": torch.randn(5), "b": torch.randn(2)}
    new = ServerSGD(lr=1.0, momentum=0.0).step(x, t)
    assert all(torch.equal(new[k], t[k]) for k in x)


def test_server_sgd_momentum_by_hand():
    opt = ServerSGD(lr=0.5, momentum=0.9)
    x, t1, t2 = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0])
    x1 = opt.step({"w": x}, {"w": t1})["w"]
    m1 = t1 - x  # 2
    torch.testing.assert_close(x1, x + 0.5 * m1)  # 2.0
    x2 = opt.step({"w": x1}, {"w": t2})["w"]
    m2 = 0.9 * m1 + (t2 - x1)  # 1.8 + 0
    torch.testing.assert_close(x2, x1 + 0.5 * m2)


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_adaptive_server_optimizers_by_hand(cls):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = cls(lr=lr, beta1=b1, beta2=b2, tau=tau)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.full((3,), tau**2, dtype=torch.float64)
    for target in ([1.5, -2.5, 0.5], [0.0, -1.0, 2.0]):
        t = torch.tensor(target, dtype=torch.float64)
        d = t - x
        m = b1 * m + (1 - b1) * d
        if cls is FedAdagrad:
            v = v + d * d
        elif cls is FedAdam:
            v = b2 * v + (1 - b2) * d * d
        else:
            v = v - (1 - b2) * d * d * torch.sign(v - d * d)
        expected = x + lr * m / (v.sqrt() + tau)
        x = opt.step({"w": x}, {"w": t})["w"]
        torch.testing.assert_close(x, expected)
    restored = cls(lr=lr, beta1=b1, beta2=b2, tau=tau)
    restored.load_state_dict(opt.state_dict())
    t = torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64)
    assert torch.equal(restored.step({"w": x}, {"w": t})["w"], opt.step({"w": x}, {"w": t})["w"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ServerSGD(lr=0), "lr must be > 0"),
        (lambda: ServerSGD(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (lambda: FedAdam(tau=0), "tau must be > 0"),
        (lambda: FedYogi(beta2=1.5), r"beta2 must be in \[0, 1\)"),
    ],
)
def test_server_optimizer_settings_are_checked(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def digits_run(tmp_path, algorithm=None, rounds=2, **trainer):
    model = partial(CNN, padding=2)
    trainer.setdefault("optimizer", partial(torch.optim.SGD, lr=0.05))
    return tiny_run(
        tmp_path, model=model, algorithm=algorithm or FedAvg(), rounds=rounds, **trainer
    )


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]


def test_fedavgm_with_momentum_zero_and_lr_one_is_fedavg_bit_for_bit(tmp_path):
    fit(digits_run(tmp_path / "avg"))
    run = digits_run(tmp_path / "m")
    run.server_optimizer = ServerSGD(lr=1.0, momentum=0.0)
    fit(run)
    a, b = final_model(tmp_path / "avg"), final_model(tmp_path / "m")
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_a_server_optimizer_changes_the_step_and_is_refused_with_fedmr(tmp_path):
    from fedlit.algorithms import FedMR
    from fedlit.checks import check_before_launch

    fit(digits_run(tmp_path / "avg"))
    run = digits_run(tmp_path / "adam")
    run.server_optimizer = FedAdam(lr=0.01)
    fit(run)
    a, b = final_model(tmp_path / "avg"), final_model(tmp_path / "adam")
    assert not torch.equal(a["fc3.weight"], b["fc3.weight"])
    run = digits_run(tmp_path / "mr", algorithm=FedMR())
    run.server_optimizer = ServerSGD(momentum=0.9)
    with pytest.raises(ValueError, match="FedMR has a server step of its own"):
        check_before_launch(run)


# ---- SCAFFOLD ---------------------------------------------------------------------------------


def test_scaffold_option_two_control_variates_by_hand():
    model = linear()
    scaffold = SCAFFOLD()
    context = context_for(model, num_clients=4)
    with pytest.raises(ValueError, match="use torch.optim.SGD with momentum 0"):
        momentum = TrainerConfig(optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
        SCAFFOLD().setup(context=context_for(model, trainer=momentum))
    scaffold.setup(context=context)
    scaffold.c = {n: torch.full_like(p, 0.1) for n, p in model.named_parameters()}
    working = copy.deepcopy(model)
    x0 = {n: p.detach().clone() for n, p in working.named_parameters()}
    scaffold.client_start(client=2, model=working)
    # one corrected SGD step on a batch: g + c - c_i with c_i = 0
    optimizer = torch.optim.SGD(working.parameters(), lr=0.5)
    x, y = torch.randn(6, 4), torch.arange(6) % 3
    scaffold.loss(working, x, y).backward()
    raw = {n: p.grad.clone() for n, p in working.named_parameters()}
    scaffold.before_step(model=working)
    for n, p in working.named_parameters():
        torch.testing.assert_close(p.grad, raw[n] + 0.1)
    optimizer.step()
    upload = scaffold.client_end(client=2, model=working, steps=1, optimizer=optimizer)
    for n, p in working.named_parameters():
        c_i = 0 - 0.1 + (x0[n] - p.detach()) / (1 * 0.5)  # option II
        torch.testing.assert_close(scaffold.controls.get(2)[n], c_i)
        torch.testing.assert_close(upload.extras[f"delta_c/{n}"], c_i)  # c_i was 0
    # the server: c <- c + sum delta c / N, the model's target is the average
    average = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    summed = {f"delta_c/{n}": torch.ones_like(p).double() for n, p in model.named_parameters()}
    sums = RoundSums(round=1, clients=2, num_clients=4, total_weight=2.0, summed=summed)
    assert scaffold.server_update(average=average, sums=sums) is average
    for n in average:
        torch.testing.assert_close(scaffold.c[n], torch.full_like(average[n], 0.1 + 1 / 4))


def test_scaffold_first_round_is_fedavg_with_uniform_weights_and_sends_twice_the_bytes(tmp_path):
    fit(digits_run(tmp_path / "avg", FedAvg(weighting="uniform"), rounds=1))
    fit(digits_run(tmp_path / "scaffold", SCAFFOLD(), rounds=1))
    a, b = final_model(tmp_path / "avg"), final_model(tmp_path / "scaffold")
    assert all(torch.equal(v, b[k]) for k, v in a.items())  # zero control variates
    avg = read_metrics(tmp_path / "avg" / "metrics.jsonl")[0]
    scaffold = read_metrics(tmp_path / "scaffold" / "metrics.jsonl")[0]
    # the CNN has no buffers: delta c is exactly the model's size, c as well
    assert scaffold["comm/up_bytes"] == 2 * avg["comm/up_bytes"]
    assert scaffold["comm/down_bytes"] == 2 * avg["comm/down_bytes"]
    assert scaffold["comm/ratio"] == 2.0


# ---- FedDyn -----------------------------------------------------------------------------------


def test_feddyn_client_and_server_by_hand():
    model = linear()
    feddyn = FedDyn(alpha=0.1)
    feddyn.setup(context=context_for(model, num_clients=4))
    working = copy.deepcopy(model)
    theta = {n: p.detach().clone() for n, p in working.named_parameters()}
    feddyn.client_start(client=1, model=working)
    x, y = torch.randn(5, 4), torch.arange(5) % 3
    # at the received weights the regulariser is zero (g_k = 0, w = theta)
    torch.testing.assert_close(
        feddyn.loss(working, x, y), nn.functional.cross_entropy(working(x), y)
    )
    with torch.no_grad():
        for p in working.parameters():
            p.add_(0.2)
    feddyn.client_end(client=1)
    for n, p in working.named_parameters():  # g_k <- 0 - alpha (w_k - theta)
        torch.testing.assert_close(feddyn.gradients.get(1)[n], -0.1 * (p.detach() - theta[n]))
    # the penalty with a non-zero g_k
    params = dict(working.named_parameters())
    linear_term = feddyn.gradients.get(1)
    expected = sum(
        -(linear_term[n] * w).sum() + 0.05 * (w - theta[n]).pow(2).sum() for n, w in params.items()
    )
    torch.testing.assert_close(feddyn_penalty(params, theta, linear_term, 0.1), expected)
    # the server: h <- h - alpha |P|/m (mean - theta); theta <- mean - h / alpha
    mean = {n: theta[n] + 1.0 for n in theta}
    sums = RoundSums(round=1, clients=2, num_clients=4, total_weight=2.0)
    new = feddyn.server_update(global_tensors=theta, average=mean, sums=sums)
    for n in theta:
        h = -0.1 * (2 / 4) * torch.ones_like(theta[n])
        torch.testing.assert_close(feddyn.h[n], h)
        torch.testing.assert_close(new[n], mean[n] - h / 0.1)


# ---- FedNova ----------------------------------------------------------------------------------


def test_fednova_normalised_update_by_hand():
    assert accumulated_steps(5, 0.0) == 5.0
    rho, tau = 0.9, 3
    assert accumulated_steps(tau, rho) == pytest.approx(
        sum((1 - rho**k) / (1 - rho) for k in range(1, tau + 1))
    )
    model = linear()
    fednova = FedNova()
    fednova.setup(context=context_for(model))
    working = copy.deepcopy(model)
    theta = {n: p.detach().clone() for n, p in working.named_parameters()}
    fednova.client_start(model=working)
    optimizer = torch.optim.SGD(working.parameters(), lr=0.1, momentum=0.9)
    with torch.no_grad():
        for p in working.parameters():
            p.sub_(0.6)
    upload = fednova.client_end(model=working, steps=3, optimizer=optimizer)
    a = accumulated_steps(3, 0.9)
    for n in theta:  # theta - (theta - y) / ||a||
        torch.testing.assert_close(upload.model[n], theta[n] - 0.6 / a)
    assert float(upload.extras[A_NORM]) == pytest.approx(a)
    # the server: theta + tau_eff (average - theta)
    average = {n: theta[n] - 0.2 for n in theta}
    sums = RoundSums(
        round=1, clients=2, num_clients=2, total_weight=2.0, weighted={A_NORM: torch.tensor(4.0)}
    )
    new = fednova.server_update(global_tensors=theta, average=average, sums=sums)
    for n in theta:
        torch.testing.assert_close(new[n], theta[n] - 4.0 * 0.2)


def test_fednova_refuses_an_optimizer_it_cannot_normalise(tmp_path):
    run = digits_run(tmp_path, FedNova(), optimizer=partial(torch.optim.Adam, lr=0.01))
    with pytest.raises(ValueError, match="FedNova normalises by the accumulated steps of SGD"):
        fit(run)


def test_fednova_runs_with_an_extra_scalar_upload(tmp_path):
    run = digits_run(tmp_path / "nova", FedNova(), rounds=6, local_epochs=2)
    fit(run)
    fit(digits_run(tmp_path / "avg", rounds=6, local_epochs=2))
    nova = read_metrics(tmp_path / "nova" / "metrics.jsonl")
    avg = read_metrics(tmp_path / "avg" / "metrics.jsonl")
    assert nova[0]["comm/up_bytes"] == avg[0]["comm/up_bytes"] + 4 * 4  # ||a|| per client
    assert nova[-1]["test/acc"] > 0.6  # it learns (FedAvg: about 0.8 here)


# ---- across ranks and resumes -----------------------------------------------------------------

SETTINGS = {
    "scaffold_fedadam": {
        "algorithm": {"class_path": "fedlit.algorithms.SCAFFOLD"},
        "trainer": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}},
        "server_optimizer": {"class_path": "fedlit.server.FedAdam", "init_args": {"lr": 0.01}},
    },
    "feddyn_fedavgm": {
        "algorithm": {"class_path": "fedlit.algorithms.FedDyn", "init_args": {"alpha": 0.1}},
        "server_optimizer": {
            "class_path": "fedlit.server.ServerSGD",
            "init_args": {"lr": 1.0, "momentum": 0.5},
        },
    },
    "fednova": {"algorithm": {"class_path": "fedlit.algorithms.FedNova"}},
}


def method_config(tmp_path: Path, setting: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(
        devices=1, rounds=4, local_epochs=1, cpu_threads=1, checkpoint_every=1,
        clients_per_round=3, personal_eval=False,
    )  # fmt: skip
    config["data"].update(num_clients=4, local_test="none")
    config["logger"] = {"quiet": True, "plots": False, "wandb": {"mode": "disabled"}}
    setting = dict(SETTINGS[setting])
    config["trainer"].update(setting.pop("trainer", {}))
    config.update(setting)
    path = tmp_path / f"{setting}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def on_two_ranks(config: Path, run_dir: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    command = [sys.executable, "-m", "fedlit", "fit", "--config", str(config)]
    done = subprocess.run(
        [*command, "--run_dir", str(run_dir), "--trainer.devices", "2", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def untimed(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in m.items() if not k.startswith("time/")}
        for m in read_metrics(run_dir / "metrics.jsonl")
    ]


def assert_same_run(a: Path, b: Path) -> None:
    assert untimed(a) == untimed(b)
    state_a, state_b = (
        load_checkpoint(a / "checkpoints" / "last.ckpt"),
        load_checkpoint(b / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(v, state_b["model"][k]) for k, v in state_a["model"].items())
    assert state_a["clients"].keys() == state_b["clients"].keys()
    for store, entries in state_a["clients"].items():
        assert entries.keys() == state_b["clients"][store].keys(), store
        for client, tensors in entries.items():
            other = state_b["clients"][store][client]
            assert all(torch.equal(t, other[n]) for n, t in tensors.items()), (store, client)


@pytest.mark.multiprocess
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_one_and_two_ranks_and_resumes_across_them_are_bitwise_equal(tmp_path, setting):
    """Rounds 1-2 on 2 ranks then 3-4 on 1, and rounds 1-2 on 1 then 3-4 on 2, against 4
    rounds on 1 rank. FedNova keeps no state: 4 rounds on 2 ranks suffice."""
    config = method_config(tmp_path, setting)
    whole = tmp_path / "whole"
    main(["fit", "--config", str(config), "--run_dir", str(whole)])
    if setting == "fednova":
        on_two_ranks(config, tmp_path / "two")
        assert_same_run(whole, tmp_path / "two")
        return
    down = tmp_path / "down"  # 2 ranks for 2 rounds, then 1 rank
    on_two_ranks(config, down, "--trainer.rounds", "2")
    main(["fit", "--config", str(config), "--run_dir", str(down), "--resume", "auto"])
    assert_same_run(whole, down)
    up = tmp_path / "up"  # 1 rank for 2 rounds, then 2 ranks
    main(["fit", "--config", str(config), "--run_dir", str(up), "--trainer.rounds", "2"])
    on_two_ranks(config, up, "--resume", "auto")
    assert_same_run(whole, up)
