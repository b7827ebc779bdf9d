"""FedProx: the proximal term's value and gradient, where it is zero, and its place in a run."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms import FedAvg, FedProx
from fedlit.algorithms.fedprox import proximal_term
from fedlit.config import LoggerConfig, TrainerConfig
from fedlit.data.config import DataConfig
from fedlit.engine import RunConfig, prepare, run_round
from fedlit.models import MLP


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(5, 3, generator=generator), torch.tensor([0, 1, 1, 0, 1])


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_mu_zero_is_fedavg_bitwise():
    model, (x, y) = tiny(), batch()
    algo = FedProx(mu=0.0)
    algo.client_start(model)
    with torch.no_grad():
        model[0].weight.add_(0.5)  # far from the anchor: the term would be large if computed
    assert torch.equal(algo.loss(model, x, y), FedAvg().loss(model, x, y))


@pytest.mark.parametrize("variant", ["squared", "unsquared"])
def test_term_is_zero_on_the_first_local_step(variant):
    model, (x, y) = tiny(), batch()
    algo = FedProx(mu=1.0, variant=variant)
    algo.client_start(model)
    assert algo.penalty().item() == 0.0
    algo.loss(model, x, y).backward()
    with_prox = grads(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    # at w == w_g the proximal gradient is exactly zero (the norm's subgradient at 0 is 0)
    for a, b in zip(with_prox, grads(model), strict=True):
        assert torch.equal(a, b)


def test_squared_term_and_gradient_on_a_hand_example():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    b = nn.Parameter(torch.tensor([-1.0]))
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    term = proximal_term([w, b], anchor, mu=0.5, variant="squared")
    # (0.5 / 2) * (1 + 4 + 4) = 2.25
    assert term.item() == pytest.approx(2.25)
    term.backward()
    # mu * (w - w_g)
    assert torch.allclose(w.grad, torch.tensor([0.5, 1.0]))
    assert torch.allclose(b.grad, torch.tensor([-1.0]))


def test_unsquared_term_and_gradient_on_a_hand_example():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    b = nn.Parameter(torch.tensor([-1.0]))
    anchor = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    term = proximal_term([w, b], anchor, mu=0.1, variant="unsquared")
    # 0.1 * (||(3, 4)|| + ||(-2)||) = 0.1 * (5 + 2)
    assert term.item() == pytest.approx(0.7)
    term.backward()
    # mu * (w - w_g) / ||w - w_g||, per tensor
    assert torch.allclose(w.grad, torch.tensor([0.06, 0.08]))
    assert torch.allclose(b.grad, torch.tensor([-0.1]))


def test_proximal_gradient_through_the_loss_is_mu_times_the_drift():
    model, (x, y) = tiny(), batch()
    mu = 0.3
    algo = FedProx(mu=mu)
    algo.client_start(model)
    received = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (i + 1))
    algo.loss(model, x, y).backward()
    total = grads(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    for g, g_task, p, r in zip(total, grads(model), model.parameters(), received, strict=True):
        torch.testing.assert_close(g - g_task, mu * (p.detach() - r))


def test_frozen_parameters_get_no_gradient_and_no_term():
    model, (x, y) = tiny(), batch()
    model[0].requires_grad_(False)  # the engine freezes layers outside the round's selection
    algo = FedProx(mu=1.0)
    algo.client_start(model)
    with torch.no_grad():
        model[0].weight.add_(10.0)  # cannot happen in training; must not be penalised anyway
    assert algo.penalty().item() == 0.0
    with torch.no_grad():
        model[2].bias.add_(torch.tensor([1.0, -1.0]))
    assert algo.penalty().item() == pytest.approx(1.0)  # (1/2) * (1 + 1)
    algo.loss(model, x, y).backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is not None


def test_anchor_moves_to_each_clients_received_weights():
    model = tiny()
    algo = FedProx(mu=1.0)
    algo.client_start(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert algo.penalty().item() > 0
    algo.client_start(model)  # the next client receives these weights
    assert algo.penalty().item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu": -1.0}, r"algorithm\.mu must be >= 0, got -1"),
        ({"variant": "cubed"}, r"algorithm\.variant must be one of \['squared', 'unsquared'\]"),
        ({"buffers": "global"}, r"algorithm\.buffers must be one of \['average', 'local'\]"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FedProx(**kwargs)


class Drift:
    """Records how far each client's trained weights end from the weights it received."""

    def __init__(self):
        self.received: list[torch.Tensor] = []
        self.distances: list[float] = []

    def on_client_start(self, model):
        self.received = [p.detach().clone() for p in model.parameters()]

    def on_client_end(self, model):
        squared = sum(
            (p.detach() - r).pow(2).sum()
            for p, r in zip(model.parameters(), self.received, strict=True)
        )
        self.distances.append(float(squared) ** 0.5)


def synthetic_run(tmp_path, algorithm, callbacks=()) -> RunConfig:
    return RunConfig(
        seed=0,
        run_dir=tmp_path / "run",
        trainer=TrainerConfig(
            rounds=1,
            devices=1,
            accelerator="cpu",
            clients_per_round=4,
            local_epochs=3,
            batch_size=10,
            optimizer=partial(torch.optim.SGD, lr=0.01),
            cpu_threads=1,
        ),
        data=DataConfig(
            dataset="synthetic",
            num_clients=8,
            partition="natural",
            synthetic_min_samples=20,
        ),
        model=MLP,
        algorithm=algorithm,
        callbacks=list(callbacks),
        logger=LoggerConfig(quiet=True),
    )


def global_weights(fed) -> list[torch.Tensor]:
    return [t.clone() for t in fed.global_model.state_dict().values()]


def test_in_the_shared_loop_mu_zero_is_fedavg_and_mu_keeps_clients_close(tmp_path):
    runs = {}
    drifts = {}
    for name, algorithm in (
        ("fedavg", FedAvg()),
        ("mu0", FedProx(mu=0.0)),
        ("mu1", FedProx(mu=1.0)),
    ):
        drift = Drift()
        fed = prepare(synthetic_run(tmp_path / name, algorithm, [drift]))
        run_round(fed, 1)
        runs[name], drifts[name] = global_weights(fed), drift.distances
    for a, b in zip(runs["fedavg"], runs["mu0"], strict=True):
        assert torch.equal(a, b)
    # same clients, same batches: the proximal term pulls every client towards what it received
    assert len(drifts["mu1"]) == len(drifts["mu0"]) == 4
    for with_prox, without in zip(drifts["mu1"], drifts["mu0"], strict=True):
        assert with_prox < without


class LogitPenalty:
    """The regulariser of docs/algorithms.md ("Adding a regulariser"), verbatim: a new method
    that needs nothing from the engine but a `loss`."""

    def __init__(self, lam: float = 0.01, buffers: str = "average") -> None:
        if not lam >= 0:
            raise ValueError(f"algorithm.lam must be >= 0, got {lam}")
        self.lam = lam
        self.buffers = buffers

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return F.cross_entropy(logits, y) + self.lam * logits.pow(2).mean()


def test_a_new_regulariser_is_one_small_class(tmp_path):
    results = {}
    for name, algorithm in (
        ("fedavg", FedAvg()),
        ("lam0", LogitPenalty(0.0)),
        ("lam1", LogitPenalty(1.0)),
    ):
        fed = prepare(synthetic_run(tmp_path / name, algorithm))
        metrics = run_round(fed, 1)
        results[name] = (global_weights(fed), metrics["train/loss"])
    assert results["lam0"][1] == results["fedavg"][1]
    for a, b in zip(results["fedavg"][0], results["lam0"][0], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(results["lam1"][0][0], results["fedavg"][0][0])
