"""Your own data and your own model: tensors, a .npz file, a torch Dataset, any nn.Module, each
trained through the real CLI with the built-in partitions and methods."""

import json

import numpy as np
import pytest
import torch
import yaml

from fedlit.cli import main
from fedlit.data.config import DataConfig
from fedlit.data.custom import load_source, load_tensor_file
from fedlit.data.datasets import load_dataset
from fedlit.loggers import read_metrics
from runs import toy_images

QUIET = {"quiet": True, "plots": False, "wandb": {"mode": "disabled"}}


def fit(tmp_path, data: dict, model: dict, rounds: int = 3, **extra) -> list[dict]:
    config = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "trainer": {
            "rounds": rounds, "devices": 1, "accelerator": "cpu", "cpu_threads": 1,
            "batch_size": 16, "local_epochs": 1,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
        },
        "data": data,
        "model": model,
        "logger": QUIET,
        **extra,
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    return read_metrics(tmp_path / "run" / "metrics.jsonl")


def test_a_tensor_file_trains_with_a_dirichlet_split(tmp_path):
    (x_train, y_train), (x_test, y_test) = toy_images(n_train=160, n_test=40)
    file = tmp_path / "toy.npz"
    np.savez(file, x_train=x_train.numpy(), y_train=y_train.numpy(),
             x_test=x_test.numpy(), y_test=y_test.numpy())  # fmt: skip
    bundle = load_tensor_file(str(file))
    assert bundle.train.x.dtype == torch.uint8 and tuple(bundle.input_shape) == (3, 16, 16)
    assert bundle.num_classes == 4 and bundle.mean is not None  # images: normalised
    data = {"dataset": "tensors", "root": str(file), "num_clients": 4, "partition": "dirichlet",
            "alpha": 0.5, "min_samples": 10, "crop_padding": 2, "hflip": True}  # fmt: skip
    records = fit(tmp_path, data, {"class_path": "fedlit.models.CNN"}, rounds=2)
    assert [r["round"] for r in records] == [1, 2] and 0 <= records[-1]["test/acc"] <= 1


def test_a_torch_dataset_of_pil_images_is_materialised_once():
    bundle = load_source({"class_path": "runs.toy_dataset_splits"})
    assert bundle.train.x.shape == (30, 3, 8, 8) and bundle.train.x.dtype == torch.uint8
    assert bundle.classes == ["a", "b", "c"] and bundle.num_classes == 3
    assert bundle.train.y.tolist()[:4] == [0, 1, 2, 0] and len(bundle.test.y) == 12


def test_float_features_are_neither_augmented_nor_normalised(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    y = torch.arange(50) % 2
    file = tmp_path / "features.pt"
    torch.save({"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}, file)
    bundle = load_dataset(DataConfig(dataset="tensors", root=str(file)))
    assert bundle.train.x.dtype == torch.float32 and bundle.mean is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"x_train": np.zeros((4, 2)), "y_train": np.zeros(4)}, "must hold x_train, y_train"),
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.zeros(3),
                "x_test": np.zeros((2, 2)),
                "y_test": np.zeros(2),
            },
            "the train split has 4 inputs and labels of shape",
        ),  # fmt: skip
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.array([0, 1, 0, -1]),
                "x_test": np.zeros((2, 2)),
                "y_test": np.zeros(2),
            },
            r"class ids in \[0, 2\)",
        ),  # fmt: skip
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.zeros(4),
                "x_test": np.zeros((2, 3)),
                "y_test": np.zeros(2),
            },
            "both splits need the same shape",
        ),  # fmt: skip
        (
            {
                "x_train": np.zeros((4, 2)),
                "y_train": np.full(4, 0.5),
                "x_test": np.zeros((2, 2)),
                "y_test": np.zeros(2),
            },
            "labels must be integers",
        ),  # fmt: skip
    ],
)
def test_bad_tensors_are_named_before_training(tmp_path, content, message):
    file = tmp_path / "bad.npz"
    np.savez(file, **content)
    with pytest.raises(ValueError, match=message):
        load_tensor_file(str(file))


def test_custom_source_settings_are_checked():
    with pytest.raises(ValueError, match="data.source goes with data.dataset=custom"):
        DataConfig(dataset="custom")
    with pytest.raises(ValueError, match="cannot import 'nowhere.data'"):
        load_source({"class_path": "nowhere.data"})
    with pytest.raises(ValueError, match="must return the train and test splits"):
        load_source({"class_path": "builtins.list"})


MODELS = {
    "plain": {"class_path": "runs.TinyMLP", "init_args": {"in_features": 768}},
    "resnet18": {"class_path": "torchvision.models.resnet18"},
}
METHODS = {
    "fedavg": {},
    "fedpart": {
        "callbacks": [
            {
                "class_path": "callbacks.freezing.FedPartSchedule",
                "init_args": {"warmup_rounds": 1, "rounds_per_layer": 1},
            }
        ]  # fmt: skip
    },
    "fedmr": {"algorithm": {"class_path": "fedlit.algorithms.FedMR"}},
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(MODELS))
def test_any_module_trains_under_fedavg_fedpart_and_fedmr(tmp_path, model, method):
    """A user's module without layer_map() or features(), and torchvision's resnet18, on
    custom RGB images: the derived layer map serves FedPart's schedule and FedMR's units."""
    data = {"dataset": "custom", "source": {"class_path": "runs.toy_images"}, "num_clients": 3}
    records = fit(tmp_path, data, MODELS[model], **METHODS[method])
    assert [r["round"] for r in records] == [1, 2, 3]
    if method == "fedpart":  # round 2 trains and sends the first derived layer only
        assert records[1]["comm/up_bytes"] < records[0]["comm/up_bytes"]
        schedule = json.loads((tmp_path / "run" / "schedule.json").read_text())["rounds"]
        first = {"plain": "body.1", "resnet18": "conv1"}[model]
        assert schedule[1]["layers"] == [first]


def test_moon_names_what_a_model_without_features_lacks(tmp_path, capsys):
    data = {"dataset": "custom", "source": {"class_path": "runs.toy_images"}, "num_clients": 3}
    with pytest.raises(SystemExit):
        fit(tmp_path, data, MODELS["plain"], algorithm={"class_path": "fedlit.algorithms.MOON"})
    err = capsys.readouterr().err
    assert "MOON contrasts the representation" in err and "TinyMLP has no features" in err
