"""Batches made on the accelerator: the whole dataset lives there, only indices move.

Federated clients train on a few hundred samples for a few steps at a time, so a DataLoader's
worker start-up and host-to-device copies would cost more than the training itself. Instead the
uint8 images are copied to the device once; every batch is an index gather, a batched random
crop / flip drawn from the caller's generator, and one fused scale-and-normalise. Because every
random number comes from that generator, a client's batch stream is a function of its seed only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlit.data.datasets import DataBundle


class DeviceData:
    """A DataBundle's tensors on one device, with batching and augmentation there."""

    def __init__(
        self,
        bundle: DataBundle,
        device: torch.device,
        crop_padding: int = 0,
        hflip: bool = False,
        normalize: bool = True,
        rotation: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.is_image = bundle.train.x.dtype == torch.uint8
        if not self.is_image and (crop_padding > 0 or hflip or rotation > 0):
            raise ValueError(
                f"data.crop_padding, data.hflip and data.rotation augment images; {bundle.name} "
                f"holds {bundle.train.x.dtype} vectors"
            )
        if crop_padding < 0:
            raise ValueError(f"data.crop_padding must be >= 0, got {crop_padding}")
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.rotation = rotation
        self._num_classes = bundle.num_classes
        self._input_shape = bundle.input_shape
        self._x = {
            "train": bundle.train.x.to(self.device),
            "test": bundle.test.x.to(self.device),
        }
        self._y = {
            "train": bundle.train.y.to(self.device),
            "test": bundle.test.y.to(self.device),
        }
        # float(x) * scale + shift == (x / 255 - mean) / std, as one fused multiply-add.
        self._scale = self._shift = None
        if self.is_image:
            channels = bundle.train.x.shape[1]
            mean, std = normalisation(bundle, normalize, mean, std)
            shape = (1, channels, 1, 1)
            mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
            std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
            self._scale = 1.0 / (255.0 * std_t)
            self._shift = -mean_t / std_t

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def num_train(self) -> int:
        return len(self._y["train"])

    @property
    def num_test(self) -> int:
        return len(self._y["test"])

    def train_batches(
        self, indices: Tensor, batch_size: int, epochs: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """`epochs` shuffled passes over `indices` (into the train split), augmented.

        Each sample appears once per epoch; the last partial batch is kept so small clients
        use all their data, except that a lone last sample joins the batch before it: BatchNorm
        cannot train on a batch of one (Dirichlet splits make such client sizes common).
        """
        _check_batch_size(batch_size)
        indices = indices.to(self.device)
        n = len(indices)
        bounds = batch_bounds(n, batch_size)
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator, device=self.device)
            shuffled = indices[order]
            for start, end in bounds:
                batch = shuffled[start:end]
                x = self._x["train"][batch]
                if self.is_image:
                    x = self._augment(x, generator)
                    if self.rotation > 0:
                        x = self._rotate(x.float(), generator)
                    x = self._normalize(x)
                yield x, self._y["train"][batch]

    def eval_batches(
        self, split: str, indices: Tensor | None, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """In-order batches of `split` ("train" or "test"), or of `indices` into it; no augmentation."""
        if split not in self._x:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        _check_batch_size(batch_size)
        xs, ys = self._x[split], self._y[split]
        n = len(ys) if indices is None else len(indices)
        if indices is not None:
            indices = indices.to(self.device)
        for start in range(0, n, batch_size):
            if indices is None:
                x, y = xs[start : start + batch_size], ys[start : start + batch_size]
            else:
                batch = indices[start : start + batch_size]
                x, y = xs[batch], ys[batch]
            yield (self._normalize(x) if self.is_image else x), y

    def _augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random crop from the zero-padded batch and/or horizontal flip, as one gather.

        Each sample's window is a row range and a column range of the padded image; flipping a
        sample just reverses its column range, so crop and flip cost a single indexing pass.
        """
        pad = self.crop_padding
        if pad == 0 and not self.hflip:
            return x
        b, c, h, w = x.shape
        device = x.device
        rows = torch.arange(h, device=device).expand(b, h)
        cols = torch.arange(w, device=device).expand(b, w)
        if pad > 0:
            x = F.pad(x, (pad, pad, pad, pad))
            offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=generator, device=device)
            rows = rows + offsets[0, :, None]
            cols = cols + offsets[1, :, None]
        if self.hflip:
            flip = torch.rand(b, generator=generator, device=device) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        batch = torch.arange(b, device=device)[:, None, None, None]
        channel = torch.arange(c, device=device)[None, :, None, None]
        return x[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]

    def _rotate(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Rotate each image by its own angle in [-rotation, rotation] degrees about its centre.

        Nearest-neighbour sampling with zero fill, as torchvision's RandomRotation does by
        default, applied to the whole batch by one affine_grid + grid_sample.
        """
        b = x.shape[0]
        uniform = torch.rand(b, generator=generator, device=x.device)
        angles = torch.deg2rad((2.0 * uniform - 1.0) * self.rotation)
        cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _normalize(self, x: Tensor) -> Tensor:
        return torch.addcmul(self._shift, x.float(), self._scale)


def normalisation(
    bundle: DataBundle,
    normalize: bool,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] pixel units: an explicit `mean`/`std` (one value for
    every channel, or one per channel), else the training split's statistics, else none
    (0 and 1) when `normalize` is off."""
    channels = bundle.train.x.shape[1]
    if not normalize:
        return (0.0,) * channels, (1.0,) * channels
    if mean is not None and std is not None:
        explicit = []
        for key, values in (("norm_mean", mean), ("norm_std", std)):
            values = tuple(float(v) for v in values)
            if len(values) == 1:
                values = values * channels
            if len(values) != channels:
                raise ValueError(
                    f"data.{key} has {len(values)} values; {bundle.name} images have "
                    f"{channels} channel(s): give one value, or one per channel"
                )
            explicit.append(values)
        return explicit[0], explicit[1]
    if bundle.mean is None or bundle.std is None:
        return (0.0,) * channels, (1.0,) * channels
    return bundle.mean, bundle.std


def train_steps(n: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `train_batches` over `n` samples (for progress: no data is read)."""
    return len(batch_bounds(n, batch_size)) * epochs


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each batch of an epoch over `n` samples: the last partial batch is kept,
    except that a lone last sample joins the batch before it (BatchNorm cannot train on one)."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [n] if starts else []
    return list(zip(starts, ends, strict=True))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
