"""The run directory: owned by one run at a time, known to be writable before launch, never the
current directory by accident, and cleaned of the temporary files a killed run left."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from fedlit import rundir
from fedlit.engine import prepare
from fedlit.models import CNN
from fedlit.rundir import check_run_dir, claim_run_dir, release_run_dir
from runs import fail_message, tiny_run

HOLD_LOCK = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from fedlit.rundir import claim_run_dir\n"
    "claim_run_dir(Path(sys.argv[1]))\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


def quick_config(tmp_path: Path, run_dir: Path | str) -> Path:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["trainer"].update(devices=1, rounds=1, cpu_threads=1, personal_eval=False)
    config["data"].update(num_clients=4, local_test="none")
    config["logger"] = {"quiet": True, "plots": False, "wandb": {"mode": "disabled"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def lock_holder(tmp_path):
    """Start a process that holds the lock of tmp_path/run; yields (process, run_dir)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc, run_dir
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_run_in_a_run_dir_in_use_is_refused_naming_the_first(
    tmp_path, capsys, lock_holder
):
    proc, run_dir = lock_holder
    config = quick_config(tmp_path, run_dir)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    err = fail_message(capsys, ["fit", "--config", str(config), "--seed", "1"])
    assert f"run_dir='{run_dir}' is in use by another fedlit run (pid {proc.pid} on " in err
    assert "give this one another run_dir" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written


def test_the_lock_ends_with_its_process_even_under_kill_9(lock_holder):
    proc, run_dir = lock_holder
    with pytest.raises(ValueError, match="is in use by another fedlit run"):
        claim_run_dir(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    claim_run_dir(run_dir)  # no stale lock to remove by hand
    release_run_dir(run_dir)


def test_an_empty_run_dir_is_refused_instead_of_writing_into_the_current_directory(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = quick_config(tmp_path, "runs/x")
    err = fail_message(capsys, ["fit", "--config", str(config), "--run_dir", ""])
    assert "run_dir must be a non-empty path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_unusable_run_dirs_are_refused_before_training(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    ckpt_is_file = tmp_path / "ckpt_is_file"
    (ckpt_is_file / "checkpoints").parent.mkdir()
    (ckpt_is_file / "checkpoints").write_text("not a directory")
    metrics_is_dir = tmp_path / "metrics_is_dir"
    (metrics_is_dir / "metrics.jsonl").mkdir(parents=True)
    cases = {
        str(tmp_path / "a_file"): f"run_dir='{tmp_path / 'a_file'}' is a file",
        str(tmp_path / "a_file" / "run"): f"cannot be created: {tmp_path / 'a_file'} is a file",
        str(ckpt_is_file): f"{ckpt_is_file / 'checkpoints'} is a file, where the run writes "
        "checkpoints/last.ckpt (at the end of the run even with trainer.checkpoint_every 0)",
        str(metrics_is_dir): f"{metrics_is_dir / 'metrics.jsonl'} is a directory",
        "/proc/fedlit-run": "run_dir='/proc/fedlit-run' cannot be created: No such file",
    }
    config = quick_config(tmp_path, tmp_path / "unused")
    for run_dir, expected in cases.items():
        err = fail_message(capsys, ["fit", "--config", str(config), "--run_dir", run_dir])
        assert expected in err, (run_dir, err)
    assert not (ckpt_is_file / "metrics.jsonl").exists()  # refused before the first round


def test_a_run_dir_that_takes_no_file_is_refused_naming_the_cause(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(
        ValueError, match=r"run_dir='.*' is not writable .* does not allow this user"
    ):
        check_run_dir(tmp_path / "run")
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError, match=r"run is not writable \(Read-only file system\)"):
        claim_run_dir(tmp_path / "run")
    assert not rundir.holds(tmp_path / "run")


def test_stale_temporary_files_of_a_killed_run_are_removed_on_start(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [
        run_dir / "checkpoints" / ".last.ckpt.k3j2_x.tmp",
        run_dir / ".summary.json.a8b1.tmp",
        run_dir / ".config.yaml.zz.tmp",
    ]
    for path in stale:
        path.write_bytes(b"\0" * 4096)
    kept = [run_dir / "checkpoints" / "last.ckpt", run_dir / "notes.tmp"]
    for path in kept:
        path.write_bytes(b"keep")
    prepare(tiny_run(run_dir, model=partial(CNN, padding=2)))  # up to the launch of the ranks
    try:
        assert rundir.holds(run_dir)
        assert not any(path.exists() for path in stale)
        assert all(path.read_bytes() == b"keep" for path in kept)
    finally:
        release_run_dir(run_dir)
