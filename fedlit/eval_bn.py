"""Evaluation protocols: which BatchNorm statistics the global model is tested with.

Averaging the weights of BN models leaves open which running statistics the global model uses,
and the papers differ (../docs/protocols.md). `trainer.eval_bn` is a list of protocols, all
evaluated in the same run on the same weights:

- `averaged`: the statistics the global model holds: the sample-weighted average of the round's
  clients' statistics (FedMR: the mean of its slots). The default, and fedlit's behaviour before
  protocols existed.
- `client:K`: client K's own statistics from its latest local training (kept on K's rank and
  sent to the others once per evaluation, one all-reduce of the BN buffers), together with any
  tensor the algorithm keeps local (`algorithm.local`). FedPart's official code reports
  `client:0`. Before K has trained, the global model's values.
- `recalibrated`: statistics recomputed with the global weights, in one forward pass without
  gradients, on a seeded sample of `trainer.eval_bn_samples` training images drawn from every
  client in proportion to its size (keyed by (seed, RECALIBRATE, round, client)). Every rank
  computes the same statistics from the same sample, so no collective is needed.

The first protocol's numbers are `test/acc` and `test/loss`; every other one adds
`test/acc@<name>` and `test/loss@<name>` (names `averaged`, `client<K>`, `recalibrated`).
A model without BatchNorm gives the same numbers under every protocol, so it is tested once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedlit.clients import Stream, owner, torch_generator
from fedlit.comm import copy_into, named_tensors
from fedlit.data.device import DeviceData
from fedlit.evaluation import evaluate_global
from fedlit.local_tensors import bn_stat_names
from fedlit.protocols import Protocol, metric_suffix

if TYPE_CHECKING:
    from fedlit.context import Context


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibration_shares(sizes: Sequence[int], total: int) -> list[int]:
    """Samples each client contributes: `total` split in proportion to the clients' sizes
    (largest remainder), at most a client's size; everything when `total` covers it all."""
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if total >= sizes_arr.sum():
        return sizes_arr.tolist()
    exact = total * sizes_arr / sizes_arr.sum()
    shares = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - shares), kind="stable")
    shares[order[: total - int(shares.sum())]] += 1
    return np.minimum(shares, sizes_arr).tolist()


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterator[torch.Tensor], autocast: Any = None) -> None:
    """Recompute every BatchNorm's running statistics of `model` from `batches`.

    Statistics are reset, then each batch goes through the model with the BN modules in
    training mode and momentum None (a cumulative average over batches; one batch gives the
    sample's exact mean and unbiased variance); every other module stays in eval mode, so
    dropout draws nothing. Momenta are restored and the model is left in eval mode.
    """
    modules = bn_modules(model)
    momenta = [m.momentum for m in modules]
    for module in modules:
        module.reset_running_stats()
        module.momentum = None
    model.eval()
    for module in modules:
        module.train()
    try:
        for x in batches:
            if autocast is None:
                model(x)
            else:
                with autocast():
                    model(x)
    finally:
        for module, momentum in zip(modules, momenta, strict=True):
            module.momentum = momentum
        model.eval()


class EvalModels:
    """The model each protocol tests, built from the global model on every evaluation round.

    Keeps, on the rank that owns each client named by a `client:K` protocol, that client's BN
    statistics and local tensors from its latest local training (`client_end`), in the client
    store "eval_bn", so they survive resume and resharding.
    """

    def __init__(
        self, protocols: Sequence[Protocol], context: Context, local_names: set[str]
    ) -> None:
        self.protocols = list(protocols)
        self.context = context
        self.global_model = global_model = context.global_model
        self.comm = context.comm
        self.rank = context.rank
        self.has_bn = bool(bn_modules(global_model))
        self.watched = {p.client for p in self.protocols if p.kind == "client"}
        kept = set(bn_stat_names(global_model)) | local_names
        tensors = dict(global_model.named_parameters()) | dict(global_model.named_buffers())
        self.kept_names = [name for name in tensors if name in kept]
        self.kept = context.state.store("eval_bn")
        needs_copy = self.has_bn and any(p.kind != "averaged" for p in self.protocols)
        self.scratch = copy.deepcopy(global_model) if needs_copy else None

    def client_end(self, client: int, model: nn.Module) -> None:
        """After `client` trained: keep its statistics if a protocol names it."""
        if client in self.watched and self.kept_names:
            tensors = named_tensors(model, self.kept_names)
            self.kept.put(client, dict(zip(self.kept_names, tensors, strict=True)))

    def evaluate_all(
        self,
        evaluate: Callable[[nn.Module], dict[str, float]],
        recalibration: Callable[[], Iterator[torch.Tensor]],
    ) -> list[tuple[Protocol, dict[str, float]]]:
        """(protocol, metrics) for every protocol: `evaluate(model)` gives a model's test
        metrics (a collective), `recalibration()` the batches of the recalibration sample."""
        if not self.has_bn:  # every protocol would test the same model
            metrics = evaluate(self.global_model)
            return [(p, metrics) for p in self.protocols]
        results = []
        for protocol in self.protocols:
            if protocol.kind == "averaged":
                results.append((protocol, evaluate(self.global_model)))
                continue
            model = self.scratch
            copy_into(list(model.parameters()), list(self.global_model.parameters()))
            copy_into(list(model.buffers()), list(self.global_model.buffers()))
            if protocol.kind == "client":
                self._load_client(protocol.client, model)
            else:
                recalibrate(model, recalibration())
            results.append((protocol, evaluate(model)))
        return results

    def test_metrics(self, round_idx: int) -> dict[str, float]:
        """test/acc and test/loss of the first protocol, test/acc@<name> and test/loss@<name>
        of the others, on the global test set (a collective: every rank calls it)."""
        context = self.context
        trainer = context.trainer

        def evaluate(model: nn.Module) -> dict[str, float]:
            return evaluate_global(
                model, context.data, context.comm, context.rank, trainer.eval_batch_size,
                context.autocast,
            )  # fmt: skip

        def recalibration() -> Iterator[torch.Tensor]:
            indices = recalibration_indices(
                context.client_indices, trainer.eval_bn_samples, context.seed, round_idx,
                context.device,
            )  # fmt: skip
            return recalibration_batches(context.data, indices, trainer.eval_batch_size)

        metrics: dict[str, float] = {}
        for position, (protocol, numbers) in enumerate(self.evaluate_all(evaluate, recalibration)):
            suffix = metric_suffix(position, protocol)
            metrics[f"test/acc{suffix}"] = numbers["test/acc"]
            metrics[f"test/loss{suffix}"] = numbers["test/loss"]
        return metrics

    def _load_client(self, client: int, model: nn.Module) -> None:
        """Client `client`'s kept tensors into `model` on every rank: its owner puts them in a
        flat float64 buffer, one all-reduce (exact: one contributor) gives them to all."""
        targets = named_tensors(model, self.kept_names)
        sizes = [t.numel() for t in targets]
        flat = torch.zeros(sum(sizes) + 1, dtype=torch.float64, device=targets[0].device)
        own = self.kept.get(client) if owner(client, self.comm.world_size) == self.rank else None
        if own is not None:
            flat[:-1] = torch.cat([own[n].reshape(-1).double() for n in self.kept_names])
            flat[-1] = 1.0
        self.comm.all_reduce_sum(flat)
        if flat[-1].item() == 0.0:  # the client has not trained yet: the global model's values
            return
        chunks = torch.split(flat[:-1], sizes)
        values = [c.view_as(t).to(t.dtype) for c, t in zip(chunks, targets, strict=True)]
        copy_into(targets, values)


def recalibration_indices(
    client_indices: Sequence[torch.Tensor],
    total: int,
    seed: int,
    round_idx: int,
    device: torch.device,
) -> torch.Tensor:
    """The training samples (indices into the train split) statistics are recomputed on:
    each client's share (`recalibration_shares`), drawn without replacement from its data by
    the (seed, RECALIBRATE, round, client) stream; clients in id order."""
    shares = recalibration_shares([len(i) for i in client_indices], total)
    parts = []
    for client, (indices, share) in enumerate(zip(client_indices, shares, strict=True)):
        if share == 0:
            continue
        generator = torch_generator(seed, Stream.RECALIBRATE, round_idx, client, device=device)
        order = torch.randperm(len(indices), generator=generator, device=device)
        parts.append(indices[order[:share]])
    return torch.cat(parts)


def recalibration_batches(
    data: DeviceData, indices: torch.Tensor, batch_size: int
) -> Iterator[torch.Tensor]:
    for x, _ in data.eval_batches("train", indices, batch_size):
        yield x
