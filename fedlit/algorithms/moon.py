"""MOON (Li, He, Song, "Model-Contrastive Federated Learning", CVPR 2021).

A client's loss is the cross-entropy plus a contrastive term that pulls the representation z of
its current model towards the one of the round's global model and away from the one of its own
previous local model:

    loss = CE(logits, y) + mu * CE([cos(z, z_glob), cos(z, z_prev_1), ...] / tau, target 0)

The model is wrapped once (`build_model`) into backbone -> projection head -> classifier, as in
the official code (ModelFedCon): h = backbone.features(x), z = l2(relu(l1(h))), logits = l3(z).
Without the projection head (FedPart's code base), z = h and the backbone's own classifier
gives the logits.

Per-client state: each client's previous local model is kept by the rank that owns the client, in
client stores of fedlit.state (one per history slot, optionally offloaded to the CPU), so a run holds at most
`history` models per client that has taken part, plus the initial global model that stands in for
the previous model in a client's first round. During training only two kinds of extra modules
exist on the device, made once per rank and refilled in place for every client: one frozen copy of
the model the client received (z_glob) and `history` frozen slots for its previous models (z_prev).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlit.algorithms.base import BufferPolicy, check_buffers
from fedlit.comm import copy_into, named_tensors
from fedlit.context import Context
from fedlit.local_tensors import LocalClass, check_local
from fedlit.models.layers import Layer, layer_map_of, layers_from_modules
from fedlit.state import ClientStore


def find_classifier(model: nn.Module, layers: list[Layer]) -> str:
    """Module path of `model`'s classifier: the nn.Linear from `feature_dim` inputs whose
    parameters sit in the last layer of the layer map (every fedlit model computes
    `forward(x)` as that module applied to `features(x)`)."""
    dim = model.feature_dim
    last = set(layers[-1].params)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module.in_features == dim
        and {f"{name}.{p}" for p, _ in module.named_parameters()} <= last
    ]
    if len(found) != 1:
        raise ValueError(
            f"MOON cannot tell the classifier of {type(model).__name__}: expected one nn.Linear "
            f"with in_features={dim} in the last layer {layers[-1].name!r} of its layer map, "
            f"found {found or 'none'}"
        )
    return found[0]


def _prefixed(layer: Layer, prefix: str, drop: set[str]) -> Layer:
    return Layer(
        layer.name,
        tuple(prefix + p for p in layer.params if p not in drop),
        tuple(prefix + b for b in layer.buffers if b not in drop),
    )


class MoonModel(nn.Module):
    """backbone -> projection head (optional) -> classifier, with a layer map of its own.

    With `projection_dim`, the backbone's classifier is removed (replaced by nn.Identity, so
    its weights are neither trained nor communicated) and the model gains `head.l1`
    (d -> d), `head.l2` (d -> projection_dim) and `classifier` (projection_dim -> classes);
    one layer per linear module, like the model zoo, so layer-wise methods can pick them.
    Without it the backbone is unchanged and keeps its own layer names.

    `features(x)` is z, the representation MOON contrasts and the classifier's input, and
    `feature_dim` its width; `forward(x)` gives the logits, so evaluation needs nothing special.
    """

    def __init__(self, backbone: nn.Module, projection_dim: int | None = 256) -> None:
        super().__init__()
        needs = ("features", "feature_dim")
        missing = [name for name in needs if getattr(backbone, name, None) is None]
        if missing:
            raise ValueError(
                "MOON contrasts the representation its model computes before the classifier: "
                f"it needs features(x) and feature_dim, and {type(backbone).__name__} has no "
                f"{' or '.join(missing)} (every fedlit.models class has both; give your model "
                "a features(x) returning the classifier's input and its width as feature_dim)"
            )
        backbone_layers = layer_map_of(backbone)
        classifier_path = find_classifier(backbone, backbone_layers)
        self.backbone = backbone
        self.head: nn.Sequential | None = None
        if projection_dim is None:
            self._classifier_path = f"backbone.{classifier_path}"
            self.feature_dim = backbone.feature_dim
            self._layers = [_prefixed(layer, "backbone.", set()) for layer in backbone_layers]
        else:
            self._add_projection(classifier_path, projection_dim, backbone_layers)

    def _add_projection(self, classifier_path: str, dim: int, backbone_layers: list[Layer]) -> None:
        """Swap the backbone's classifier for head.l1 -> relu -> head.l2 -> classifier."""
        classifier = self.backbone.get_submodule(classifier_path)
        dropped = {f"{classifier_path}.{p}" for p, _ in classifier.named_parameters()}
        parent, _, attr = classifier_path.rpartition(".")
        setattr(self.backbone.get_submodule(parent), attr, nn.Identity())
        width = self.backbone.feature_dim
        self.head = nn.Sequential(
            OrderedDict(l1=nn.Linear(width, width), relu=nn.ReLU(), l2=nn.Linear(width, dim))
        )
        self.classifier = nn.Linear(dim, classifier.out_features)
        self._classifier_path = "classifier"
        self.feature_dim = dim
        kept = [_prefixed(layer, "backbone.", dropped) for layer in backbone_layers]
        heads = [("head.l1", ["head.l1"]), ("head.l2", ["head.l2"]), ("classifier", ["classifier"])]
        self._layers = [
            *(layer for layer in kept if layer.params or layer.buffers),
            *layers_from_modules(self, heads),
        ]

    def features(self, x: Tensor) -> Tensor:
        h = self.backbone.features(x)
        return h if self.head is None else self.head(h)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """z and the logits from one forward pass (the training step needs both)."""
        z = self.features(x)
        return z, self.get_submodule(self._classifier_path)(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]

    def layer_map(self) -> list[Layer]:
        return list(self._layers)


def contrastive_loss(z: Tensor, z_glob: Tensor, z_prev: list[Tensor], temperature: float) -> Tensor:
    """MOON's model-contrastive loss, averaged over the batch.

    The positive pair (z, z_glob) is logit 0, each previous model one more logit; with one
    previous model this is -log(e^(s_g/tau) / (e^(s_g/tau) + e^(s_p/tau))), s = cosine similarity.
    """
    sims = [F.cosine_similarity(z, z_glob, dim=-1)]
    sims += [F.cosine_similarity(z, prev, dim=-1) for prev in z_prev]
    logits = torch.stack(sims, dim=1).float() / temperature
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return F.cross_entropy(logits, target)


def _frozen_copy(model: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(model)
    frozen.requires_grad_(False)
    return frozen.eval()


def _full_state(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (views, not copies: the store copies on `put`)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _load_into(module: nn.Module, state: dict[str, Tensor]) -> None:
    copy_into(named_tensors(module, list(state)), list(state.values()))


class MOON:
    """Model-contrastive federated learning: FedAvg's server step, a contrastive local loss.

    Args:
        mu: weight of the contrastive term (paper: 5 on CIFAR-10, 1 on CIFAR-100); 0 gives
            FedAvg's loss exactly and skips the extra forward passes.
        temperature: tau, dividing the cosine similarities (paper: 0.5).
        projection: put the 2-layer projection head between backbone and classifier (official
            code); False uses the backbone's features as z (FedPart's code base).
        projection_dim: output width of the projection head (paper: 256).
        history: previous local models per client used as negatives (paper and default: 1).
            With more, a client contrasts against its `history` most recent local models (fewer
            until it has taken part that often); see docs/algorithms.md for how this differs
            from the official code's pool.
        buffers: BatchNorm statistics policy, as for FedAvg ("average" or "local").
        local: tensor classes each client keeps to itself, as for FedAvg.
        offload: keep the stored previous models (and the initial model) on the CPU and move
            one back to the device only when its client trains.
    """

    def __init__(
        self,
        mu: float = 5.0,
        temperature: float = 0.5,
        projection: bool = True,
        projection_dim: int = 256,
        history: int = 1,
        buffers: BufferPolicy = "average",
        offload: bool = False,
        local: list[LocalClass] | None = None,
    ) -> None:
        if not mu >= 0:
            raise ValueError(f"algorithm.mu must be >= 0, got {mu}")
        if not temperature > 0:
            raise ValueError(f"algorithm.temperature must be > 0, got {temperature}")
        for key, value in (("projection_dim", projection_dim), ("history", history)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"algorithm.{key} must be an integer >= 1, got {value!r}")
        check_buffers(buffers)
        self.mu = float(mu)
        self.temperature = float(temperature)
        self.projection = projection
        self.projection_dim = projection_dim
        self.history = history
        self.buffers = buffers
        self.local = check_local(local, buffers)
        self.offload = offload
        self._global: nn.Module | None = None  # frozen: the model the client received
        self._previous: list[nn.Module] = []  # frozen slots for the client's previous models
        self._active = 0  # how many of the slots hold a previous model of the current client
        self._initial: dict[str, Tensor] = {}
        self._stores: list[ClientStore] = []
        self._taken_part: ClientStore | None = None

    def build_model(self, model: nn.Module) -> MoonModel:
        return MoonModel(model, self.projection_dim if self.projection else None)

    def setup(self, context: Context) -> None:
        """Once per rank: the reusable frozen modules, the initial model (the same on every rank
        and in a resumed run: the model is built from the seed), the per-client stores."""
        global_model = context.global_model
        self._global = _frozen_copy(global_model)
        self._previous = [_frozen_copy(global_model) for _ in range(self.history)]
        keep_on = torch.device("cpu") if self.offload else context.device
        self._initial = {
            k: v.detach().to(keep_on, copy=True) for k, v in _full_state(global_model).items()
        }
        self._stores = [
            context.state.store(f"moon/previous_{k}", self.offload) for k in range(self.history)
        ]
        self._taken_part = context.state.store("moon/taken_part")

    def _require_setup(self) -> None:
        if self._global is None:
            raise RuntimeError("MOON.setup(context) must run first (the engine does)")

    def client_start(self, client: int, model: nn.Module) -> None:
        """Refill the frozen modules: the received weights, and the client's previous models."""
        self._require_setup()
        _load_into(self._global, _full_state(model))
        stored = [s.get(client) for s in self._stores if client in s]
        for slot, state in zip(self._previous, stored or [self._initial], strict=False):
            _load_into(slot, state)
        self._active = max(1, len(stored))

    def client_end(self, client: int, model: nn.Module) -> None:
        """Keep the trained model as this client's newest previous model (replacing its oldest
        once `history` are stored), on the rank that ran it."""
        self._require_setup()
        count = self.taken_part(client)
        self._stores[count % self.history].put(client, _full_state(model))
        self._taken_part.put(client, {"count": torch.tensor(count + 1)})

    def taken_part(self, client: int) -> int:
        """How often `client` has trained so far (this rank owns it)."""
        entry = self._taken_part.get(client)
        return 0 if entry is None else int(entry["count"])

    def frozen_forwards(self, taken_part: int) -> int:
        """Frozen `features` passes per batch besides the model's own, for the cost accounting:
        the received global model and the client's previous models (the initial model stands
        in for them before the client's first round), as `client_start` fills them; none when
        mu = 0, where `loss` skips them."""
        if self.mu == 0:
            return 0
        return 1 + max(1, min(self.history, taken_part))

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.mu == 0:
            return F.cross_entropy(model(x), y)
        if self._active == 0:
            raise RuntimeError(
                "MOON.loss needs client_start(client, model) first (the engine does)"
            )
        z, logits = model.features_and_logits(x)
        with torch.no_grad():
            z_glob = self._global.features(x)
            z_prev = [slot.features(x) for slot in self._previous[: self._active]]
        task = F.cross_entropy(logits, y)
        return task + self.mu * contrastive_loss(z, z_glob, z_prev, self.temperature)
