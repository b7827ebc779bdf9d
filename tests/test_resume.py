"""Resume: a run interrupted after a checkpoint and resumed ends exactly where an uninterrupted
run with the same seed ends (model bit for bit, metrics per round), for stateful methods too;
a checkpoint of 2 ranks continues on 1; a changed config or a foreign file is refused early."""

from __future__ import annotations

import errno
import math
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

import fedlit.engine as engine
from callbacks.inertia import LayerInertia
from callbacks.sparsity import TransientSparsity
from conftest import ROOT
from fedlit.algorithms import MOON, FedAvg, FedMR
from fedlit.checkpoint import load_checkpoint, save_checkpoint
from fedlit.cli import main
from fedlit.clients import sample_clients
from fedlit.engine import fit
from fedlit.loggers import read_metrics
from fedlit.models import CNN
from fedlit.resume import config_differences, load_for_resume
from runs import fail_message, fit_on_two_ranks, tiny_run

ROUNDS = 4
LAST = Path("checkpoints") / "last.ckpt"


class Crash(RuntimeError):
    pass


METHODS = {
    "moon": lambda: (MOON(mu=1.0, projection_dim=16), []),
    "fedmr": lambda: (FedMR(), []),
    "lips_local_bn": lambda: (
        FedAvg(buffers="local"),
        [TransientSparsity(period=2, initial_density=0.5), LayerInertia()],
    ),
}


def method_run(run_dir: Path, method: str, **trainer):
    algorithm, callbacks = METHODS[method]()
    return tiny_run(
        run_dir,
        model=partial(CNN, padding=2),
        algorithm=algorithm,
        callbacks=callbacks,
        rounds=ROUNDS,
        clients_per_round=3,
        checkpoint_every=1,
        **trainer,
    )


def assert_same_end(dir_a: Path, dir_b: Path) -> None:
    a, b = load_checkpoint(dir_a / LAST), load_checkpoint(dir_b / LAST)
    assert a["round"] == b["round"]
    assert a["model"].keys() == b["model"].keys()
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    acc_a = [(m["round"], m["test/acc"]) for m in read_metrics(dir_a / "metrics.jsonl")]
    acc_b = [(m["round"], m["test/acc"]) for m in read_metrics(dir_b / "metrics.jsonl")]
    assert acc_a == acc_b and len(acc_a) == a["round"]


@pytest.mark.parametrize("method", list(METHODS))
def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, method):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    fit(method_run(whole, method))

    def crash_at_round_3(rank: int, round_idx: int) -> None:
        if round_idx == 3:
            raise Crash("killed")

    with monkeypatch.context() as patch:
        patch.setattr(engine, "inject_fault", crash_at_round_3)
        with pytest.raises(Crash):
            fit(method_run(broken, method))
    saved = load_checkpoint(broken / LAST)
    assert saved["round"] == 2
    # fresh algorithm and callback objects, as a restarted process has
    run = method_run(broken, method)
    run.resume = load_for_resume(broken / LAST, run.config_yaml)
    fit(run)
    assert_same_end(whole, broken)


def test_checkpoint_holds_the_whole_run_state(tmp_path):
    run = method_run(tmp_path, "lips_local_bn")
    fit(run)
    state = load_checkpoint(tmp_path / LAST)
    assert state["version"] == 4 and state["round"] == ROUNDS and state["world_size"] == 1
    assert [m["round"] for m in state["metrics"]] == list(range(1, ROUNDS + 1))
    assert state["comm_bytes"] == state["metrics"][-1]["comm/bytes"] > 0
    # per-client state, keyed by client: LIPS's gradients of every client that trained; the CNN
    # has no BatchNorm, so under buffers: local its clients keep nothing else of their own
    # (tests/test_eval_bn.py checks local tensors through checkpoints and resumes)
    assert set(state["clients"]) == {"sparsity/grads"}
    trained = {c for r in range(1, ROUNDS + 1) for c in sample_clients(0, r, 4, 3)}
    assert set(state["clients"]["sparsity/grads"]) == trained
    sparsity_state, inertia = state["callbacks"]
    assert sparsity_state is None and inertia["previous"]  # the same on every rank: saved once
    assert "wandb_id" in state


def test_config_differences_ignore_the_keys_that_may_change():
    saved = yaml.safe_dump(
        {"seed": 0, "run_dir": "a", "trainer": {"rounds": 5, "devices": 2, "batch_size": 16}}
    )
    new = yaml.safe_dump(
        {"seed": 1, "run_dir": "b", "trainer": {"rounds": 9, "devices": 1, "batch_size": 32}}
    )
    assert config_differences(saved, new) == ["seed", "trainer.batch_size"]


# ---- through the CLI ------------------------------------------------------------------------


def quick_config(tmp_path: Path, **trainer) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["run_dir"] = str(tmp_path / "run")
    settings = dict(devices=1, rounds=2, local_epochs=1, cpu_threads=1, personal_eval=False)
    config["trainer"].update({**settings, **trainer})
    config["data"].update(num_clients=4, local_test="none")
    config["logger"] = {"quiet": True, "wandb": {"mode": "disabled"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resume_refuses_a_changed_config_unless_forced(tmp_path, capsys):
    config = quick_config(tmp_path)
    main(["fit", "--config", str(config)])
    extend = ["fit", "--config", str(config), "--resume", "auto", "--trainer.rounds", "3"]
    err = fail_message(capsys, [*extend, "--seed", "1", "--data.alpha", "0.3"])
    assert "differs from the checkpoint's" in err and "data.alpha, seed" in err
    main([*extend, "--trainer.batch_size", "8", "--resume_force", "true"])
    assert load_checkpoint(tmp_path / "run" / LAST)["round"] == 3
    rounds = [m["round"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert rounds == [1, 2, 3]


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path):
    config = quick_config(tmp_path)
    main(["fit", "--config", str(config), "--resume", "auto"])
    assert load_checkpoint(tmp_path / "run" / LAST)["round"] == 2


def test_resume_refuses_missing_foreign_and_old_checkpoints(tmp_path, capsys):
    config = quick_config(tmp_path)
    base = ["fit", "--config", str(config), "--resume"]
    assert "no such checkpoint file" in fail_message(capsys, [*base, str(tmp_path / "nope")])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert "not a fedlit checkpoint" in fail_message(capsys, [*base, str(foreign)])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a zip file")
    assert "not a readable fedlit checkpoint" in fail_message(capsys, [*base, str(garbage)])
    old = tmp_path / "old.ckpt"
    save_checkpoint(old, {"format": "fedlit", "round": 1, "model": {}})
    assert "format version 1" in fail_message(capsys, [*base, str(old)])


def test_divergence_stops_with_round_client_and_layer_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    config = quick_config(tmp_path, rounds=4, checkpoint_every=1)
    poison = engine.train_one_client

    def nan_at_round_3(fed, plan, client, observers=()):
        loss, upload = poison(fed, plan, client, observers)
        if plan.round == 3 and client == plan.clients[-1]:
            with torch.no_grad():
                fed.working.conv1.weight.fill_(math.nan)
            return loss * math.nan, upload
        return loss, upload

    monkeypatch.setattr(engine, "train_one_client", nan_at_round_3)
    err = fail_message(capsys, ["fit", "--config", str(config)])
    assert "training diverged in round 3" in err and "(client 3)" in err
    assert "first non-finite layer conv1" in err
    assert f"The last good checkpoint, of round 2 ({tmp_path / 'run' / LAST}), is kept" in err
    saved = load_checkpoint(tmp_path / "run" / LAST)
    assert saved["round"] == 2
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_a_huge_learning_rate_is_reported_as_divergence(tmp_path, capsys):
    config = quick_config(tmp_path, rounds=3)
    err = fail_message(
        capsys, ["fit", "--config", str(config), "--trainer.optimizer.init_args.lr", "1e12"]
    )
    assert "training diverged in round 1" in err and "lower the learning rate" in err
    # nothing was saved yet: the message must not promise a checkpoint
    assert "No checkpoint has been written yet (trainer.checkpoint_every=0 writes one only " in err
    assert "last good checkpoint" not in err and not (tmp_path / "run" / LAST).exists()


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory, by relative path, with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_failed_resume_leaves_the_run_directory_as_it_was(tmp_path, capsys):
    config = quick_config(tmp_path)
    main(["fit", "--config", str(config)])
    run_dir = tmp_path / "run"
    before = run_files(run_dir)
    assert before["metrics.jsonl"] and before["config.yaml"]
    resume = ["fit", "--config", str(config), "--trainer.rounds", "3", "--resume"]
    other_model = ["--model", '{"class_path": "fedlit.models.MLP"}', "--resume_force", "true"]
    err = fail_message(capsys, [*resume, "auto", *other_model])
    assert f"{run_dir / LAST} holds another model than this run's MLP" in err
    assert "--resume_force lets settings differ, never the model" in err
    no_model = tmp_path / "no_model.ckpt"
    state = load_checkpoint(run_dir / LAST)
    del state["model"]
    save_checkpoint(no_model, state)
    err = fail_message(capsys, [*resume, str(no_model)])
    assert f"{no_model} is an incomplete fedlit checkpoint: it has no 'model' entry" in err
    assert run_files(run_dir) == before


def test_a_full_disk_at_a_checkpoint_stops_the_run_with_one_line(tmp_path, capsys, monkeypatch):
    config = quick_config(tmp_path, rounds=3, checkpoint_every=1)
    real_fdopen = os.fdopen
    full_after = {"writes": 1}  # round 1's checkpoint fits, round 2's does not

    class FullDisk:
        def __init__(self, file) -> None:
            self.file, self.full = file, full_after["writes"] == 0
            full_after["writes"] -= 1

        def write(self, data) -> int:
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    def fdopen(fd, mode="r", *args, **kwargs):
        checkpoint = ".last.ckpt." in os.readlink(f"/proc/self/fd/{fd}")
        file = real_fdopen(fd, mode, *args, **kwargs)
        return FullDisk(file) if checkpoint else file

    monkeypatch.setattr(os, "fdopen", fdopen)
    err = fail_message(capsys, ["fit", "--config", str(config)])
    last = tmp_path / "run" / LAST
    assert err.startswith(f"fedlit: error: cannot write {last}: No space left on device, ")
    assert err.endswith("bytes free; the previous last.ckpt is unchanged\n")
    assert err.count("\n") == 1 and "enforce fail" not in err
    assert load_checkpoint(last)["round"] == 1
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]


# ---- a real SIGKILL of a 2-rank run ---------------------------------------------------------

KILL_ARGS = [
    "--trainer.devices",
    "2",
    "--trainer.rounds",
    "4",
    "--trainer.checkpoint_every",
    "1",
]


def fedlit_command(config: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedlit",
        "fit",
        "--config",
        str(config),
        "--run_dir",
        str(run_dir),
        *KILL_ARGS,
        *extra,
    ]


def checkpoint_round(path: Path) -> int:
    try:
        return load_checkpoint(path)["round"]
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(config, run dir, environment) of an uninterrupted 2-rank run, shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    config = quick_config(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    whole = tmp_path / "whole"
    done = subprocess.run(
        fedlit_command(config, whole), cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return config, whole, env


@pytest.mark.multiprocess
def test_a_sigkilled_two_rank_run_resumes_to_the_same_model_and_metrics(tmp_path, uninterrupted):
    config, whole, env = uninterrupted
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        fedlit_command(config, killed),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the launcher and the rank it starts share one process group
    )
    deadline = time.monotonic() + 120
    while checkpoint_round(killed / LAST) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint of round 2 within 120 s"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= checkpoint_round(killed / LAST) < 4

    resumed = subprocess.run(
        fedlit_command(config, killed, "--resume", "auto"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(whole, killed)


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.multiprocess
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_a_rank_that_dies_under_torchrun_restarts_from_the_checkpoint(tmp_path, uninterrupted):
    config, whole, env = uninterrupted
    marker = tmp_path / "crashed-once"
    restarted = tmp_path / "restarted"
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "1",
        *fedlit_command(config, restarted, "--resume", "auto")[1:],
    ]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**env, "FEDLIT_FAULT": f"1:3:{marker}"},  # rank 1 dies at the start of round 3
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert marker.exists(), "the injected fault did not fire"
    assert_same_end(whole, restarted)


RESHARDED = {
    "local_bn": ["--algorithm.init_args.buffers", "local"],
    "moon": ["--algorithm", "fedlit.algorithms.MOON", "--algorithm.init_args.projection_dim", "16"],
    "fedmr": ["--algorithm", "fedlit.algorithms.FedMR", "--trainer.clients_per_round", "3"],
}


# -m slow: tests/test_eval_bn.py reshards local tensors both ways in the default suite
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=pytest.mark.slow) for m in RESHARDED],
)
def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, method):
    """Client state (local BN statistics, MOON's previous models, FedMR's slots) is re-sharded:
    a run checkpointed by 2 ranks and continued on 1 ends where an uninterrupted 1-rank run
    ends."""
    config = quick_config(tmp_path, rounds=4, checkpoint_every=1)
    local_bn = RESHARDED[method]
    whole, moved = tmp_path / "whole", tmp_path / "moved"
    main(["fit", "--config", str(config), "--run_dir", str(whole), *local_bn])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    two_ranks = ["--trainer.devices", "2", "--trainer.rounds", "2"]
    command = [sys.executable, "-m", "fedlit", "fit", "--config", str(config)]
    done = subprocess.run(
        [*command, "--run_dir", str(moved), *local_bn, *two_ranks],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_checkpoint(moved / LAST)
    assert saved["world_size"] == 2
    main(["fit", "--config", str(config), "--run_dir", str(moved), *local_bn, "--resume", "auto"])
    assert_same_end(whole, moved)


@pytest.mark.multiprocess
def test_more_ranks_than_clients_per_round_leaves_ranks_idle_but_in_step(tmp_path):
    """With 1 client per round on 2 ranks, one rank idles each round yet joins every collective
    (and the checkpoint's gather): the run finishes with the 1-rank model."""
    config = quick_config(tmp_path, rounds=3, clients_per_round=1)
    one, two = tmp_path / "one", tmp_path / "two"
    main(["fit", "--config", str(config), "--run_dir", str(one)])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FEDLIT_FAULT", None)
    command = [sys.executable, "-m", "fedlit", "fit", "--config", str(config)]
    done = subprocess.run(
        [
            *command,
            "--run_dir",
            str(two),
            "--trainer.devices",
            "2",
            "--trainer.checkpoint_every",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_end(one, two)


# ---- across ranks and resumes -----------------------------------------------------------------

SETTINGS = {
    "scaffold_fedadam": {
        "algorithm": {"class_path": "fedlit.algorithms.SCAFFOLD"},
        "trainer": {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}},
        "server_optimizer": {"class_path": "fedlit.server.FedAdam", "init_args": {"lr": 0.01}},
    },
    "feddyn_fedavgm": {
        "algorithm": {"class_path": "fedlit.algorithms.FedDyn", "init_args": {"alpha": 0.1}},
        "server_optimizer": {
            "class_path": "fedlit.server.ServerSGD",
            "init_args": {"lr": 1.0, "momentum": 0.5},
        },
    },
    "fednova": {"algorithm": {"class_path": "fedlit.algorithms.FedNova"}},
}


def method_config(tmp_path: Path, setting: str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["trainer"].update(
        devices=1, rounds=4, local_epochs=1, cpu_threads=1, checkpoint_every=1,
        clients_per_round=3, personal_eval=False,
    )  # fmt: skip
    config["data"].update(num_clients=4, local_test="none")
    config["logger"] = {"quiet": True, "plots": False, "wandb": {"mode": "disabled"}}
    setting = dict(SETTINGS[setting])
    config["trainer"].update(setting.pop("trainer", {}))
    config.update(setting)
    path = tmp_path / f"{setting}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def untimed(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in m.items() if not k.startswith("time/")}
        for m in read_metrics(run_dir / "metrics.jsonl")
    ]


def assert_same_run(a: Path, b: Path) -> None:
    assert untimed(a) == untimed(b)
    state_a, state_b = (
        load_checkpoint(a / "checkpoints" / "last.ckpt"),
        load_checkpoint(b / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(v, state_b["model"][k]) for k, v in state_a["model"].items())
    assert state_a["clients"].keys() == state_b["clients"].keys()
    for store, entries in state_a["clients"].items():
        assert entries.keys() == state_b["clients"][store].keys(), store
        for client, tensors in entries.items():
            other = state_b["clients"][store][client]
            assert all(torch.equal(t, other[n]) for n, t in tensors.items()), (store, client)


# SCAFFOLD + FedAdam (client and server state) runs in the default suite; the others with -m slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "setting",
    [s if s == "scaffold_fedadam" else pytest.param(s, marks=pytest.mark.slow) for s in SETTINGS],
)
def test_one_and_two_ranks_and_resumes_across_them_are_bitwise_equal(tmp_path, setting):
    """Rounds 1-2 on 2 ranks then 3-4 on 1, and rounds 1-2 on 1 then 3-4 on 2, against 4
    rounds on 1 rank. FedNova keeps no state: 4 rounds on 2 ranks suffice."""
    config = method_config(tmp_path, setting)
    whole = tmp_path / "whole"
    main(["fit", "--config", str(config), "--run_dir", str(whole)])
    if setting == "fednova":
        fit_on_two_ranks(config, tmp_path / "two")
        assert_same_run(whole, tmp_path / "two")
        return
    down = tmp_path / "down"  # 2 ranks for 2 rounds, then 1 rank
    fit_on_two_ranks(config, down, "--trainer.rounds", "2")
    main(["fit", "--config", str(config), "--run_dir", str(down), "--resume", "auto"])
    assert_same_run(whole, down)
    up = tmp_path / "up"  # 1 rank for 2 rounds, then 2 ranks
    main(["fit", "--config", str(config), "--run_dir", str(up), "--trainer.rounds", "2"])
    fit_on_two_ranks(config, up, "--resume", "auto")
    assert_same_run(whole, up)
