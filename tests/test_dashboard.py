"""Weights & Biases: the mode policy, an offline run read back record by record, rank 0 only,
and the sweep definitions in wandb/ driving `fedlit fit`. Nothing here touches the network."""

from __future__ import annotations

import itertools
import shlex
import struct
import sys
from pathlib import Path

import pytest
import yaml
from test_engine import make_run

from conftest import ROOT
from fedlit.cli import build_parser
from fedlit.config import LoggerConfig, WandbConfig
from fedlit.dashboard import has_api_key, layer_series, open_dashboard, resolve_mode, resolve_names
from fedlit.engine import fit
from fedlit.loggers import read_metrics

SWEEPS = sorted((ROOT / "wandb").glob("*.yaml"))


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B's own files (settings, cache, artifacts) under tmp_path; no key, no mode override."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return tmp_path


# ---------------------------------------------------------------------------------------------
# The mode policy


def test_auto_mode_is_offline_without_a_key_and_online_with_one(wandb_env, monkeypatch):
    auto = WandbConfig()
    assert resolve_mode(auto, {}) == ("offline", "no API key configured")
    assert resolve_mode(auto, {"WANDB_API_KEY": "x" * 40})[0] == "online"
    # the netrc entry that `wandb login` writes counts as a key, for the configured host only
    netrc = wandb_env / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert has_api_key({"NETRC": str(netrc)})
    assert not has_api_key({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})
    # wandb's own switch wins in auto mode; an explicit mode wins over it
    assert resolve_mode(auto, {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"})[0] == "disabled"
    assert resolve_mode(auto, {"WANDB_MODE": "dryrun"})[0] == "offline"
    assert resolve_mode(WandbConfig(mode="offline"), {"WANDB_MODE": "disabled"})[0] == "offline"


def test_without_the_wandb_package_auto_turns_off_and_explicit_modes_are_refused(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails, as if absent
    assert resolve_mode(WandbConfig(), {}) == ("disabled", "the wandb package is not installed")
    for mode in ("online", "offline"):
        with pytest.raises(ValueError, match=f"logger.wandb.mode={mode} needs the wandb package"):
            WandbConfig(mode=mode)
    # a run with the default settings still trains, and says in one line why W&B is off
    run = make_run(tmp_path, rounds=1, personal_eval=False, cpu_threads=1)
    run.logger = LoggerConfig(quiet=False)
    summary = fit(run)
    assert summary["rounds"] == 1
    err = capsys.readouterr().err
    assert "W&B logging off: the wandb package is not installed" in err
    assert not (tmp_path / "wandb").exists()


def test_auto_logs_offline_when_the_server_cannot_be_reached(wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # loopback, nothing listens
    notices = []
    config = WandbConfig(dir=str(wandb_env), init_timeout=2)
    dashboard = open_dashboard(config, wandb_env / "run", "seed: 3\n", True, notices.append)
    try:
        assert dashboard.mode == "offline"
    finally:
        dashboard.finish({"best_test_acc": 0.5}, [], wandb_env / "no-plots")
    assert notices[0].startswith("W&B online start failed")
    assert notices[1].endswith("upload it later with:")
    assert notices[2].startswith("wandb sync ") and "\n" not in notices[2]  # one copyable line
    assert len(list((wandb_env / "wandb").glob("offline-run-*"))) == 1


def test_bad_wandb_settings_name_the_setting():
    with pytest.raises(ValueError, match="logger.wandb.mode must be one of auto, online"):
        WandbConfig(mode="sometimes")
    with pytest.raises(ValueError, match="logger.wandb.project must be a non-empty string"):
        WandbConfig(project="")
    with pytest.raises(ValueError, match="logger.wandb.init_timeout must be > 0 seconds, got 0"):
        WandbConfig(init_timeout=0)


def test_layer_series_groups_layer_keys_by_metric_in_layer_order():
    history = [
        {"round": 1, "layer/conv1/norm": 1.0, "layer/fc/norm": 2.0, "layer/fc/grad": 0.5},
        {"round": 2, "layer/conv1/norm": 1.5, "layer/fc/norm": float("nan"), "test/acc": 0.3},
        {"round": 3, "layer/s1.conv1/norm": 4.0},
    ]
    series = layer_series(history)
    assert list(series) == ["norm", "grad"]
    assert list(series["norm"]) == ["conv1", "fc", "s1.conv1"]
    assert series["norm"]["conv1"] == ([1, 2], [1.0, 1.5])
    assert series["norm"]["fc"] == ([1], [2.0])  # NaN is left out of the chart
    assert series["grad"] == {"fc": ([1], [0.5])}


# ---------------------------------------------------------------------------------------------
# An offline run, read back from its .wandb file

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of 7-byte-headed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every protobuf Record of an offline run's .wandb file, in write order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pending, pos = [], b"", 7  # header: ':W&B', magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            pending = body
        elif kind in (MIDDLE, LAST):
            pending += body
        else:
            break
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


class LayerNorms:
    """Adds `layer/<name>/weight_norm` for every layer each round, as per-layer callbacks do."""

    def on_fit_start(self, context):
        self.layers, self.federation = context.layers, context

    def on_round_end(self, metrics):
        params = dict(self.federation.global_model.named_parameters())
        for layer in self.layers:
            norm = sum(float(params[p].detach().norm()) ** 2 for p in layer.params) ** 0.5
            metrics[f"layer/{layer.name}/weight_norm"] = norm


def offline_run(tmp_path: Path, rounds: int, **logger) -> tuple[dict, Path]:
    run = make_run(tmp_path, rounds=rounds, callbacks=[LayerNorms()], eval_every=2, cpu_threads=1)
    run.config_yaml = "seed: 0\ntrainer:\n  rounds: 3\nalgorithm:\n  class_path: FedAvg\n"
    run.logger = LoggerConfig(
        quiet=True,
        wandb=WandbConfig(mode="auto", dir=str(tmp_path), name="readback", tags=["t1"], **logger),
    )
    return fit(run), run.run_dir


def test_offline_run_logs_config_every_round_layer_charts_plots_and_summary(wandb_env):
    summary, run_dir = offline_run(wandb_env, rounds=3, group="g")
    runs = list((wandb_env / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "auto mode without a key must log offline, once"
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]

    run_record = records[kinds.index("run")].run
    assert (run_record.display_name, run_record.project, run_record.run_group) == (
        "readback",
        "fedlit",
        "g",
    )
    assert list(run_record.tags) == ["t1"]
    config = {item_key(i): yaml.safe_load(i.value_json) for i in run_record.config.update}
    assert config["trainer"] == {"rounds": 3} and config["seed"] == 0

    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h.step.num for h in history]
    logged = [{item_key(i): yaml.safe_load(i.value_json) for i in h.item} for h in history]
    # every round at step == round; the plots and grouped layer charts join the last step
    assert steps == [1, 2, 3]
    assert [row["round"] for row in logged] == [1, 2, 3]
    metrics = read_metrics(run_dir / "metrics.jsonl")  # evaluated rounds: 2 and 3
    assert [m["round"] for m in metrics] == [2, 3]
    for record in metrics:
        row = logged[record["round"] - 1]
        assert set(record) <= set(row)
        assert row["test/acc"] == pytest.approx(record["test/acc"])
    assert "test/acc" not in logged[0] and logged[0]["train/loss"] > 0
    layer_keys = {k for k in logged[0] if k.startswith("layer/")}
    assert layer_keys == {f"layer/{n}/weight_norm" for n in ("conv1", "conv2", "fc1", "fc2", "fc3")}
    last = logged[-1]
    # media are stored as a file reference, one flattened key per field
    for plot in ("accuracy", "loss", "client_accuracy", "communication", "partition"):
        assert last[f"plots/{plot}/_type"] == "image-file"
    assert last["plots/layer_weight_norm/_type"] == "image-file"
    # the grouped chart: a table with one row per (layer, round) point
    assert last["layer_charts/weight_norm_table/_type"] == "table-file"
    assert last["layer_charts/weight_norm_table/nrows"] == 5 * 3

    final_summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final_summary.update({item_key(i): i.value_json for i in r.summary.update})
    assert yaml.safe_load(final_summary["best_test_acc"]) == pytest.approx(summary["best_test_acc"])
    assert yaml.safe_load(final_summary["comm_bytes"]) == summary["comm_bytes"]
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


@pytest.mark.multiprocess
def test_only_rank_0_creates_a_run(cli, tmp_path):
    result = cli(
        "fit",
        "--config",
        "configs/quickstart.yaml",
        "--trainer.rounds",
        "2",
        "--trainer.devices",
        "2",
        "--trainer.cpu_threads",
        "1",
        "--run_dir",
        str(tmp_path / "run"),
        "--logger.quiet",
        "true",
        "--logger.wandb.mode",
        "offline",
        "--logger.wandb.dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = [r for r in wandb_records(next(runs[0].glob("run-*.wandb"))) if r.HasField("history")]
    assert [h.history.step.num for h in history] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Sweeps


def grid_points(sweep: dict) -> list[dict]:
    names = list(sweep["parameters"])
    values = [sweep["parameters"][n]["values"] for n in names]
    return [dict(zip(names, point, strict=True)) for point in itertools.product(*values)]


def fit_argv(sweep: dict, point: dict) -> list[str]:
    """The `fedlit fit` arguments the agent's command gives one grid point (as wandb does)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
    command = sweep["command"]
    assert command[:2] == ["bash", "-c"] and command[-1] == "${args}"
    script = shlex.split(command[2])
    assert script[-1] == "$@" and "runs/sweeps/$WANDB_SWEEP_ID/$WANDB_RUN_ID" in script
    script = script[:-1] + flags["args"]
    return script[script.index("fedlit") + 1 :]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_grid_points_are_valid_fit_overrides(path):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["metric"] == {"name": "test/acc", "goal": "maximize"}
    assert set(sweep["parameters"]) == {"algorithm", "data.alpha", "seed"}
    points = grid_points(sweep)
    assert len(points) == 4 * 3 * 3
    parser = build_parser()
    for point in points:
        argv = fit_argv(sweep, point)
        assert argv[0] == "fit"
        cfg = parser.parse_args(argv).fit
        assert cfg.algorithm.class_path == point["algorithm"]
        assert (cfg.data.alpha, cfg.seed) == (point["data.alpha"], point["seed"])
        assert cfg.logger.quiet is True


def test_project_and_entity_come_from_the_environment_unless_the_config_sets_them():
    environ = {"WANDB_PROJECT": "sweeps", "WANDB_ENTITY": "lab"}
    assert resolve_names(WandbConfig(), environ) == ("sweeps", "lab")
    assert resolve_names(WandbConfig(project="mine", entity="me"), environ) == ("mine", "me")
    assert resolve_names(WandbConfig(), {}) == ("fedlit", None)
