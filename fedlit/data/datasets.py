"""Whole datasets as tensors: every dataset is read once into memory and never touched per item.

Federated runs index the same small datasets millions of times; per-item PIL transforms would
dominate the run time, so images stay uint8 (N, C, H, W) here and all conversion and
augmentation happens batched on the device (see device.py).
"""

from __future__ import annotations

import numpy as np
import torch

from fedlit.data.bundle import DataBundle, Split, channel_stats
from fedlit.data.config import DataConfig
from fedlit.data.imagefolder import load_image_folder
from fedlit.data.synthetic import generate_synthetic

# Fixed split of scikit-learn's digits (they ship without one): seed and train fraction.
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_FRACTION = 0.8

# The standard CIFAR-100 fine -> coarse table (the `coarse_labels` of the original pickles,
# fine ids in alphabetical order), and the 20 super-class names in coarse-id order.
CIFAR100_COARSE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip
CIFAR100_COARSE_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip


def load_dataset(config: DataConfig) -> DataBundle:
    """The dataset named by `config.dataset`, loaded once into CPU tensors."""
    if config.dataset == "digits":
        return _load_digits()
    if config.dataset == "synthetic":
        return _load_synthetic(config)
    if config.dataset == "imagefolder":
        return _load_image_folder(config)
    if config.dataset in ("tensors", "custom"):
        from fedlit.data.custom import load_source, load_tensor_file

        if config.dataset == "tensors":
            return load_tensor_file(config.root)
        return load_source(config.source)
    return _load_torchvision(config)


def _image_bundle(
    name: str, train: Split, test: Split, classes: list[str], **natural
) -> DataBundle:
    mean, std = channel_stats(train.x)
    return DataBundle(name, train, test, len(classes), classes, mean, std, **natural)


def _load_digits() -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; rescaled so digits look like every other uint8 image dataset.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    cut = int(DIGITS_TRAIN_FRACTION * len(labels))
    train, test = order[:cut], order[cut:]
    return _image_bundle(
        "digits",
        Split(torch.from_numpy(images[train]), torch.from_numpy(labels[train])),
        Split(torch.from_numpy(images[test]), torch.from_numpy(labels[test])),
        [str(d) for d in range(10)],
    )


def _load_synthetic(config: DataConfig) -> DataBundle:
    data = generate_synthetic(
        num_devices=config.num_clients,
        alpha=config.synthetic_alpha,
        beta=config.synthetic_beta,
        dim=config.synthetic_dim,
        num_classes=config.synthetic_classes,
        min_samples=config.synthetic_min_samples,
        seed=config.synthetic_seed,
    )
    name = f"synthetic({config.synthetic_alpha:g},{config.synthetic_beta:g})"
    return DataBundle(
        name=name,
        train=Split(data.train_x, data.train_y),
        test=Split(data.test_x, data.test_y),
        num_classes=config.synthetic_classes,
        classes=[str(c) for c in range(config.synthetic_classes)],
        mean=None,
        std=None,
        natural_train=data.natural_train,
        natural_test=data.natural_test,
    )


def _load_image_folder(config: DataConfig) -> DataBundle:
    data = load_image_folder(config.root, config.cache_dir, config.coarse_labels)
    return _image_bundle(
        "imagefolder",
        Split(data.train_x, data.train_y),
        Split(data.test_x, data.test_y),
        data.classes,
    )


def _load_torchvision(config: DataConfig) -> DataBundle:
    from torchvision import datasets

    dataset_class = {
        "mnist": datasets.MNIST,
        "fashion_mnist": datasets.FashionMNIST,
        "cifar10": datasets.CIFAR10,
        "cifar100": datasets.CIFAR100,
    }[config.dataset]
    splits = []
    for train in (True, False):
        try:
            ds = dataset_class(config.root, train=train, download=config.download)
        except RuntimeError as error:
            if config.download:
                raise
            raise FileNotFoundError(
                f"{config.dataset} files not found under data.root={config.root!r} "
                f"(torchvision {dataset_class.__name__} layout). Set `--data.download true` to "
                f"download them, or point data.root at a directory that has them "
                f"(offline CIFAR copies: data.dataset=imagefolder with the .tar.gz)."
            ) from error
        splits.append(_torchvision_split(ds))
    classes = list(ds.classes)
    if config.coarse_labels:  # only cifar100 gets here (config validation)
        coarse = torch.tensor(CIFAR100_COARSE, dtype=torch.int64)
        splits = [Split(s.x, coarse[s.y]) for s in splits]
        classes = list(CIFAR100_COARSE_NAMES)
    return _image_bundle(config.dataset, splits[0], splits[1], classes)


def _torchvision_split(ds) -> Split:
    data = torch.as_tensor(ds.data)
    # MNIST-style datasets store (N, H, W); CIFAR stores (N, H, W, C) numpy arrays.
    x = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    return Split(x.contiguous(), y)
