"""Server optimizers: hand computations, the FedAvg they reduce to, and where they are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlit.engine import fit
from fedlit.models import MLP
from fedlit.server import FedAdagrad, FedAdam, FedYogi, ServerSGD
from runs import digits_run, final_model


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
