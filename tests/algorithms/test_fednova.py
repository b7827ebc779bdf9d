"""FedNova: the normalised update by hand, the optimizers it refuses, a run."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from fedlit.algorithms import FedNova, RoundSums
from fedlit.algorithms.fednova import A_NORM, accumulated_steps
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import MLP
from runs import context_for, digits_run


def linear() -> nn.Module:
    torch.manual_seed(0)
    return MLP(3, (4,), hidden=())


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
