"""A config is code, narrowed: each class path is checked for its kind before anything runs."""

from __future__ import annotations

import pytest
from jsonargparse import Namespace
from torch import nn

from fedlit.kinds import check_built_model, check_config_kinds
from fedlit.models.build import model_factory


def section(**entries) -> Namespace:
    """A parsed `fit` section holding only `entries` (dotted keys become nested sections)."""
    root = Namespace()
    for key, value in entries.items():
        root[key] = value
    return root


def unannotated_builder(num_classes: int):
    return nn.Linear(4, num_classes)


@model_factory
def marked_builder(num_classes: int):
    return nn.Linear(4, num_classes)


def annotated_builder(num_classes: int) -> nn.Linear:
    return nn.Linear(4, num_classes)


@pytest.mark.parametrize(
    "path", ["fedlit.models.CNN", "torchvision.models.resnet18", f"{__name__}.marked_builder"]
)
def test_models_and_functions_that_say_they_build_one_are_accepted(path):
    check_config_kinds(section(model={"class_path": path}))


def test_an_annotated_builder_is_accepted_and_an_unannotated_one_refused():
    check_config_kinds(section(model={"class_path": f"{__name__}.annotated_builder"}))
    with pytest.raises(ValueError, match="unannotated_builder is not a model"):
        check_config_kinds(section(model={"class_path": f"{__name__}.unannotated_builder"}))


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"model": {"class_path": "os.system"}}, "model: os.system is not a model"),
        ({"model": {"class_path": "subprocess.Popen"}}, "not a torch.nn.Module"),
        (
            {"trainer.optimizer": {"class_path": "torch.nn.Linear"}},
            "trainer.optimizer: torch.nn.Linear is not a subclass of torch.optim",
        ),
        (
            {"server_optimizer": {"class_path": "torch.optim.SGD"}},
            "server_optimizer: torch.optim.SGD is not a subclass of fedlit.server",
        ),
        (
            {"algorithm": {"class_path": "os.system"}},
            "algorithm: os.system is a builtin_function_or_method, not a class",
        ),
        (
            {"callbacks": [{"class_path": "fedlit.models.CNN"}, {"class_path": "os.system"}]},
            r"callbacks\[0\]: fedlit.models.CNN is a class without any of the callback hooks",
        ),
        (
            {"data.source": {"class_path": "os.system"}},
            "data.source: os.system is a builtin_function_or_method, not a class or a Python "
            "function",
        ),
        ({"model": {"class_path": "no_such.Module"}}, "model.class_path: cannot import"),
    ],
)
def test_entries_of_the_wrong_kind_are_refused_without_being_called(entries, expected):
    with pytest.raises(ValueError, match=expected) as error:
        check_config_kinds(section(**entries))
    assert "nothing was called" in str(error.value) or "cannot import" in str(error.value)


def test_a_model_without_weights_is_refused():
    with pytest.raises(ValueError, match="torch.nn.Identity has no trainable parameters"):
        check_built_model(nn.Identity(), "torch.nn.Identity")
    check_built_model(nn.Linear(2, 2), "torch.nn.Linear")
