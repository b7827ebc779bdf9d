"""Your own data: tensors, arrays, a file or a torch Dataset, made into a DataBundle once.

Two ways in, both with a train and a test split:
- `data.dataset: tensors` with `data.root` a `.npz` (numpy) or `.pt` (torch.save of a dict)
  file holding `x_train`, `y_train`, `x_test`, `y_test`;
- `data.dataset: custom` with `data.source: {class_path, init_args}`, a callable (a class or a
  function) that returns the two splits, as a `(train, test)` pair or a dict with "train" and
  "test". Each split is a torch `Dataset` whose items are `(x, y)`, or an `(x, y)` pair of
  tensors or arrays. The callable runs when the data load: like the rest of a config, it is
  code.

Whatever comes in is materialised once into tensors, the way the built-in datasets are: images
as uint8 (N, C, H, W) (a PIL image, an (H, W, C) or (C, H, W) uint8 array, or a grayscale (H, W)
one), anything else as float32 (N, ...) features, which are neither augmented nor normalised.
Labels must be integers in [0, classes); the class count is the source's `classes` attribute
when it has one, else the largest label plus one. Every check names the setting and the split.
Partitions, local test splits, augmentation and evaluation then work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlit.data.bundle import DataBundle, Split, channel_stats
from fedlit.imports import import_path

TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_tensor_file(root: str) -> DataBundle:
    """`data.dataset: tensors`: the splits of a .npz or .pt file."""
    path = Path(root)
    if not path.is_file():
        raise FileNotFoundError(
            f"data.root={root!r}: no such file; data.dataset=tensors reads a .npz or .pt file "
            f"holding {', '.join(TENSOR_KEYS)}"
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            content = {key: arrays[key] for key in arrays.files}
    elif path.suffix == ".pt":
        content = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"data.root={root!r}: data.dataset=tensors reads .npz or .pt files, got {path.suffix!r}"
        )
    if not isinstance(content, dict) or not set(TENSOR_KEYS) <= set(content):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"data.root={root!r} must hold {', '.join(TENSOR_KEYS)}; it holds {found}")
    train = to_split((content["x_train"], content["y_train"]), "train", f"data.root={root}")
    test = to_split((content["x_test"], content["y_test"]), "test", f"data.root={root}")
    return make_bundle(path.stem, train, test, None, f"data.root={root}")


def load_source(spec: dict[str, Any]) -> DataBundle:
    """`data.dataset: custom`: call `data.source` and materialise what it returns."""
    source = resolve_source(spec)
    returned = source(**dict(spec.get("init_args") or {}))
    where = f"data.source ({spec['class_path']})"
    if isinstance(returned, dict) and {"train", "test"} <= set(returned):
        train, test = returned["train"], returned["test"]
    elif isinstance(returned, (tuple, list)) and len(returned) == 2:
        train, test = returned
    else:
        raise ValueError(
            f"{where} must return the train and test splits, as a (train, test) pair or a dict "
            f"with 'train' and 'test'; it returned {type(returned).__name__}"
        )
    classes = getattr(train, "classes", None) or getattr(returned, "classes", None)
    return make_bundle(
        spec["class_path"].rpartition(".")[2],
        to_split(train, "train", where),
        to_split(test, "test", where),
        classes,
        where,
    )


def resolve_source(spec: Any) -> Callable[..., Any]:
    """The callable `data.source` names, checked before anything runs."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            "data.source must be {class_path: module.callable, init_args: {...}} for "
            f"data.dataset=custom, got {spec!r}"
        )
    target = import_path(spec["class_path"], "data.source.class_path")
    if not callable(target):
        raise ValueError(f"data.source.class_path {spec['class_path']!r} is not callable")
    return target


def to_split(data: Any, split: str, where: str) -> Split:
    """A split from an (x, y) pair of tensors/arrays or from a Dataset of (x, y) items."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and hasattr(data[0], "shape"):
        xs, y = data  # inputs and labels, as tensors or arrays
        x = _inputs(xs if torch.is_tensor(xs) else torch.as_tensor(np.asarray(xs)))
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError(f"{where}: the {split} split is empty")
        if any(not isinstance(item, (tuple, list)) or len(item) < 2 for item in items[:1]):
            raise ValueError(
                f"{where}: the {split} split's items must be (x, y) pairs, got "
                f"{type(items[0]).__name__}"
            )
        x = _inputs(torch.stack([_one_input(item[0]) for item in items]))
        y = [int(item[1]) for item in items]
    else:
        raise ValueError(
            f"{where}: the {split} split must be a torch Dataset of (x, y) items or an (x, y) "
            f"pair of tensors or arrays, got {type(data).__name__}"
        )
    labels = torch.as_tensor(np.asarray(y))
    if labels.ndim != 1 or labels.numel() != x.shape[0]:
        raise ValueError(
            f"{where}: the {split} split has {x.shape[0]} inputs and labels of shape "
            f"{tuple(labels.shape)}; give one integer label per input"
        )
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"{where}: the {split} split's labels must be integers (class ids)")
    return Split(x.contiguous(), labels.long())


def make_bundle(
    name: str, train: Split, test: Split, classes: Sequence[str] | None, where: str
) -> DataBundle:
    """Check the two splits against each other and the class count; image statistics."""
    if train.x.shape[1:] != test.x.shape[1:] or train.x.dtype != test.x.dtype:
        raise ValueError(
            f"{where}: train inputs are {train.x.dtype} {tuple(train.x.shape[1:])}, test inputs "
            f"{test.x.dtype} {tuple(test.x.shape[1:])}; both splits need the same shape and kind"
        )
    lowest = int(min(train.y.min(), test.y.min()))
    highest = int(max(train.y.max(), test.y.max()))
    count = len(classes) if classes is not None else highest + 1
    if lowest < 0 or highest >= count:
        raise ValueError(
            f"{where}: labels must be class ids in [0, {count}), found {lowest}..{highest}"
        )
    names = [str(c) for c in classes] if classes is not None else [str(c) for c in range(count)]
    if train.x.dtype == torch.uint8:
        mean, std = channel_stats(train.x)
        return DataBundle(name, train, test, count, names, mean, std)
    return DataBundle(name, train, test, count, names, None, None)


def _one_input(x: Any) -> torch.Tensor:
    """One sample as a tensor: a PIL image becomes uint8 (C, H, W)."""
    if hasattr(x, "mode") and hasattr(x, "size") and not torch.is_tensor(x):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(x)
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def _inputs(x: torch.Tensor) -> torch.Tensor:
    """Images as uint8 (N, C, H, W) (channels-last and grayscale arrays are turned so), the
    rest as float32."""
    if x.dtype == torch.uint8:
        if x.ndim == 3:  # (N, H, W) grayscale
            return x.unsqueeze(1)
        if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            return x.permute(0, 3, 1, 2)  # (N, H, W, C)
        return x
    return x.float()
