"""Layer-peeled probes: where aggregation degrades features, layer by layer.

Zhu et al., "The Other Side of the Coin: Unveiling the Downsides of Model Aggregation in
Federated Learning from a Layer-peeled Perspective" (arXiv 2502.03231): the aggregated model a
client receives extracts worse-separated features than the client's own trained model, and the
damage grows with depth ("cumulative feature degradation", CFD). The probe measures this on
each probed client's own samples, once with its local model right after training
(on_client_end) and once with the model it receives after aggregation (on_aggregate_end), and
logs per layer the local and global numbers and their relative change (docs/probes.md).

The feature of a layer (decided once per run from the layer map and one dry forward pass):
- the output of the largest module whose tensors all belong to this layer or earlier ones and at
  least one to this layer, the last such module to finish in the forward pass (so a residual
  block's output once the map has covered the whole block, a conv+BN pair's BN output inside
  a block, a stem's output after its pool), followed through the parameter-free modules that
  run right after it (VGG's ReLU and max pool, VGG-16's dropout);
- for the penultimate layer: the classifier's input, exactly what the classifier rows read;
- maps with spatial dimensions are averaged over them (globally average-pooled), vectors are
  taken as they are. Activations applied functionally (F.relu) after a layer's last module are
  not part of its feature (the CNN's conv1, conv2 and fc1 are read before their ReLU).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from callbacks.feature_stats import (
    ClassMoments,
    effective_weight,
    fit_readout,
    layer_metrics,
    readout_correct,
    relative_change,
)
from fedlit.clients import Stream, stream_seed
from fedlit.context import Context
from fedlit.models.layers import Layer

SPLITS = ("train", "test")
SUMMARY_METRICS = ("ratio", "align", "cls_cos")


@dataclass(frozen=True)
class Tap:
    """Where one layer's feature is read, and which weight reads it next."""

    layer: str
    module: str
    dim: int  # width of the pooled feature
    read_input: bool = False  # the module's input (the classifier's) instead of its output
    next_weight: str | None = None  # the next layer's weight, when it reads this width

    def metrics(self, penultimate: bool) -> list[str]:
        names = ["var_w", "var_b", "ratio"]
        if self.next_weight is not None:
            names.append("align")
        if penultimate:
            names.append("cls_cos")
        return names


def pool(t: Tensor) -> Tensor:
    """(n, c, *spatial) -> (n, c) by averaging over space; (n, d) unchanged."""
    t = t.detach().float()
    return t.flatten(2).mean(2) if t.dim() > 2 else t.flatten(1)


def _layer_of_tensors(model: nn.Module, layers: list[Layer]) -> dict[str, set[int]]:
    """For every module path, the indices of the layers its tensors (recursively) belong to."""
    owner = {t: i for i, layer in enumerate(layers) for t in (*layer.params, *layer.buffers)}
    found: dict[str, set[int]] = {}
    for name, module in model.named_modules():
        tensors = [*module.named_parameters(prefix=name), *module.named_buffers(prefix=name)]
        found[name] = {owner[t] for t, _ in tensors if t in owner}
    return found


def _dry_run(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, int]]:
    """(module path, pooled output width) in the order modules finish one forward pass.

    Eval mode and no_grad on a batch of zeros: no statistics move, no random number is drawn.
    """
    order: list[tuple[str, int]] = []
    handles = []
    for name, module in model.named_modules():

        def record(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            width = pool(out).shape[1] if isinstance(out, Tensor) else -1
            order.append((name, width))

        handles.append(module.register_forward_hook(record))
    modes = [m.training for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
    return order


def _first_weight(model: nn.Module, order: list[str], owners: dict[str, set[int]], index: int):
    """(module path, weight) of the first module of layer `index` to run that owns a matrix or
    conv kernel itself; None if the layer has none."""
    for name in order:
        weight = model.get_submodule(name)._parameters.get("weight") if name else None
        if weight is not None and weight.dim() >= 2 and owners[name] == {index}:
            return name, weight
    return None


def plan_taps(
    model: nn.Module, layers: list[Layer], input_shape: tuple[int, ...], num_classes: int
) -> tuple[list[Tap], str]:
    """The taps of every layer but the classifier, and the classifier's weight name."""
    if len(layers) < 2:
        raise ValueError(
            f"LayerPeeledProbe needs a model with at least two layers, {type(model).__name__} has "
            f"{len(layers)}: there is no feature layer before the classifier"
        )
    owners = _layer_of_tensors(model, layers)
    finished = _dry_run(model, input_shape)
    order = [name for name, _ in finished]
    last = len(layers) - 1
    classifier_name = None
    for name in order:
        weight = model.get_submodule(name)._parameters.get("weight") if name else None
        if weight is not None and weight.dim() == 2 and owners[name] == {last}:
            classifier_name = name  # the last linear module of the last layer to run
    classifier = model.get_submodule(classifier_name) if classifier_name else None
    if classifier is None or classifier.weight.shape[0] != num_classes:
        raise ValueError(
            f"LayerPeeledProbe needs the last layer of the map ({layers[-1].name!r}) to end in a "
            f"linear classifier with {num_classes} outputs"
        )
    taps = []
    for index, layer in enumerate(layers[:last]):
        if index == last - 1:
            dim = classifier.weight.shape[1]
            taps.append(Tap(layer.name, classifier_name, dim, True, f"{classifier_name}.weight"))
            continue
        position = _tap_position(finished, owners, index, layer.name)
        name, dim = finished[position]
        found = _first_weight(model, order, owners, index + 1)
        next_weight = None
        if found is not None and effective_weight(found[1], dim) is not None:
            next_weight = f"{found[0]}.weight"
        taps.append(Tap(layer.name, name, dim, False, next_weight))
    return taps, f"{classifier_name}.weight"


def _tap_position(
    finished: list[tuple[str, int]], owners: dict[str, set[int]], index: int, layer: str
) -> int:
    candidates = [
        p for p, (name, _) in enumerate(finished) if name and max(owners[name], default=-1) == index
    ]
    if not candidates:
        raise ValueError(f"LayerPeeledProbe: no module of layer {layer!r} ran in the forward pass")
    position = candidates[-1]
    while position + 1 < len(finished):
        name, width = finished[position + 1]
        if not name or owners[name] or width < 0:
            break
        position += 1
    return position


class LayerPeeledProbe:
    """Measure cumulative feature degradation: local vs aggregated model, layer by layer.

    Args:
        every: probe every N rounds (rounds N, 2N, ...); 0 switches the probe off (no copy of the
            model, no hook, no collective). Only evaluated rounds reach metrics.jsonl, so make
            it a multiple of trainer.eval_every.
        clients: which of the round's clients to probe: all (None), a count (drawn from the
            (seed, PROBE, round) stream, the same on every rank), or a list of client ids (those
            of them sampled in the round).
        samples: at most this many samples per client and split, drawn once per round from the
            (seed, PROBE, round, client, split) stream; the same samples serve both models.
        splits: "train" (the client's training samples) and/or "test" (its local test split,
            used when data.local_test gives one; ignored otherwise).
        batch_size: samples per forward pass of the probe.
        linear_probe: also report `probe_acc` on the test split: the accuracy on the client's
            local test samples of a ridge least-squares read-out fitted on its train samples'
            features (per layer, per model, in closed form from the same pass; needs both
            splits, hence data.local_test).
        ridge: the read-out's ridge penalty, relative to the mean diagonal of its Gram matrix.
        plots: draw plots/probe_cfd.png and plots/probe_cfd_rounds.png on rank 0.
    """

    def __init__(
        self,
        every: int = 1,
        clients: list[int] | int | None = None,
        samples: int = 512,
        splits: tuple[str, ...] = ("train", "test"),
        batch_size: int = 256,
        linear_probe: bool = False,
        ridge: float = 1e-3,
        plots: bool = True,
    ) -> None:
        if every < 0:
            raise ValueError(f"LayerPeeledProbe.every must be >= 0 (0 = off), got {every}")
        if isinstance(clients, int) and clients < 1:
            raise ValueError(f"LayerPeeledProbe.clients must be >= 1 as a count, got {clients}")
        if isinstance(clients, list) and (not clients or min(clients) < 0):
            raise ValueError(
                f"LayerPeeledProbe.clients must be null, a count or non-empty list of client ids, "
                f"got {clients}"
            )
        if samples < 1:
            raise ValueError(f"LayerPeeledProbe.samples must be >= 1, got {samples}")
        if batch_size < 1:
            raise ValueError(f"LayerPeeledProbe.batch_size must be >= 1, got {batch_size}")
        if ridge <= 0:
            raise ValueError(f"LayerPeeledProbe.ridge must be > 0, got {ridge}")
        splits = tuple(splits)
        if not splits or len(set(splits)) != len(splits) or not set(splits) <= set(SPLITS):
            raise ValueError(
                f"LayerPeeledProbe.splits must be distinct entries of {SPLITS}, got {splits}"
            )
        self.every = every
        self.clients = clients
        self.samples = samples
        self.splits = splits
        self.batch_size = batch_size
        self.linear_probe = linear_probe
        self.ridge = ridge
        self.plots = plots
        self.history: list[dict[str, Any]] = []
        self._fed: Context | None = None
        self._taps: list[Tap] = []
        self._classifier = ""
        self._active_splits: tuple[str, ...] = ()
        self._probe_model: nn.Module | None = None
        self._round_state: _RoundState | None = None

    # ---- hooks -----------------------------------------------------------------------------

    def on_fit_start(self, context: Context) -> None:
        if self.every == 0:
            return
        fed = self._fed = context
        if isinstance(self.clients, list) and max(self.clients) >= fed.num_clients:
            raise ValueError(
                f"LayerPeeledProbe.clients ids must be < data.num_clients="
                f"{fed.num_clients}, got {self.clients}"
            )
        has_test = fed.client_test_indices is not None
        # train first: the linear probe is fitted there and scored on test
        self._active_splits = tuple(
            s for s in SPLITS if s in self.splits and (s == "train" or has_test)
        )
        if not self._active_splits:
            raise ValueError(
                "LayerPeeledProbe.splits is ('test',) but the clients have no local test split: "
                "set data.local_test or add 'train'"
            )
        if self.linear_probe and self._active_splits != SPLITS:
            raise ValueError(
                "LayerPeeledProbe.linear_probe fits on the train samples and scores on the local "
                "test samples: it needs splits [train, test] and data.local_test"
            )
        # one reusable copy for the models clients receive, never one per client
        self._probe_model = copy.deepcopy(fed.global_model)
        self._taps, self._classifier = plan_taps(
            self._probe_model, fed.layers, tuple(fed.data.input_shape), fed.data.num_classes
        )

    def on_round_start(self, round: int, clients: list[int]) -> None:
        self._round_state = None
        if self._probing(round):
            self._round_state = _RoundState(self._choose(round, clients))

    def on_client_end(self, round: int, client: int, model: nn.Module) -> None:
        state = self._round_state
        if state is None or client not in state.chosen:
            return
        started = time.perf_counter()
        state.samples[client] = {s: self._subset(round, client, s) for s in self._active_splits}
        state.local[client] = self._measure(model, state.samples[client])
        state.seconds += time.perf_counter() - started

    def on_aggregate_end(self, round: int) -> None:
        state = self._round_state
        if state is None:
            return
        started = time.perf_counter()
        keys = self.keys()
        sums = torch.zeros(3 * len(keys) + 2, dtype=torch.float64)
        for client, local in state.local.items():
            model = self._fed.receive(client, into=self._probe_model)
            received = self._measure(model, state.samples[client])
            for i, key in enumerate(keys):
                l_value, g_value = local.get(key, math.nan), received.get(key, math.nan)
                if math.isfinite(l_value) and math.isfinite(g_value):
                    sums[3 * i : 3 * i + 3] += torch.tensor([l_value, g_value, 1.0])
        sums[-2] = len(state.local)
        sums[-1] = state.seconds + time.perf_counter() - started
        # one collective per probed round for every number of every layer
        reduced = self._fed.comm.all_reduce_sum(sums.to(self._fed.device)).cpu()
        values: dict[str, dict[str, dict[str, list[float]]]] = {}
        for i, (split, layer, metric) in enumerate(keys):
            l_sum, g_sum, count = (float(v) for v in reduced[3 * i : 3 * i + 3])
            if count > 0:
                entry = values.setdefault(split, {}).setdefault(layer, {})
                entry[metric] = [l_sum / count, g_sum / count]
        self.history.append(
            {
                "round": round,
                "clients": int(reduced[-2]),
                "seconds": float(reduced[-1]),
                "values": values,
            }
        )

    def on_round_end(self, round: int, metrics: dict[str, Any]) -> None:
        if self._round_state is None or not self.history or self.history[-1]["round"] != round:
            return
        self._round_state = None
        metrics.update(self.round_metrics(self.history[-1]))

    # ---- state for resuming ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = copy.deepcopy(list(state["history"]))

    # ---- measuring -------------------------------------------------------------------------

    def keys(self) -> list[tuple[str, str, str]]:
        """(split, layer, metric) of every number a probed round reduces, identical on all ranks."""
        last = len(self._taps) - 1
        keys = []
        for split in self._active_splits:
            for i, tap in enumerate(self._taps):
                names = tap.metrics(penultimate=i == last)
                if self.linear_probe and split == "test":
                    names.append("probe_acc")
                keys.extend((split, tap.layer, metric) for metric in names)
        return keys

    def _probing(self, round_idx: int) -> bool:
        return self.every > 0 and self._fed is not None and round_idx % self.every == 0

    def _choose(self, round_idx: int, clients: list[int]) -> set[int]:
        if self.clients is None:
            return set(clients)
        if isinstance(self.clients, list):
            return set(clients) & set(self.clients)
        if self.clients >= len(clients):
            return set(clients)
        rng = np.random.default_rng(stream_seed(self._fed.seed, Stream.PROBE, round_idx))
        return {int(c) for c in rng.choice(clients, size=self.clients, replace=False)}

    def _subset(self, round_idx: int, client: int, split: str) -> Tensor:
        fed = self._fed
        owned = fed.client_indices if split == "train" else fed.client_test_indices
        indices = owned[client]
        if len(indices) <= self.samples:
            return indices
        key = stream_seed(fed.seed, Stream.PROBE, round_idx, client, SPLITS.index(split))
        chosen = np.random.default_rng(key).choice(len(indices), self.samples, replace=False)
        return indices[torch.as_tensor(np.sort(chosen), device=indices.device)]

    def _measure(self, model: nn.Module, samples: dict[str, Tensor]) -> dict[tuple, float]:
        """Every (split, layer, metric) number of `model` on `samples`; the model is left as it
        was (mode restored, hooks removed, no gradient, no statistics moved)."""
        out: dict[tuple, float] = {}
        moments, readouts = {}, None
        for split in self._active_splits:
            moments[split], correct = self._moments(model, split, samples[split], readouts)
            if self.linear_probe and split == "train":
                readouts = {
                    layer: fit_readout(m, self.ridge) for layer, m in moments[split].items()
                }
            for layer, count in correct.items():
                out[(split, layer, "probe_acc")] = float(count) / len(samples[split])
        weights = dict(model.named_parameters())
        classifier = weights[self._classifier]
        for split, per_layer in moments.items():
            for i, tap in enumerate(self._taps):
                penultimate = i == len(self._taps) - 1
                moment = per_layer.get(tap.layer)
                if moment is None:  # an empty split (e.g. a natural local test split): no numbers
                    continue
                next_weight = None
                if tap.next_weight is not None:
                    next_weight = effective_weight(weights[tap.next_weight], tap.dim)
                numbers = layer_metrics(moment, next_weight, classifier if penultimate else None)
                for metric, value in numbers.items():
                    out[(split, tap.layer, metric)] = value
        return out

    def _moments(
        self,
        model: nn.Module,
        split: str,
        indices: Tensor,
        readouts: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, ClassMoments], dict[str, Tensor]]:
        """Class moments of every tap on `indices`, in batches; with `readouts`, also how many
        samples each layer's read-out classifies correctly."""
        fed = self._fed
        with_gram = self.linear_probe and split == "train"
        correct: dict[str, Tensor] = {}
        features: dict[str, Tensor] = {}
        handles = [self._hook(model, tap, features) for tap in self._taps]
        modes = [m.training for m in model.modules()]
        per_layer: dict[str, ClassMoments] = {}
        try:
            model.eval()
            with torch.no_grad():
                for x, y in fed.data.eval_batches(split, indices, self.batch_size):
                    with fed.autocast():
                        model(x)
                    for layer, h in features.items():
                        if layer not in per_layer:
                            per_layer[layer] = ClassMoments.zeros(
                                fed.data.num_classes, h.shape[1], h.device, with_gram
                            )
                        per_layer[layer].update(h, y)
                        if readouts is not None:
                            hits = readout_correct(readouts[layer], h, y)
                            correct[layer] = correct.get(layer, 0) + hits
                    features.clear()
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in zip(model.modules(), modes, strict=True):
                module.training = mode
        return per_layer, correct

    @staticmethod
    def _hook(model: nn.Module, tap: Tap, features: dict[str, Tensor]):
        module = model.get_submodule(tap.module)
        if tap.read_input:

            def read_input(_m: nn.Module, args: tuple) -> None:
                features[tap.layer] = pool(args[0])

            return module.register_forward_pre_hook(read_input)

        def read_output(_m: nn.Module, _args: tuple, out: Tensor) -> None:
            features[tap.layer] = pool(out)

        return module.register_forward_hook(read_output)

    # ---- reporting -------------------------------------------------------------------------

    def round_metrics(self, entry: dict[str, Any]) -> dict[str, float]:
        """metrics.jsonl entries of one probed round: per layer local, global, relative change;
        a few scalars on the first split."""
        metrics: dict[str, float] = {"probe/clients": entry["clients"]}
        metrics["probe/seconds"] = entry["seconds"]
        for split, per_layer in entry["values"].items():
            for layer, per_metric in per_layer.items():
                for metric, (local, global_) in per_metric.items():
                    stem = f"layer/{layer}/probe/{split}_{metric}"
                    metrics[f"{stem}_local"] = local
                    metrics[f"{stem}_global"] = global_
                    change = relative_change(local, global_)
                    if math.isfinite(change):
                        metrics[f"{stem}_rel_change"] = change
        first = entry["values"].get(self._active_splits[0], {}) if self._active_splits else {}
        names = [tap.layer for tap in self._taps]
        for position, layer in (("first", names[0]), ("penultimate", names[-1])) if names else ():
            for metric in SUMMARY_METRICS:
                pair = first.get(layer, {}).get(metric)
                change = relative_change(*pair) if pair else math.nan
                if math.isfinite(change):
                    metrics[f"probe/{position}_{metric}_rel_change"] = change
        return metrics

    def draw(self, plots_dir: Path) -> None:
        """The CFD curves of the last probed round and over rounds (rank 0, figures on)."""
        if not self.plots or not self.history:
            return
        layers = [tap.layer for tap in self._taps]
        plot_cfd(self.history[-1], layers, self._active_splits, plots_dir / "probe_cfd.png")
        plot_cfd_rounds(
            self.history, layers, self._active_splits[0], plots_dir / "probe_cfd_rounds.png"
        )


@dataclass
class _RoundState:
    """What a probed round keeps between on_client_end and on_aggregate_end: small numbers and
    the sample indices, never features."""

    chosen: set[int]
    samples: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    local: dict[int, dict[tuple, float]] = field(default_factory=dict)
    seconds: float = 0.0


# ---- plots (rank 0) ------------------------------------------------------------------------

PANELS = (
    ("ratio", "Var_W / Var_B (lower = better separated)", True),
    ("align", "alignment A", False),
    ("probe_acc", "linear-probe accuracy", False),
)


def _panels(history: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """The panels with something to draw (probe_acc only with linear_probe)."""
    drawn = {m for e in history for s in e["values"].values() for v in s.values() for m in v}
    return [panel for panel in PANELS if panel[0] in drawn]


def _series(entry: dict[str, Any], split: str, layers: list[str], metric: str, pick: Callable):
    per_layer = entry["values"].get(split, {})
    xs, ys = [], []
    for x, layer in enumerate(layers):
        pair = per_layer.get(layer, {}).get(metric)
        value = pick(pair) if pair else math.nan
        if math.isfinite(value):
            xs.append(x)
            ys.append(value)
    return xs, ys


def _layer_axis(axes: Any, layers: list[str]) -> None:
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels(layers, rotation=45, ha="right", fontsize=7)
    axes.set_xlabel("layer (input to penultimate)")
    axes.grid(alpha=0.3)


def plot_cfd(entry: dict[str, Any], layers: list[str], splits: tuple[str, ...], path: Path) -> None:
    """The CFD curve of one probed round: each metric vs layer, local vs aggregated model."""
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    panels = _panels([entry])
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (metric, label, log) in zip(grid, panels, strict=True):
        for colour, split in zip(("tab:blue", "tab:orange"), splits, strict=False):
            for which, style, name in ((0, "-o", "local"), (1, "--x", "aggregated")):
                xs, ys = _series(entry, split, layers, metric, lambda p, w=which: p[w])
                if xs:
                    axes.plot(xs, ys, style, color=colour, markersize=4, label=f"{split} {name}")
        if log and axes.get_lines():
            axes.set_yscale("log")
        axes.set_ylabel(label)
        _layer_axis(axes, layers)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.suptitle(f"layer-peeled probe, round {entry['round']} ({entry['clients']} clients)")
    figure.savefig(path)


def plot_cfd_rounds(history: list[dict[str, Any]], layers: list[str], split: str, path: Path):
    """Relative change (aggregated vs local) vs layer, one line per probed round."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(11, 4.5), dpi=110, layout="constrained")
    rounds = [e["round"] for e in history]
    norm = Normalize(vmin=min(rounds), vmax=max(max(rounds), min(rounds) + 1))
    cmap = colormaps["viridis"]
    panels = _panels(history)
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (metric, label, _) in zip(grid, panels, strict=True):
        for entry in history:
            xs, ys = _series(entry, split, layers, metric, lambda p: relative_change(*p))
            if xs:
                axes.plot(xs, ys, "-o", color=cmap(norm(entry["round"])), markersize=3)
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_ylabel(f"relative change of {label.split(' (')[0]}")
        _layer_axis(axes, layers)
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(grid), label="round")
    figure.suptitle(
        f"cumulative feature degradation: (aggregated - local) / |local| per probed round "
        f"({split} samples)"
    )
    figure.savefig(path)
