"""The config surface: every shipped YAML parses, and bad input stops before training."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT
from fedlit.cli import build_parser, main
from runs import fail_message

# Complete configs; the overlays of configs/results (no model of their own) are parsed on top of
# the configs they reduce, row by row, in tests/test_reproduce.py.
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if "model" in (yaml.safe_load(p.read_text()) or {})
)


@pytest.fixture
def quickstart(tmp_path) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    config["trainer"]["devices"] = 1
    config["logger"] = {"wandb": {"mode": "disabled"}}  # no W&B run per test
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_instantiates(config):
    parser = build_parser()
    cfg = parser.parse_args(["fit", "--config", str(config)])
    init = parser.instantiate(cfg).fit
    assert init.model is not None and init.trainer.rounds >= 1
    assert init.data.num_clients >= 1


def test_public_overrides_work_exactly_as_written(quickstart):
    parser = build_parser()
    cfg = parser.parse_args(
        [
            "fit",
            "--config",
            str(quickstart),
            "--seed",
            "7",
            "--run_dir",
            "/tmp/x",
            "--trainer.rounds",
            "3",
            "--trainer.devices",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--data.alpha",
            "0.1",
            "--model.init_args.padding",
            "1",
        ]
    )
    fit = cfg.fit
    assert (fit.seed, fit.run_dir, fit.trainer.rounds, fit.trainer.devices) == (7, "/tmp/x", 3, 2)
    assert fit.trainer.accelerator == "cpu" and fit.data.alpha == 0.1
    assert fit.model.init_args.padding == 1


def test_print_config_shows_the_resolved_sections(quickstart, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(quickstart), "--trainer.rounds", "4", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert set(printed) >= {
        "seed",
        "run_dir",
        "trainer",
        "data",
        "model",
        "algorithm",
        "callbacks",
        "logger",
    }
    assert printed["trainer"]["rounds"] == 4
    assert printed["model"]["class_path"] == "fedlit.models.CNN"
    assert printed["trainer"]["optimizer"]["init_args"]["lr"] == 0.05


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--trainer.roundz", "3"], "trainer.roundz"),
        (["--trainer.rounds", "many"], "trainer.rounds"),
        (["--trainer.accelerator", "tpu"], "trainer.accelerator"),
        (["--data.partition", "zipf"], "data.partition"),
        (["--data.dataset", "imagenet"], "data.dataset"),
        (["--algorithm.init_args.buffers", "sometimes"], "buffers"),
        (["--model", "fedlit.models.NoSuchNet"], "model"),
        (["--trainer.rounds", "0"], "trainer.rounds must be a positive integer, got 0"),
        (["--data.alpha", "-1"], "data.alpha"),
        (
            ["--trainer.clients_per_round", "11"],
            "trainer.clients_per_round must be between 1 and data.num_clients=10",
        ),
        (["--data.local_test", "none"], "trainer.personal_eval needs per-client test splits"),
        (["--trainer.devices", "11"], "ranks beyond the last client would own no client"),
        (["--data.num_clients", "500", "--data.min_samples", "20"], "data.min_samples"),
        (["--seed", "-1"], "seed must be a non-negative integer"),
        (
            ["--trainer.optimizer.init_args.lr", "-0.1"],
            "trainer.optimizer (SGD) refuses its init_args: Invalid learning rate: -0.1",
        ),
        (
            [
                "--trainer.optimizer",
                '{"class_path": "torch.optim.Adam", "init_args": {"betas": [0.9, 1.5]}}',
            ],
            "trainer.optimizer (Adam) refuses its init_args: Invalid beta parameter at index 1",
        ),
        (
            ["--trainer.num_nodes", "2"],
            "trainer.num_nodes=2 needs every node started by a launcher",
        ),
        (["--model", "torch.nn.Identity"], "model: torch.nn.Identity has no trainable parameters"),
        (["--algorithm", "fedlit.models.CNN"], "does not implement protocol Algorithm"),
    ],
)
def test_bad_settings_stop_before_training_with_the_setting_named(
    quickstart, capsys, override, expected
):
    err = fail_message(capsys, ["fit", "--config", str(quickstart), *override])
    assert expected in err
    assert not (quickstart.parent / "run" / "metrics.jsonl").exists()


def test_a_config_naming_code_of_the_wrong_kind_is_refused_before_calling_it(
    quickstart, tmp_path, capsys
):
    """A config is code (fedlit.kinds): an entry is checked for its kind before anything is
    instantiated, so neither a shell command through subprocess.Popen as a callback nor
    os.system as a model runs."""
    marker = tmp_path / "ran"
    popen = json.dumps(
        [
            {
                "class_path": "subprocess.Popen",
                "init_args": {"args": f"touch {marker}", "shell": True},
            }
        ]
    )
    system = json.dumps({"class_path": "os.system", "init_args": {"command": f"touch {marker}"}})
    err = fail_message(capsys, ["fit", "--config", str(quickstart), "--callbacks", popen])
    assert "callbacks[0]: subprocess.Popen is a class without any of the callback hooks" in err
    for command in ("fit", "partition"):  # the parser refuses it: not a subclass of Module
        err = fail_message(capsys, [command, "--config", str(quickstart), "--model", system])
        assert "os.system does not correspond to a subclass of Module" in err
    for key in ("--trainer.optimizer", "--algorithm", "--server_optimizer"):
        err = fail_message(capsys, ["fit", "--config", str(quickstart), key, system])
        assert key.lstrip("-") in err and "os.system" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "is empty: a fedlit config is a YAML mapping of sections (seed, run_dir, trainer"),
        ("# only a comment\n", "is empty: a fedlit config is a YAML mapping"),
        ("- seed: 0\n- run_dir: x\n", "holds a YAML list: a fedlit config is a YAML mapping"),
        ("seed: [0\n", "is not valid YAML: expected ',' or ']'"),
    ],
    ids=["empty", "comment", "list", "not_yaml"],
)
def test_a_config_file_that_is_not_a_mapping_says_what_a_config_is(
    tmp_path, capsys, text, expected
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = fail_message(capsys, ["fit", "--config", str(path)])
    assert f"--config {path} {expected}" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_without_a_gpu_is_refused_before_launch(quickstart, capsys):
    err = fail_message(
        capsys, ["fit", "--config", str(quickstart), "--trainer.accelerator", "cuda"]
    )
    assert "trainer.accelerator=cuda but no CUDA device is visible here" in err


def test_wandb_online_without_an_api_key_is_refused_before_launch(
    quickstart, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    err = fail_message(
        capsys, ["fit", "--config", str(quickstart), "--logger.wandb.mode", "online"]
    )
    assert "logger.wandb.mode=online needs a W&B API key, and none is configured" in err
    assert not (quickstart.parent / "run").exists()


def test_missing_dataset_files_with_download_off(tmp_path, capsys):
    err = fail_message(
        capsys,
        [
            "fit",
            "--model",
            "fedlit.models.CNN",
            "--data.dataset",
            "cifar10",
            "--data.root",
            str(tmp_path / "nothing"),
            "--run_dir",
            str(tmp_path / "run"),
        ],
    )
    assert "data.download" in err and "data.root" in err


def test_model_is_required(tmp_path, capsys):
    err = fail_message(capsys, ["fit", "--run_dir", str(tmp_path)])
    assert "model is required" in err


def test_partition_subcommand_prints_counts_and_writes_heat_map(quickstart, capsys):
    main(["partition", "--config", str(quickstart)])
    out = capsys.readouterr().out
    assert "heat map written to" in out
    heat_map = quickstart.parent / "run_partition.png"  # beside the run, never inside it
    assert f"heat map written to {heat_map}" in out
    assert heat_map.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (quickstart.parent / "run" / "plots" / "partition.png").exists()


def test_partition_writes_where_out_says(quickstart, tmp_path, capsys):
    out_path = tmp_path / "preview.png"
    main(["partition", "--config", str(quickstart), "--out", str(out_path)])
    assert f"heat map written to {out_path}" in capsys.readouterr().out
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callbacks_from_the_config_receive_the_hooks(quickstart, tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(
        "import json\n"
        "class RoundLog:\n"
        "    def __init__(self, path: str, every: int = 1):\n"
        "        self.path, self.every = path, every\n"
        "    def on_round_end(self, round, metrics):\n"
        "        if round % self.every == 0:\n"
        "            with open(self.path, 'a') as f:\n"
        "                f.write(json.dumps([round, metrics['train/loss']]) + '\\n')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    log = tmp_path / "rounds.jsonl"
    callbacks = (
        f'[{{"class_path": "my_callbacks.RoundLog", "init_args": {{"path": "{log}", "every": 2}}}}]'
    )
    main(
        [
            "fit",
            "--config",
            str(quickstart),
            "--trainer.rounds",
            "4",
            "--logger.quiet",
            "true",
            "--callbacks",
            callbacks,
        ]
    )
    rows = [yaml.safe_load(line) for line in log.read_text().splitlines()]
    assert [r[0] for r in rows] == [2, 4] and all(r[1] > 0 for r in rows)
    saved = yaml.safe_load((quickstart.parent / "run" / "config.yaml").read_text())
    assert saved["callbacks"][0]["class_path"] == "my_callbacks.RoundLog"
    assert saved["callbacks"][0]["init_args"]["every"] == 2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ('[{"class_path": "no_such_module.Thing"}]', "callbacks[0].class_path: cannot import"),
        (
            '[{"class_path": "callbacks.freezing.FedPartSchedule", '
            '"init_args": {"warmup_roundz": 1}}]',
            "callbacks[0] (callbacks.freezing.FedPartSchedule)",
        ),
        (
            '[{"class_path": "fedlit.state.ClientStore", "init_args": {"device": "cpu"}}]',
            "callbacks[0]: fedlit.state.ClientStore is a class without any of the callback hooks",
        ),
    ],
)
def test_bad_callbacks_are_refused_before_training(quickstart, capsys, spec, expected):
    err = fail_message(capsys, ["fit", "--config", str(quickstart), "--callbacks", spec])
    assert expected in err


# ---- the official configs ---------------------------------------------------------------------


def test_every_official_config_says_where_each_choice_comes_from():
    configs = sorted((ROOT / "configs" / "official").glob("*.yaml"))
    assert len(configs) >= 8
    for path in configs:
        text = path.read_text()
        header = [line for line in text.splitlines() if line.startswith("#")]
        assert len(header) >= 8, path.name
        assert "official" in text.lower()
        config = yaml.safe_load(text)
        assert config["model"]["init_args"]["init"] == "official", path.name


@pytest.mark.parametrize("is_main", [True, False], ids=["rank0", "rank1"])
def test_a_divergence_is_said_once_by_rank_0_and_every_rank_exits_2(
    quickstart, capsys, monkeypatch, is_main
):
    import fedlit.engine as engine
    from fedlit.divergence import DivergenceError

    fed = SimpleNamespace(context=SimpleNamespace(is_main=is_main))

    def diverge(fed) -> None:
        raise DivergenceError("training diverged in round 1: train/loss is nan")

    monkeypatch.setattr(engine, "prepare", lambda run: fed)  # cli imports both when training
    monkeypatch.setattr(engine, "train", diverge)
    err = fail_message(capsys, ["fit", "--config", str(quickstart)])
    assert err.count("training diverged in round 1") == (1 if is_main else 0)
