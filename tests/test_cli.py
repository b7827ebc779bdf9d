"""The config surface: every shipped YAML parses, and bad input stops before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from fedlit.cli import build_parser, main

# Complete configs; the overlays of configs/results (no model of their own) are parsed on top of
# the configs they reduce, row by row, in tests/test_reproduce.py.
CONFIGS = sorted(
    p
    for p in (ROOT / "configs").rglob("*.yaml")
    if "model" in (yaml.safe_load(p.read_text()) or {})
)


def fail_message(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


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
    ],
)
def test_bad_settings_stop_before_training_with_the_setting_named(
    quickstart, capsys, override, expected
):
    err = fail_message(capsys, ["fit", "--config", str(quickstart), *override])
    assert expected in err
    assert not (quickstart.parent / "run" / "metrics.jsonl").exists()


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
            '[{"class_path": "fedlit.state.ClientStore", "init_args": {"devize": "cpu"}}]',
            "callbacks[0] (fedlit.state.ClientStore)",
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
