"""FedDyn: the client's dynamic regulariser and the server's update by hand."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedlit.algorithms import FedDyn, RoundSums
from fedlit.algorithms.feddyn import feddyn_penalty
from fedlit.models import MLP
from runs import context_for


def linear() -> nn.Module:
    torch.manual_seed(0)
    return MLP(3, (4,), hidden=())


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
