import os

import pytest
import torch

from fedlit.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    state = {
        "format": "fedlit",
        "round": 3,
        "model": {"w": torch.arange(4.0)},
        "metrics": [{"round": 1, "test/acc": 0.5}],
    }
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["round"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["metrics"] == [{"round": 1, "test/acc": 0.5}]
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"format": "fedlit", "round": 1})

    def crash(file):
        file.write(b"partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_bytes(path, crash)
    assert load_checkpoint(path)["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_foreign_and_unreadable_checkpoints_are_refused(tmp_path):
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a fedlit checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable fedlit checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_load_checkpoint_takes_a_str_path(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(str(path), {"format": "fedlit", "round": 2})
    assert load_checkpoint(str(path))["round"] == 2
