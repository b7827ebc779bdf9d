"""SCAFFOLD: option II control variates by hand, round 1 is FedAvg's, twice the bytes."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from fedlit.algorithms import SCAFFOLD, FedAvg, RoundSums
from fedlit.config import TrainerConfig
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import MLP
from runs import context_for, digits_run, final_model


def linear() -> nn.Module:
    torch.manual_seed(0)
    return MLP(3, (4,), hidden=())


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
