"""FedPart's schedule: the rounds the spec lists, the orders, and what a partial round moves."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import yaml
from rich.console import Console

from callbacks.freezing import FedPartSchedule
from fedlit.algorithms import MOON, FedAvg, FedMR, FedProx
from fedlit.cli import main
from fedlit.data.config import DataConfig
from fedlit.engine import fit, prepare, run_round
from fedlit.models import CNN, ResNet8
from fedlit.schedule import planned_layers, schedule_table, segments
from runs import RESNET8_LAYERS, GradRecorder, start, tiny_run

FULL = None


def spec_cycle() -> list[str | None]:
    """One official cycle written out: 5 full rounds, then every layer for 2 rounds."""
    cycle: list[str | None] = [FULL] * 5
    for layer in RESNET8_LAYERS:
        cycle += [layer, layer]
    return cycle


def schedule_of(schedule: FedPartSchedule, names: list[str], rounds: int) -> list[str | None]:
    return [schedule.layer_at(r, names) for r in range(1, rounds + 1)]


def test_resnet8_schedule_matches_the_spec_round_by_round():
    schedule = FedPartSchedule()  # the official R = 2, W = 5
    assert schedule.cycle_length(10) == 25
    planned = schedule_of(schedule, RESNET8_LAYERS, 125)
    assert planned == spec_cycle() * 5  # 5 cycles = 125 rounds
    assert planned[:7] == [FULL] * 5 + ["stem", "stem"]
    assert planned[23:31] == ["fc", "fc", FULL, FULL, FULL, FULL, FULL, "stem"]
    # the engine's question gets the same answer, as a list of names
    assert schedule.select_layers(6, RESNET8_LAYERS) == ["stem"]
    assert schedule.select_layers(5, RESNET8_LAYERS) is None


def test_resnet18_cycle_is_47_rounds():
    from fedlit.models import ResNet18

    names = [layer.name for layer in ResNet18(10).layer_map()]
    schedule = FedPartSchedule()
    assert len(names) == 21 and schedule.cycle_length(len(names)) == 47
    planned = schedule_of(schedule, names, 3 * 47)
    assert planned.count(FULL) == 15 and all(planned.count(n) == 6 for n in names)


def test_after_the_last_cycle_every_round_is_full():
    schedule = FedPartSchedule(cycles=1)
    planned = schedule_of(schedule, RESNET8_LAYERS, 40)
    assert planned[:25] == spec_cycle() and planned[25:] == [FULL] * 15


def test_zero_warmup_and_other_rounds_per_layer():
    planned = schedule_of(FedPartSchedule(warmup_rounds=0, rounds_per_layer=3), ["a", "b"], 12)
    assert planned == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3


def test_reverse_order_goes_deep_to_shallow():
    planned = schedule_of(FedPartSchedule(order="reverse"), RESNET8_LAYERS, 25)
    assert planned[5:] == [n for n in reversed(RESNET8_LAYERS) for _ in range(2)]


def test_random_order_is_a_seeded_permutation_per_cycle():
    schedule = FedPartSchedule(order="random", warmup_rounds=1, rounds_per_layer=1)
    schedule.seed = 3
    cycles = [
        schedule_of(schedule, RESNET8_LAYERS, 55)[c * 11 + 1 : (c + 1) * 11] for c in range(5)
    ]
    for cycle in cycles:
        assert sorted(cycle) == sorted(RESNET8_LAYERS)  # every layer once per cycle
    assert len({tuple(c) for c in cycles}) > 1  # a fresh order per cycle
    again = FedPartSchedule(order="random", warmup_rounds=1, rounds_per_layer=1)
    again.seed = 3
    assert schedule_of(again, RESNET8_LAYERS, 55) == schedule_of(schedule, RESNET8_LAYERS, 55)
    again.seed = 4
    assert schedule_of(again, RESNET8_LAYERS, 55) != schedule_of(schedule, RESNET8_LAYERS, 55)


def test_a_subset_of_layers_is_cycled_in_the_given_order():
    schedule = FedPartSchedule(warmup_rounds=1, rounds_per_layer=1, layers=["fc", "stem"])
    assert schedule_of(schedule, RESNET8_LAYERS, 6) == [FULL, "fc", "stem", FULL, "fc", "stem"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds_per_layer": 0}, "rounds_per_layer must be >= 1, got 0"),
        ({"warmup_rounds": -1}, "warmup_rounds must be >= 0, got -1"),
        ({"cycles": 0}, "cycles must be >= 1 or null, got 0"),
        ({"order": "sideways"}, "order must be one of ('forward', 'reverse', 'random')"),
        ({"layers": []}, "must name at least one layer"),
        ({"layers": ["fc", "fc"]}, "lists a layer twice"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FedPartSchedule(**kwargs)


def digits_fedpart_config(tmp_path, **schedule) -> str:
    config = {
        "run_dir": str(tmp_path / "run"),
        "trainer": {"rounds": 2, "devices": 1, "accelerator": "cpu", "cpu_threads": 1},
        "data": {"dataset": "digits", "num_clients": 2},
        "model": {"class_path": "fedlit.models.CNN", "init_args": {"padding": 2}},
        "logger": {"quiet": True, "wandb": {"mode": "disabled"}},
        "callbacks": [{"class_path": "callbacks.freezing.FedPartSchedule", "init_args": schedule}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_unknown_layer_names_fail_before_training(tmp_path, capsys):
    config = digits_fedpart_config(tmp_path, layers=["conv1", "conv9"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "FedPartSchedule.layers names ['conv9']" in err
    assert "'conv1', 'conv2', 'fc1', 'fc2', 'fc3'" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_print_config_shows_the_schedule_settings(tmp_path, capsys):
    config = digits_fedpart_config(tmp_path, warmup_rounds=1)
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = printed["callbacks"]
    assert callback["class_path"] == "callbacks.freezing.FedPartSchedule"
    assert callback["init_args"] == {
        "rounds_per_layer": 2,
        "warmup_rounds": 1,
        "cycles": None,
        "order": "forward",
        "layers": None,
    }


def test_schedule_table_and_file(tmp_path):
    names = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    schedule = FedPartSchedule(warmup_rounds=1, rounds_per_layer=2)
    plan = planned_layers([schedule], names, 12)
    runs = segments(plan)
    assert [(s.first, s.last, s.layers) for s in runs[:3]] == [
        (1, 1, tuple(names)),
        (2, 3, ("conv1",)),
        (4, 5, ("conv2",)),
    ]
    assert runs[-1].first == 12 and runs[-1].layers == tuple(names)
    console = Console(width=120, record=True)
    console.print(schedule_table(runs, names, lambda layers: 100 * len(layers)))
    text = console.export_text()
    assert "all layers" in text and "2-3" in text and "conv1" in text and "500 B" in text

    run = tiny_run(tmp_path / "run", model=partial(CNN, padding=2), callbacks=[schedule], rounds=4)
    run.config_yaml = "seed: 0\n"
    fit(run)
    saved = json.loads((run.run_dir / "schedule.json").read_text())["rounds"]
    assert [r["layers"] for r in saved] == [names, ["conv1"], ["conv1"], ["conv2"]]
    plot = run.run_dir / "plots" / "fedpart_schedule.png"
    assert plot.read_bytes()[:4] == b"\x89PNG"


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def bn_run(tmp_path, algorithm, schedule, rounds=3):
    """ResNet-8 on 8x8 digits (BatchNorm everywhere), 3 clients that all take part."""
    data = DataConfig(dataset="digits", num_clients=3, partition="iid")
    run = tiny_run(
        tmp_path / "run",
        model=ResNet8,
        algorithm=algorithm,
        callbacks=[schedule],
        data=data,
        rounds=rounds,
        batch_size=32,
        optimizer=partial(torch.optim.Adam, lr=1e-3),
    )
    run.config_yaml = "seed: 0\n"
    return run


@pytest.mark.parametrize("buffers", ["local", "average"])
def test_a_partial_round_changes_and_counts_only_the_chosen_layer(tmp_path, buffers):
    schedule = FedPartSchedule(warmup_rounds=1, rounds_per_layer=2, layers=["s2.conv1"])
    recorder = GradRecorder()
    run = bn_run(tmp_path, FedAvg(buffers=buffers), schedule)
    run.callbacks.append(recorder)
    fed = start(run)
    run_round(fed, 1)  # full warm-up round
    layer = next(layer for layer in fed.context.layers if layer.name == "s2.conv1")
    before = state(fed.global_model)
    locals_before = {c: dict(fed.local.get(c)) for c in range(3)} if buffers == "local" else {}
    run_round(fed, 2)
    metrics = run_round(fed, 3)  # the layer's second round: clients already hold the rest
    # only the chosen layer's parameters moved. BN statistics: averaged with the weights, the
    # chosen layer's moved too; kept local, every layer's are averaged for evaluation only
    float_buffers = {b for b in layer.buffers if before[b].is_floating_point()}
    every_float_buffer = {b for b, v in fed.global_model.named_buffers() if v.is_floating_point()}
    moved_buffers = float_buffers if buffers == "average" else every_float_buffer
    assert changed(before, fed.global_model) == set(layer.params) | moved_buffers
    # frozen layers had no gradient in any client of the partial rounds
    assert recorder.with_grad[3:] == [set(layer.params)] * 6
    # the bytes of that layer only, up and down, per client
    tensors = dict(fed.global_model.named_parameters()) | dict(fed.global_model.named_buffers())
    sent = list(layer.params) + (sorted(float_buffers) if buffers == "average" else [])
    layer_bytes = sum(tensors[n].numel() * 4 for n in sent)
    assert metrics["comm/up_bytes"] == 3 * layer_bytes
    assert metrics["comm/down_bytes"] == 3 * layer_bytes
    if buffers == "local":
        # the whole network stays in train mode: frozen layers' BN statistics keep updating
        # on each client, and are kept there
        stem_mean = next(b for b in fed.context.layers[0].buffers if b.endswith("running_mean"))
        for client in range(3):
            now = fed.local.get(client)[stem_mean]
            assert not torch.equal(now, locals_before[client][stem_mean])


@pytest.mark.parametrize(
    "algorithm",
    [FedProx(mu=0.1, buffers="local"), MOON(mu=1.0, projection_dim=16, buffers="local")],
    ids=["fedprox", "moon"],
)
def test_fedpart_composes_with_fedprox_and_moon(tmp_path, algorithm):
    schedule = FedPartSchedule(warmup_rounds=1, rounds_per_layer=1)
    fed = start(bn_run(tmp_path, algorithm, schedule, rounds=3))
    run_round(fed, 1)
    names = [layer.name for layer in fed.context.layers]
    assert names[-1] == "classifier" if isinstance(algorithm, MOON) else names[-1] == "fc"
    for round_idx, layer in ((2, fed.context.layers[0]), (3, fed.context.layers[1])):
        assert schedule.select_layers(round_idx, names) == [layer.name]
        before = state(fed.global_model)
        metrics = run_round(fed, round_idx)
        params_moved = {
            k
            for k in changed(before, fed.global_model)
            if k in dict(fed.global_model.named_parameters())
        }
        assert params_moved == set(layer.params)
        assert torch.isfinite(torch.tensor(metrics["train/loss"]))


# -m slow: FedPart on 2 ranks is in the default suite (tests/test_multiprocess.py)
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_train_the_same_partial_rounds_as_one(cli, tmp_path):
    """Partial all-reduce over 2 ranks: the layers outside the round's selection stay untouched
    on every rank, so the final model equals the 1-rank run's bitwise."""
    from fedlit.checkpoint import load_checkpoint

    models = []
    for devices in (1, 2):
        run_dir = tmp_path / f"ranks{devices}"
        result = cli(
            "fit",
            "--config",
            "configs/fedpart_digits_cnn.yaml",
            "--trainer.rounds",
            "5",  # 2 full rounds, conv1 twice, conv2 once
            "--trainer.devices",
            str(devices),
            "--trainer.cpu_threads",
            "1",
            "--run_dir",
            str(run_dir),
            "--logger.quiet",
            "true",
            "--logger.wandb.mode",
            "disabled",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        models.append(load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"])
    for key, tensor in models[0].items():
        assert torch.equal(tensor, models[1][key]), key


def test_a_longer_run_repeats_a_shorter_one_round_for_round(tmp_path):
    """C cycles are the first 25 * C rounds of a longer run: nothing depends on trainer.rounds,
    so one 125-round run holds every C = 1..5 row of the paper's table."""
    curves = []
    for rounds in (3, 5):
        schedule = FedPartSchedule(warmup_rounds=1, rounds_per_layer=1)
        run = tiny_run(
            tmp_path / f"r{rounds}",
            model=partial(CNN, padding=2),
            callbacks=[schedule],
            rounds=rounds,
        )
        run.config_yaml = "seed: 0\n"
        fit(run)
        records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").open()]
        curves.append([(r["round"], r["test/acc"], r["train/loss"]) for r in records])
    assert curves[1][:3] == curves[0]


def test_fedmr_refuses_a_layer_schedule_before_launch(tmp_path):
    run = tiny_run(
        tmp_path / "run",
        model=partial(CNN, padding=2),
        algorithm=FedMR(),
        callbacks=[FedPartSchedule()],
    )
    with pytest.raises(
        ValueError,
        match=r"FedMR cannot train only some layers per round, but "
        r"callbacks \['FedPartSchedule'\] select layers",
    ):
        prepare(run)
