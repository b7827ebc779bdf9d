"""MOON: the wrapped model, the contrastive loss, where gradients go, and the per-client
previous models, which must stay with their client on the rank that owns it."""

import copy
import math
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fedlit.algorithms import MOON, FedAvg
from fedlit.algorithms.moon import MoonModel, contrastive_loss
from fedlit.clients import owner
from fedlit.config import RunConfig
from fedlit.engine import prepare, run_round
from fedlit.launch import leave_process_group
from fedlit.models import CNN, MLP, VGG11, ResNet20, check_layer_map
from runs import context_for, free_port, join_as_torchrun_rank, tiny_run

CPU = torch.device("cpu")


def batch(n: int = 6, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, dim, generator=generator), torch.arange(n) % 3


def moon_and_models(**kwargs) -> tuple[MOON, nn.Module, nn.Module]:
    """A set-up MOON, the global model it was set up with, and a working copy."""
    torch.manual_seed(0)
    moon = MOON(projection_dim=kwargs.pop("projection_dim", 4), **kwargs)
    global_model = moon.build_model(MLP(3, (6,), hidden=(8,)))
    moon.setup(context=context_for(global_model))
    return moon, global_model, copy.deepcopy(global_model)


def nudge(model: nn.Module, amount: float) -> None:
    """A stand-in for local training: move every parameter by a different amount."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(amount * (i + 1) / 10)


def frozen(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval()


# --- the wrapped model -------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize(
    ("backbone", "shape"),
    [
        (partial(CNN, padding=2), (1, 8, 8)),
        (MLP, (60,)),  # logistic regression: its features are the input itself
        (ResNet20, (3, 8, 8)),  # its last layer holds a BN as well as the classifier
        (VGG11, (3, 8, 8)),
    ],
    ids=["cnn", "logistic", "resnet20", "vgg11"],
)
def test_wrapped_layer_map_covers_every_tensor_once(backbone, shape, projection):
    plain = backbone(10, shape)
    model = MOON(projection=projection, projection_dim=16).build_model(backbone(10, shape))
    layers = model.layer_map()
    check_layer_map(model, layers)
    names = [layer.name for layer in layers]
    z, logits = model.features_and_logits(torch.randn(2, *shape))
    assert logits.shape == (2, 10)
    if projection:
        # backbone layers minus the classifier, then the head, then the new classifier
        assert names[-3:] == ["head.l1", "head.l2", "classifier"]
        assert model.feature_dim == 16 and z.shape == (2, 16)
        assert model.head.l1.in_features == model.head.l1.out_features == plain.feature_dim
        plain_params = sum(p.numel() for p in plain.parameters())
        classifier = plain.feature_dim * 10 + 10
        d = plain.feature_dim
        head = (d + 1) * d + (d + 1) * 16 + (16 + 1) * 10  # l1, l2, classifier
        assert sum(p.numel() for p in model.parameters()) == plain_params - classifier + head
    else:
        assert names == [layer.name for layer in plain.layer_map()]
        assert model.feature_dim == plain.feature_dim and z.shape == (2, plain.feature_dim)


def test_without_projection_the_wrapper_computes_the_backbone_exactly():
    torch.manual_seed(0)
    backbone = CNN(10, (1, 8, 8), padding=2)
    reference = copy.deepcopy(backbone)
    model = MoonModel(backbone, projection_dim=None)
    x = torch.randn(4, 1, 8, 8)
    z, logits = model.features_and_logits(x)
    assert torch.equal(logits, reference(x)) and torch.equal(z, reference.features(x))


def test_a_model_without_a_recognisable_classifier_is_refused():
    class Odd(nn.Module):
        feature_dim = 5

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)  # in_features != feature_dim

        def features(self, x):
            return x

        def layer_map(self):
            from fedlit.models import layers_from_modules

            return layers_from_modules(self, [("fc", ["fc"])])

    with pytest.raises(ValueError, match=r"one nn.Linear with in_features=5 in the last layer"):
        MOON().build_model(Odd())
    # a plain module gets a derived layer map, but MOON needs the representation it contrasts
    with pytest.raises(
        ValueError, match=r"needs features\(x\) and feature_dim, and Linear has no "
    ):
        MOON().build_model(nn.Linear(2, 2))


# --- the loss ----------------------------------------------------------------------------------


def test_contrastive_loss_matches_a_hand_computed_example():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z_glob = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos: 1, 1/sqrt(2)
    z_prev = torch.tensor([[0.0, 3.0], [0.0, -1.0]])  # cos: 0, -1
    tau = 0.5
    # sample 1: logits (2, 0); sample 2: logits (sqrt(2), -2)
    first = -math.log(math.exp(2) / (math.exp(2) + 1))
    second = -math.log(math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + math.exp(-2)))
    assert contrastive_loss(z, z_glob, [z_prev], tau).item() == pytest.approx(
        (first + second) / 2, rel=1e-6
    )
    # a second negative adds a logit per sample: z_prev again doubles the negative mass
    first2 = -math.log(math.exp(2) / (math.exp(2) + 2))
    second2 = -math.log(math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 2 * math.exp(-2)))
    assert contrastive_loss(z, z_glob, [z_prev, z_prev], tau).item() == pytest.approx(
        (first2 + second2) / 2, rel=1e-6
    )


def test_mu_zero_is_fedavgs_loss():
    moon, _, working = moon_and_models(mu=0.0)
    x, y = batch()
    moon.client_start(client=0, model=working)
    nudge(working, 0.3)
    assert torch.equal(moon.loss(working, x, y), FedAvg().loss(working, x, y))
    # and without the head it is FedAvg's loss on the unwrapped backbone
    torch.manual_seed(0)
    backbone = MLP(3, (6,), hidden=(8,))
    plain = copy.deepcopy(backbone)
    wrapped = MOON(mu=0.0, projection=False).build_model(backbone)
    assert torch.equal(MOON(mu=0.0).loss(wrapped, x, y), FedAvg().loss(plain, x, y))


def test_first_step_of_a_first_round_contrasts_three_equal_models():
    moon, _, working = moon_and_models(mu=2.0)
    x, y = batch()
    moon.client_start(client=0, model=working)
    # received == initial global == working: both similarities are 1, the term is log 2
    expected = F.cross_entropy(working(x), y) + 2.0 * math.log(2)
    torch.testing.assert_close(moon.loss(working, x, y), expected)


def test_loss_uses_the_received_model_and_the_clients_previous_model():
    moon, _, working = moon_and_models(mu=1.5, temperature=0.7)
    x, y = batch()
    moon.client_start(client=3, model=working)
    nudge(working, 0.5)
    moon.client_end(client=3, model=working)
    previous = frozen(working)
    # the next round: the client receives other weights, then takes a step away from them
    nudge(working, -0.8)
    received = frozen(working)
    moon.client_start(client=3, model=working)
    nudge(working, 0.05)
    z, logits = working.features_and_logits(x)
    expected = F.cross_entropy(logits, y) + 1.5 * contrastive_loss(
        z, received.features(x), [previous.features(x)], 0.7
    )
    torch.testing.assert_close(moon.loss(working, x, y), expected)


def test_gradient_reaches_only_the_trained_model():
    moon, _, working = moon_and_models(mu=1.0)
    x, y = batch()
    working.backbone.fc1.requires_grad_(False)  # a layer outside the round's selection
    moon.client_start(client=0, model=working)
    moon.client_end(client=0, model=working)
    nudge(working, 0.2)
    moon.client_start(client=0, model=working)
    nudge(working, 0.2)
    moon.loss(working, x, y).backward()
    for reference in (moon._global, *moon._previous):
        assert not reference.training
        for p in reference.parameters():
            assert not p.requires_grad and p.grad is None
    assert working.backbone.fc1.weight.grad is None
    for name in ("head.l1.weight", "head.l2.weight", "classifier.weight"):
        assert working.get_parameter(name).grad.abs().sum() > 0
    # the contrastive term alone sends gradient into the projection head, not the classifier
    working.zero_grad(set_to_none=True)
    z = working.features(x)
    with torch.no_grad():
        z_glob = moon._global.features(x)
        z_prev = moon._previous[0].features(x)
    contrastive_loss(z, z_glob, [z_prev], 0.5).backward()
    assert working.classifier.weight.grad is None
    assert working.head.l2.weight.grad.abs().sum() > 0


# --- per-client state --------------------------------------------------------------------------


def stored(moon: MOON, client: int) -> list[dict[str, torch.Tensor]]:
    return [store.get(client) for store in moon._stores if client in store]


def same_state(a: dict[str, torch.Tensor], b: nn.Module) -> bool:
    state = {**dict(b.named_parameters()), **dict(b.named_buffers())}
    return a.keys() == state.keys() and all(torch.equal(a[k], state[k]) for k in a)


def test_history_keeps_the_newest_models_of_each_client():
    moon, _, working = moon_and_models(history=2)
    x, y = batch()
    trained = []
    for step in range(3):
        moon.client_start(client=1, model=working)
        nudge(working, 0.1 * (step + 1))
        moon.client_end(client=1, model=working)
        trained.append(frozen(working))
    kept = stored(moon, 1)
    assert len(kept) == 2 and moon.taken_part(1) == 3
    assert sorted(i for i, m in enumerate(trained) for s in kept if same_state(s, m)) == [1, 2]
    assert stored(moon, 0) == []  # a client that never took part costs nothing
    nudge(working, -1.0)
    received = frozen(working)
    moon.client_start(client=1, model=working)
    z, logits = working.features_and_logits(x)
    negatives = [trained[1].features(x), trained[2].features(x)]
    expected = F.cross_entropy(logits, y) + 5.0 * contrastive_loss(
        z, received.features(x), negatives, 0.5
    )
    torch.testing.assert_close(moon.loss(working, x, y), expected)


def test_the_previous_models_are_client_state_that_a_new_rank_restores():
    """MOON keeps its clients' previous models in the client-state registry: what one rank
    saved, another (a resumed run, maybe on other ranks) loads and contrasts against."""
    torch.manual_seed(0)
    moon = MOON(projection_dim=4, offload=True)
    global_model = moon.build_model(MLP(3, (6,), hidden=(8,)))
    context = context_for(global_model)
    moon.setup(context=context)
    working = copy.deepcopy(global_model)
    x, y = batch()
    for client in (0, 2):
        moon.client_start(client=client, model=working)
        nudge(working, 0.3 + client)
        moon.client_end(client=client, model=working)
    saved = context.state.state_dict()
    assert set(saved) == {"moon/previous_0", "moon/taken_part"}
    assert set(saved["moon/previous_0"]) == {0, 2}
    assert all(t.device == CPU for t in saved["moon/previous_0"][0].values())
    restored = MOON(projection_dim=4, offload=True)
    restored_context = context_for(copy.deepcopy(global_model))
    restored.setup(context=restored_context)
    restored_context.state.load_state_dict(saved, lambda client: True)
    nudge(working, -0.4)
    for algo in (moon, restored):
        algo.client_start(client=2, model=working)
    assert torch.equal(moon.loss(working, x, y), restored.loss(working, x, y))
    assert restored.taken_part(2) == 1 and restored.taken_part(1) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu": -0.5}, r"algorithm\.mu must be >= 0, got -0.5"),
        ({"temperature": 0.0}, r"algorithm\.temperature must be > 0, got 0.0"),
        ({"projection_dim": 0}, r"algorithm\.projection_dim must be an integer >= 1, got 0"),
        ({"history": 0}, r"algorithm\.history must be an integer >= 1, got 0"),
        ({"buffers": "none"}, r"algorithm\.buffers must be one of \['average', 'local'\]"),
    ],
)
def test_bad_settings_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MOON(**kwargs)


# --- a real 2-rank run: 4 clients on 2 ranks --------------------------------------------------

ROUNDS = 2


class TrainedModels:
    """Keeps a copy of every client's model at the end of its local training (last round wins)."""

    def __init__(self):
        self.last: dict[int, dict[str, torch.Tensor]] = {}
        self.rounds: dict[int, list[int]] = {}

    def on_client_end(self, round, client, model):
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.last[client] = {k: v.detach().clone() for k, v in state.items()}
        self.rounds.setdefault(client, []).append(round)


def moon_run(run_dir, recorder) -> RunConfig:
    return tiny_run(
        run_dir,
        model=partial(CNN, padding=2),
        algorithm=MOON(mu=1.0, projection_dim=16),
        callbacks=[recorder],
        rounds=ROUNDS,
        clients_per_round=3,
        batch_size=32,
    )


def run_moon(run_dir) -> dict:
    recorder = TrainedModels()
    run = moon_run(run_dir, recorder)
    fed = prepare(run)
    for round_idx in range(1, ROUNDS + 1):
        run_round(fed, round_idx)
    result = {
        "rank": fed.context.rank,
        "moon": fed.context.state.state_dict(),
        "trained": recorder.last,
        "rounds": recorder.rounds,
        "global": {k: v.clone() for k, v in fed.global_model.state_dict().items()},
    }
    leave_process_group(fed.fabric)
    return result


def _rank_worker(rank: int, port: int, out_dir) -> None:
    join_as_torchrun_rank(rank, port)
    torch.save(run_moon(out_dir / f"run{rank}"), out_dir / f"rank{rank}.pt")


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.multiprocess
def test_two_ranks_keep_each_clients_previous_model_on_its_owner(tmp_path):
    mp.spawn(_rank_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    everyone: dict[int, dict[str, torch.Tensor]] = {}
    for rank, result in enumerate(ranks):
        assert result["rank"] == rank
        kept = result["moon"]["moon/previous_0"]  # history 1: one previous model per client
        taken_part = result["moon"]["moon/taken_part"]
        # each rank holds exactly the clients it owns that have taken part, nobody else's
        assert set(kept) == set(result["trained"]) == set(taken_part)
        assert kept and all(owner(c, 2) == rank for c in kept)
        for client, state in kept.items():
            # the stored previous model is the client's trained model of its last round
            assert_states_equal(state, result["trained"][client])
            assert int(taken_part[client]["count"]) == len(result["rounds"][client])
        everyone.update(kept)
    assert len(everyone) == 4  # rounds 1 and 2 sample {0, 2, 3} and {1, 2, 3}: all took part
    weights = [everyone[c]["classifier.weight"] for c in sorted(everyone)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(weights[i], weights[j])
    # separate per-client state gives the 1-rank run's numbers exactly
    single = run_moon(tmp_path / "single")
    assert_states_equal(single["global"], ranks[0]["global"])
    assert_states_equal(single["global"], ranks[1]["global"])
    for client, state in single["moon"]["moon/previous_0"].items():
        assert_states_equal(state, everyone[client])
