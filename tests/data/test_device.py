"""On-device batching: coverage, reproducibility, exact crop/flip geometry and normalisation."""

from __future__ import annotations

import pytest
import torch

from fedlit.data.config import DataConfig
from fedlit.data.datasets import DataBundle, Split, channel_stats, load_dataset
from fedlit.data.device import DeviceData

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def image_bundle(n: int = 64, shape=(3, 6, 5), seed: int = 0) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 4
    mean, std = channel_stats(x)
    test = Split(x[:10].clone(), y[:10].clone())
    return DataBundle("random", Split(x, y), test, 4, ["a", "b", "c", "d"], mean, std)


def generator(seed: int, device: torch.device = CPU) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def collect(data: DeviceData, indices, batch_size=8, epochs=1, seed=0, device=CPU):
    return list(data.train_batches(indices, batch_size, epochs, generator(seed, device)))


def as_uint8(x: torch.Tensor) -> torch.Tensor:
    """Undo the [0, 1] scaling of an un-normalised batch."""
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_each_epoch_visits_the_clients_indices_exactly_once(device):
    bundle = image_bundle()
    data = DeviceData(bundle, device, crop_padding=2, hflip=True)
    indices = torch.tensor([3, 9, 12, 20, 21, 40, 41, 42, 50, 63, 1], device=device)
    batches = collect(data, indices, batch_size=4, epochs=3, device=device)
    assert [len(y) for _, y in batches] == [4, 4, 3] * 3  # last partial batch kept
    for epoch in range(3):
        labels = torch.cat([y for _, y in batches[3 * epoch : 3 * epoch + 3]])
        assert sorted(labels.tolist()) == sorted(bundle.train.y[indices.cpu()].tolist())
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 6, 5) and x.device.type == device.type
    assert y.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_a_lone_last_sample_joins_the_batch_before_it(device):
    """BatchNorm cannot train on one sample: 9 samples in batches of 4 give 4 + 5, not 4+4+1."""
    bundle = image_bundle()
    data = DeviceData(bundle, device)
    indices = torch.arange(9, device=device)
    batches = collect(data, indices, batch_size=4, epochs=2, device=device)
    assert [len(y) for _, y in batches] == [4, 5] * 2
    assert sorted(torch.cat([y for _, y in batches[:2]]).tolist()) == sorted(
        bundle.train.y[:9].tolist()
    )
    # a client with a single sample still trains on it
    assert [len(y) for _, y in collect(data, indices[:1], 4, 1, device=device)] == [1]


def test_batches_are_identified_by_gathering_the_right_samples():
    bundle = image_bundle()
    data = DeviceData(bundle, CPU, normalize=False)
    indices = torch.tensor([5, 17, 33, 34, 60])
    seen = torch.cat([as_uint8(x) for x, _ in collect(data, indices, batch_size=2)])
    expected = bundle.train.x[indices]
    matches = [[torch.equal(s, e) for e in expected] for s in seen]
    assert all(sum(row) == 1 for row in matches)  # each batch sample is one client sample
    assert sorted(row.index(True) for row in matches) == list(range(5))


def test_same_seed_same_batches_other_seed_other_batches():
    data = DeviceData(image_bundle(), CPU, crop_padding=2, hflip=True)
    indices = torch.arange(40)
    first = collect(data, indices, seed=1, epochs=2)
    again = collect(data, indices, seed=1, epochs=2)
    other = collect(data, indices, seed=2, epochs=2)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(first, again, strict=True)
    )
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_crop_is_a_window_of_the_zero_padded_image():
    pad = 2
    bundle = image_bundle(n=30)
    data = DeviceData(bundle, CPU, crop_padding=pad, normalize=False)
    indices = torch.arange(30)
    order = torch.randperm(30, generator=generator(0))  # the first draw of the batch stream
    [(x, _)] = collect(data, indices, batch_size=30, seed=0)
    crops = as_uint8(x)
    assert crops.shape == (30, 3, 6, 5)
    offsets = set()
    for i in range(30):
        padded = torch.nn.functional.pad(bundle.train.x[order[i]], (pad, pad, pad, pad))
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(padded[:, dy : dy + 6, dx : dx + 5], crops[i])
        ]
        assert len(found) == 1, f"sample {i} is not a window of its padded image"
        offsets.add(found[0])
    assert len(offsets) > 5  # offsets are random per sample, not one per batch


def test_flip_mirrors_about_half_of_the_samples():
    bundle = image_bundle(n=400)
    data = DeviceData(bundle, CPU, hflip=True, normalize=False)
    order = torch.randperm(400, generator=generator(3))
    [(x, _)] = collect(data, torch.arange(400), batch_size=400, seed=3)
    out = as_uint8(x)
    original = bundle.train.x[order]
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, original, strict=True)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, original, strict=True)])
    assert (flipped ^ kept).all()
    assert 0.4 < flipped.float().mean() < 0.6


def test_eval_batches_are_in_order_unaugmented_and_normalised():
    bundle = load_dataset(DataConfig())
    data = DeviceData(bundle, CPU, crop_padding=4, hflip=True)
    x = torch.cat([x for x, _ in data.eval_batches("train", None, 500)])
    assert x.shape == bundle.train.x.shape and x.dtype == torch.float32
    assert float(x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(x.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    expected = (bundle.train.x.float() / 255 - bundle.mean[0]) / bundle.std[0]
    assert torch.allclose(x, expected, atol=1e-5)
    picked = torch.tensor([7, 3, 300])
    [(xs, ys)] = list(data.eval_batches("test", picked, 10))
    assert torch.equal(ys, bundle.test.y[picked])
    assert data.num_train == 1437 and data.num_test == 360 and data.num_classes == 10
    with pytest.raises(ValueError, match="'train' or 'test'"):
        next(data.eval_batches("val", None, 10))


def test_normalize_off_gives_unit_interval():
    data = DeviceData(image_bundle(), CPU, normalize=False)
    x = torch.cat([x for x, _ in data.eval_batches("train", None, 16)])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_vectors_pass_through_untouched():
    bundle = load_dataset(DataConfig(dataset="synthetic", num_clients=4))
    data = DeviceData(bundle, CPU)
    indices = torch.arange(10)
    batches = collect(data, indices, batch_size=4)
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    order = torch.randperm(10, generator=generator(0))
    assert torch.equal(x, bundle.train.x[order]) and torch.equal(y, bundle.train.y[order])
    assert data.input_shape == (60,)
    with pytest.raises(ValueError, match="augment images"):
        DeviceData(bundle, CPU, hflip=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_matches_coverage_and_is_reproducible():
    device = torch.device("cuda")
    data = DeviceData(image_bundle(n=200), device, crop_padding=2, hflip=True)
    indices = torch.arange(0, 200, 2, device=device)
    first = collect(data, indices, batch_size=32, epochs=2, seed=5, device=device)
    again = collect(data, indices, batch_size=32, epochs=2, seed=5, device=device)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    assert all(x.is_cuda and y.is_cuda for x, y in first)


def constant_bundle(value: int = 200, n: int = 32, size: int = 9) -> DataBundle:
    x = torch.full((n, 1, size, size), value, dtype=torch.uint8)
    y = torch.zeros(n, dtype=torch.long)
    return DataBundle("constant", Split(x, y), Split(x[:4], y[:4]), 1, ["a"], (0.0,), (1.0,))


def test_rotation_turns_each_image_about_its_centre_with_zero_fill():
    data = DeviceData(constant_bundle(), CPU, rotation=45.0, normalize=False)
    (x, _), *_ = collect(data, torch.arange(32), batch_size=32)
    pixels = as_uint8(x)
    # nearest-neighbour: only the original value or the zero fill, and the centre stays put
    assert set(pixels.unique().tolist()) <= {0, 200}
    assert (pixels[:, 0, 4, 4] == 200).all()
    # corners leave the image for all but near-zero angles; the per-sample angles differ
    zero_counts = (pixels == 0).flatten(1).sum(1)
    assert (zero_counts > 0).float().mean() > 0.7
    assert len(set(zero_counts.tolist())) > 3
    (again, _), *_ = collect(data, torch.arange(32), batch_size=32)
    assert torch.equal(x, again)


def test_tiny_rotation_is_the_identity_on_the_pixel_grid():
    bundle = image_bundle(shape=(3, 8, 8))
    plain = DeviceData(bundle, CPU, normalize=False)
    turned = DeviceData(bundle, CPU, rotation=1e-4, normalize=False)
    (a, ya), *_ = collect(plain, torch.arange(16), batch_size=16)
    (b, yb), *_ = collect(turned, torch.arange(16), batch_size=16)
    assert torch.equal(ya, yb) and torch.equal(as_uint8(a), as_uint8(b))


def test_rotation_is_validated():
    with pytest.raises(
        ValueError, match="data.rotation must be between 0 and 180 degrees, got 200"
    ):
        DataConfig(dataset="digits", rotation=200)
    with pytest.raises(ValueError, match="data.rotation augment images"):
        DataConfig(dataset="synthetic", partition="natural", rotation=10)


# ---- normalisation ----------------------------------------------------------------------------


def test_explicit_normalisation_replaces_the_dataset_statistics():
    bundle = load_dataset(DataConfig())
    data = DeviceData(bundle, torch.device("cpu"), mean=[0.5], std=[0.5])
    x, _ = next(data.eval_batches("test", None, 16))
    raw = bundle.test.x[:16].float() / 255.0
    assert torch.allclose(x, (raw - 0.5) / 0.5, atol=1e-6)
    plain = DeviceData(bundle, torch.device("cpu"), normalize=False)
    assert torch.allclose(next(plain.eval_batches("test", None, 16))[0], raw, atol=1e-7)
    with pytest.raises(ValueError, match=r"data.norm_mean has 3 values; digits images have 1"):
        DeviceData(bundle, torch.device("cpu"), mean=[0.5, 0.5, 0.5], std=[0.5])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(norm_mean=[0.5]), "go together"),
        (dict(norm_mean=[0.5], norm_std=[0.0]), "norm_std value > 0"),
        (dict(norm_mean=[0.5], norm_std=[0.5], normalize=False), "need data.normalize true"),
        (dict(norm_mean=[0.5], norm_std=[0.5], dataset="synthetic"), "feature vectors"),
    ],
)
def test_normalisation_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**settings)
