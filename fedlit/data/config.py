"""The `data.*` settings: which dataset, how it is split across clients, how batches are augmented.

Every field is a public CLI key (``--data.alpha 0.1``), so validation happens here, once, with
messages that name the key the user typed and what would be accepted. Checks that need the
dataset on disk (image sizes, whether an image folder has ``classes.csv``) happen at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

DatasetName = Literal[
    "digits",
    "synthetic",
    "mnist",
    "fashion_mnist",
    "cifar10",
    "cifar100",
    "imagefolder",
    "tensors",
    "custom",
]
PartitionName = Literal["iid", "iid_overlap", "dirichlet", "dirichlet_capped", "shards", "natural"]
LocalTestName = Literal["none", "label_mix", "natural"]

# Datasets that come with a per-client split of their own (FedProx Synthetic: one device per
# client). FEMNIST's writers would be the next one.
NATURAL_SPLIT_DATASETS = ("synthetic",)
# Datasets whose samples are feature vectors rather than images: no crop, flip or normalisation.
VECTOR_DATASETS = ("synthetic",)
COARSE_LABEL_DATASETS = ("cifar100", "imagefolder")
# Partitions that read `samples_per_client`; for the others a value would be silently ignored.
SAMPLES_PER_CLIENT_PARTITIONS = ("iid", "iid_overlap", "dirichlet")


@dataclass
class DataConfig:
    """Dataset, federated split and on-device augmentation.

    Defaults give a tiny, offline, deterministic setup (scikit-learn digits, 10 IID clients) so
    that a run without any flags works anywhere. The synthetic data set is fixed by
    `synthetic_seed`, not by the run's seed, like FedProx's saved JSON.

    Attributes:
        dataset: digits (bundled), synthetic (FedProx Synthetic(alpha, beta)), mnist,
            fashion_mnist, cifar10, cifar100, imagefolder, tensors (your arrays) or custom
            (your code).
        root: torchvision root; for imagefolder a directory or a .tar.gz holding
            train/<class>/* and test/<class>/*; for tensors a .npz or .pt file with x_train,
            y_train, x_test, y_test (fedlit.data.custom).
        source: dataset=custom: {class_path, init_args} of a callable returning the train and
            test splits (torch Datasets of (x, y), or (x, y) pairs of tensors or arrays); it
            runs code.
        download: Allow torchvision to download missing files.
        cache_dir: Decoded image folders are cached here as tensors (keyed by the source's
            path, size and mtime).
        coarse_labels: CIFAR-100's 20 super-classes instead of the 100 fine classes.
        num_clients: Clients in the federation.
        partition: iid, iid_overlap (independent draws of samples_per_client), dirichlet,
            dirichlet_capped (FedMR), shards (McMahan), or natural (the dataset's own split).
        alpha: Dirichlet concentration: 0.1 very skewed, 1.0 mild, large values near IID.
        min_samples: Dirichlet: every client gets at least this many training samples.
        samples_per_client: iid_overlap: required; iid / dirichlet: exact size per client
            instead of the whole training set (LIPS: 100).
        shards_per_client: shards: shards per client.
        max_attempts: Dirichlet redraws before giving up with an error.
        local_test: Per-client test split: none, label_mix (labels follow the client's
            training mix, LIPS) or natural (the dataset's own per-client test data).
        local_test_size: label_mix: test samples per client (LIPS: 400).
        crop_padding: Random crop with this much zero padding on each side (0: off; CIFAR: 4).
        hflip: Random horizontal flip.
        rotation: Random rotation in [-rotation, rotation] degrees, zero fill (FedPart's
            CIFAR-100: 15).
        normalize: Per-channel normalisation (false: pixels stay in [0, 1]).
        norm_mean: Explicit normalisation mean in [0, 1] units, one value or one per channel,
            instead of the training split's (FedMR: [0.5]).
        norm_std: Explicit normalisation std, with norm_mean (FedMR: [0.5]).
        synthetic_alpha: Synthetic: spread of the per-device model means.
        synthetic_beta: Synthetic: spread of the per-device feature means.
        synthetic_dim: Synthetic: feature dimension.
        synthetic_classes: Synthetic: classes.
        synthetic_min_samples: Synthetic: minimum samples per device (FedProx: 50).
        synthetic_seed: Synthetic: the seed that fixes the data set.
    """

    dataset: DatasetName = "digits"
    root: str = "data"
    source: dict | None = None
    download: bool = False
    cache_dir: str = "data/cache"
    coarse_labels: bool = False
    num_clients: int = 10
    partition: PartitionName = "iid"
    alpha: float = 0.5
    min_samples: int = 10
    samples_per_client: int | None = None
    shards_per_client: int = 2
    max_attempts: int = 1000
    local_test: LocalTestName = "none"
    local_test_size: int = 0
    crop_padding: int = 0
    hflip: bool = False
    rotation: float = 0.0
    normalize: bool = True
    norm_mean: list[float] | None = None
    norm_std: list[float] | None = None
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_dim: int = 60
    synthetic_classes: int = 10
    synthetic_min_samples: int = 50
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("dataset", self.dataset, DatasetName)
        _check_choice("partition", self.partition, PartitionName)
        _check_choice("local_test", self.local_test, LocalTestName)
        if not isinstance(self.root, str) or not self.root:
            raise ValueError(f"data.root must be a non-empty path, got {self.root!r}")
        if not isinstance(self.cache_dir, str) or not self.cache_dir:
            raise ValueError(f"data.cache_dir must be a non-empty path, got {self.cache_dir!r}")
        _check_int("num_clients", self.num_clients, 1)
        _check_int("min_samples", self.min_samples, 1)
        _check_int("shards_per_client", self.shards_per_client, 1)
        _check_int("max_attempts", self.max_attempts, 1)
        _check_int("local_test_size", self.local_test_size, 0)
        _check_int("crop_padding", self.crop_padding, 0)
        _check_int("synthetic_dim", self.synthetic_dim, 1)
        _check_int("synthetic_classes", self.synthetic_classes, 2)
        _check_int("synthetic_min_samples", self.synthetic_min_samples, 1)
        _check_int("synthetic_seed", self.synthetic_seed, 0)
        if not self.alpha > 0:
            raise ValueError(
                "data.alpha must be > 0 (the Dirichlet concentration of the dirichlet "
                f"partition; 0.1 is very skewed, 1.0 mild), got {self.alpha}"
            )
        for key in ("synthetic_alpha", "synthetic_beta"):
            value = getattr(self, key)
            if not value >= 0:
                raise ValueError(f"data.{key} must be >= 0 (a standard deviation), got {value}")
        self._check_cross_fields()

    def _check_cross_fields(self) -> None:
        spc = self.samples_per_client
        if spc is not None:
            _check_int("samples_per_client", spc, 1)
            if self.partition not in SAMPLES_PER_CLIENT_PARTITIONS:
                raise ValueError(
                    f"data.samples_per_client is only used by data.partition in "
                    f"{list(SAMPLES_PER_CLIENT_PARTITIONS)}, got {spc} with "
                    f"data.partition={self.partition}; leave it unset (null)"
                )
            if self.partition == "dirichlet" and spc < self.min_samples:
                raise ValueError(
                    f"data.samples_per_client ({spc}) must be >= data.min_samples "
                    f"({self.min_samples}) for the dirichlet partition"
                )
        if self.partition == "iid_overlap" and spc is None:
            raise ValueError(
                "data.samples_per_client is required for data.partition=iid_overlap "
                "(each client draws that many samples independently; FedPart: 500)"
            )
        if self.partition == "natural" and self.dataset not in NATURAL_SPLIT_DATASETS:
            raise ValueError(
                f"data.partition=natural needs a dataset with its own per-client split "
                f"({list(NATURAL_SPLIT_DATASETS)}), got data.dataset={self.dataset}"
            )
        if self.local_test == "natural" and self.dataset not in NATURAL_SPLIT_DATASETS:
            raise ValueError(
                f"data.local_test=natural needs a dataset with its own per-client split "
                f"({list(NATURAL_SPLIT_DATASETS)}), got data.dataset={self.dataset}"
            )
        if self.local_test == "natural" and self.partition != "natural":
            raise ValueError(
                "data.local_test=natural pairs each client's own test data with its own "
                f"training data, so it needs data.partition=natural, got {self.partition}"
            )
        if self.local_test == "label_mix" and self.local_test_size <= 0:
            raise ValueError(
                "data.local_test_size must be > 0 for data.local_test=label_mix "
                f"(test samples per client; LIPS: 400), got {self.local_test_size}"
            )
        if not 0.0 <= self.rotation <= 180.0:
            raise ValueError(
                f"data.rotation must be between 0 and 180 degrees, got {self.rotation}"
            )
        if self.dataset in VECTOR_DATASETS and (
            self.crop_padding > 0 or self.hflip or self.rotation > 0
        ):
            raise ValueError(
                f"data.crop_padding, data.hflip and data.rotation augment images; "
                f"data.dataset={self.dataset} holds feature vectors, got "
                f"crop_padding={self.crop_padding}, hflip={self.hflip}, rotation={self.rotation} "
                f"(use 0, false and 0)"
            )
        if (self.norm_mean is None) != (self.norm_std is None):
            raise ValueError(
                "data.norm_mean and data.norm_std go together: set both (e.g. [0.5] and [0.5]) "
                f"or neither, got norm_mean={self.norm_mean} and norm_std={self.norm_std}"
            )
        if self.norm_mean is not None:
            if not self.normalize:
                raise ValueError(
                    "data.norm_mean / data.norm_std need data.normalize true (they replace the "
                    "training split's statistics); with normalize false pixels stay in [0, 1]"
                )
            if self.dataset in VECTOR_DATASETS:
                raise ValueError(
                    f"data.norm_mean / data.norm_std normalise images; data.dataset="
                    f"{self.dataset} holds feature vectors"
                )
            if not self.norm_mean or not all(s > 0 for s in self.norm_std):
                raise ValueError(
                    "data.norm_mean must be non-empty and every data.norm_std value > 0, got "
                    f"norm_mean={self.norm_mean}, norm_std={self.norm_std}"
                )
        if (self.dataset == "custom") != (self.source is not None):
            raise ValueError(
                "data.source goes with data.dataset=custom (a {class_path, init_args} callable "
                "returning the train and test splits), got "
                f"data.dataset={self.dataset} and data.source={self.source!r}"
            )
        if self.coarse_labels and self.dataset not in COARSE_LABEL_DATASETS:
            raise ValueError(
                f"data.coarse_labels is only for {list(COARSE_LABEL_DATASETS)} (CIFAR-100's 20 "
                f"super-classes), got data.dataset={self.dataset}"
            )


def _check_choice(key: str, value: object, literal: object) -> None:
    valid = get_args(literal)
    if value not in valid:
        raise ValueError(f"data.{key} must be one of {list(valid)}, got {value!r}")


def _check_int(key: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `--data.num_clients true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
