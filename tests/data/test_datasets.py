"""Dataset loading, DataConfig validation and the split report (no network, no shared data)."""

from __future__ import annotations

import gzip
import re
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from fedlit.data import imagefolder
from fedlit.data.config import DataConfig
from fedlit.data.datasets import channel_stats, load_dataset
from fedlit.data.report import label_count_table, plot_label_heatmap

# ---------------------------------------------------------------- DataConfig validation


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"dataset": "imagenet"}, "data.dataset must be one of"),
        ({"partition": "zipf"}, "data.partition must be one of"),
        ({"alpha": -1}, "data.alpha must be > 0"),
        ({"num_clients": 0}, "data.num_clients must be an integer >= 1, got 0"),
        ({"min_samples": 0}, "data.min_samples"),
        ({"max_attempts": 0}, "data.max_attempts"),
        ({"crop_padding": -2}, "data.crop_padding"),
        ({"partition": "iid_overlap"}, "data.samples_per_client is required"),
        ({"partition": "shards", "samples_per_client": 5}, "data.samples_per_client is only"),
        ({"partition": "natural"}, "data.partition=natural needs"),
        ({"local_test": "natural"}, "data.local_test=natural needs"),
        ({"local_test": "label_mix"}, "data.local_test_size must be > 0"),
        (
            {"dataset": "synthetic", "hflip": True},
            "data.crop_padding, data.hflip and data.rotation",
        ),
        ({"coarse_labels": True, "dataset": "cifar10"}, "data.coarse_labels is only"),
        ({"synthetic_beta": -0.5}, "data.synthetic_beta must be >= 0"),
        (
            {"partition": "dirichlet", "samples_per_client": 5, "min_samples": 10},
            "data.samples_per_client (5) must be >= data.min_samples (10)",
        ),
    ],
)
def test_config_errors_name_the_key(settings, expected):
    with pytest.raises(ValueError) as error:
        DataConfig(**settings)
    assert expected in str(error.value)


def test_config_error_shows_bad_value_and_valid_choices():
    with pytest.raises(ValueError, match=r"got 'zipf'") as error:
        DataConfig(partition="zipf")
    assert "'dirichlet'" in str(error.value)


# ---------------------------------------------------------------- digits and torchvision


def test_digits_loads_as_uint8_images_with_a_fixed_split():
    bundle = load_dataset(DataConfig())
    assert bundle.train.x.shape == (1437, 1, 8, 8) and bundle.test.x.shape == (360, 1, 8, 8)
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.y.dtype == torch.int64
    assert bundle.classes == [str(d) for d in range(10)] and bundle.num_classes == 10
    assert bundle.input_shape == (1, 8, 8)
    assert int(bundle.train.x.max()) == 255  # 16 rescaled to 255
    assert set(bundle.test.y.tolist()) == set(range(10))
    again = load_dataset(DataConfig())
    assert torch.equal(bundle.test.y, again.test.y)
    pixels = bundle.train.x.double() / 255
    assert bundle.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-9)
    assert bundle.std[0] == pytest.approx(float(pixels.std(unbiased=False)), abs=1e-9)


def test_channel_stats_are_per_channel():
    x = torch.zeros(4, 2, 3, 3, dtype=torch.uint8)
    x[:, 1] = 255
    x[:2, 0] = 51
    mean, std = channel_stats(x)
    assert mean == pytest.approx((0.1, 1.0)) and std == pytest.approx((0.1, 0.0))


def test_missing_torchvision_files_with_download_off(tmp_path):
    root = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(DataConfig(dataset="cifar10", root=root))
    message = str(error.value)
    assert "cifar10" in message and f"data.root={root!r}" in message
    assert "--data.download true" in message


# ---------------------------------------------------------------- image folders


def _image(seed: int, size=(6, 5), channels=3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, *size), dtype=torch.uint8, generator=generator)


def _write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = image.permute(1, 2, 0).numpy()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)


def _make_folder(base, classes=("cat", "ant", "bee"), per_split=None):
    """base/train/<class>/<i>.png, base/test/<class>/<i>.png; returns {split: [(class, image)]}."""
    per_split = per_split or {"train": 3, "test": 2}
    written = {}
    seed = 0
    for split, count in per_split.items():
        written[split] = []
        for name in classes:
            for i in range(count):
                image = _image(seed)
                seed += 1
                _write_png(base / split / name / f"{i:04d}.png", image)
                written[split].append((name, image))
    return written


def _tar(source_dir, archive, arcname):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_dir, arcname=arcname)
    return archive


def _load_folder(root, cache_dir, **settings):
    config = DataConfig(dataset="imagefolder", root=str(root), cache_dir=str(cache_dir), **settings)
    return load_dataset(config)


def test_image_folder_from_directory_decodes_every_image_in_class_order(tmp_path):
    written = _make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "ant" / "._0000.png").write_bytes(b"macOS resource fork")
    (tmp_path / "imgs" / "README.txt").write_text("not an image")
    bundle = _load_folder(tmp_path / "imgs", tmp_path / "cache")
    assert bundle.classes == ["ant", "bee", "cat"]  # alphabetical, like CIFAR-10's ids
    assert bundle.train.x.shape == (9, 3, 6, 5) and bundle.test.x.shape == (6, 3, 6, 5)
    assert bundle.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    expected = sorted(written["train"], key=lambda item: bundle.classes.index(item[0]))
    for i, (_, image) in enumerate(expected):
        assert torch.equal(bundle.train.x[i], image)  # PNG is lossless
    assert len(bundle.mean) == 3 and bundle.input_shape == (3, 6, 5)


def test_image_folder_tarball_matches_directory_and_is_cached(tmp_path, monkeypatch):
    _make_folder(tmp_path / "imgs")
    archive = _tar(tmp_path / "imgs", tmp_path / "imgs.tar.gz", arcname="imgs-png")
    from_dir = _load_folder(tmp_path / "imgs", tmp_path / "cache")
    from_tar = _load_folder(archive, tmp_path / "cache")
    for split in ("train", "test"):
        assert torch.equal(getattr(from_dir, split).x, getattr(from_tar, split).x)
        assert torch.equal(getattr(from_dir, split).y, getattr(from_tar, split).y)
    assert len(list((tmp_path / "cache").glob("imagefolder-imgs-*.pt"))) == 2

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(imagefolder, "_decode", no_decoding)
    cached = _load_folder(archive, tmp_path / "cache")
    assert torch.equal(cached.train.x, from_tar.train.x) and cached.classes == from_tar.classes
    # A changed archive must not be served from the old cache.
    _tar(tmp_path / "imgs", archive, arcname="imgs-png-renamed")
    with pytest.raises(AssertionError, match="decoded again"):
        _load_folder(archive, tmp_path / "cache")


def test_coarse_labels_from_classes_csv(tmp_path):
    _make_folder(tmp_path / "imgs", classes=("bee", "cat", "ant"))
    (tmp_path / "imgs" / "classes.csv").write_text(
        "fine_label,fine_name,coarse_label,coarse_name\n"
        "0,ant,1,insects\n1,bee,1,insects\n2,cat,0,mammals\n"
    )
    archive = _tar(tmp_path / "imgs", tmp_path / "imgs.tar.gz", arcname="imgs")
    fine = _load_folder(archive, tmp_path / "cache")
    coarse = _load_folder(archive, tmp_path / "cache", coarse_labels=True)
    assert fine.classes == ["ant", "bee", "cat"] and coarse.classes == ["mammals", "insects"]
    assert coarse.num_classes == 2
    assert coarse.train.y.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert torch.equal(coarse.test.y, torch.tensor([1, 1, 0])[fine.test.y])
    assert torch.equal(coarse.train.x, fine.train.x)


def test_coarse_labels_without_classes_csv_is_an_error(tmp_path):
    _make_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match="data.coarse_labels=true needs classes.csv"):
        _load_folder(tmp_path / "imgs", tmp_path / "cache", coarse_labels=True)


def test_image_folder_rejects_mixed_sizes_and_missing_root(tmp_path):
    _make_folder(tmp_path / "imgs")
    _write_png(tmp_path / "imgs" / "test" / "cat" / "big.png", _image(99, size=(7, 7)))
    with pytest.raises(ValueError, match=r"all images must have one size; test/cat/big.png"):
        _load_folder(tmp_path / "imgs", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="data.root="):
        _load_folder(tmp_path / "missing.tar.gz", tmp_path / "cache")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(ValueError, match="not a \\(compressed\\) tar archive"):
        _load_folder(tmp_path / "notes.txt", tmp_path / "cache")


def test_unreadable_cache_is_rebuilt(tmp_path):
    _make_folder(tmp_path / "imgs")
    first = _load_folder(tmp_path / "imgs", tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(b"truncated")
    again = _load_folder(tmp_path / "imgs", tmp_path / "cache")
    assert torch.equal(first.train.x, again.train.x)
    assert cache_file.stat().st_size > 100  # rewritten


# ---------------------------------------------------------------- damaged archives


def _plain_tar(tmp_path):
    """tmp_path/imgs.tar of a 3-class image tree (9 train, 6 test images) under good/."""
    _make_folder(tmp_path / "imgs")
    plain = tmp_path / "imgs.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(tmp_path / "imgs", arcname="good")
    return plain


def _header_offset(plain, name: str) -> int:
    with tarfile.open(plain) as tar:
        return next(m.offset for m in tar.getmembers() if m.name == name)


def _overwrite_a_train_header(plain) -> bytes:
    """The issue's reproduction: 99999999 over the 8-byte field at offset 148 of the header
    of a member under train/bee/, followed by more train/ and test/ members."""
    data = bytearray(plain.read_bytes())
    offset = _header_offset(plain, "good/train/bee/0001.png")
    data[offset + 148 : offset + 156] = b"99999999"
    return bytes(data)


def _truncate_inside_a_member(plain) -> bytes:
    """The archive cut halfway through the content of good/train/cat/0000.png."""
    with tarfile.open(plain) as tar:
        member = tar.getmember("good/train/cat/0000.png")
    return plain.read_bytes()[: member.offset_data + member.size // 2]


def _append_a_second_archive(plain) -> bytes:
    data = plain.read_bytes()
    return data + data  # tarfile stops at the first end-of-archive marker


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            _overwrite_a_train_header,
            r"in or after member good/train/bee/0000.png\): the member "
            r"header at byte \d+ is damaged",
        ),
        (
            _truncate_inside_a_member,
            r"good/train/cat/0000.png holds \d+ of its \d+ bytes|"
            r"unexpected end of data",
        ),
        (_append_a_second_archive, "data follows the end-of-archive marker"),
    ],
    ids=["damaged_header", "truncated_member", "two_archives"],
)
def test_a_damaged_archive_is_an_error_never_a_smaller_data_set(tmp_path, damage, expected):
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(gzip.compress(damage(_plain_tar(tmp_path))))
    with pytest.raises(ValueError, match="is damaged or truncated") as error:
        _load_folder(archive, tmp_path / "cache")
    assert str(archive) in str(error.value) and "No partial data set is used" in str(error.value)
    assert re.search(expected, str(error.value)), str(error.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("cut", [0.5, 0.99], ids=["half", "last_bytes"])
def test_a_truncated_gzip_stream_is_a_message_not_a_traceback(tmp_path, cut):
    compressed = gzip.compress(_plain_tar(tmp_path).read_bytes())
    archive = tmp_path / "cut.tar.gz"
    archive.write_bytes(compressed[: int(len(compressed) * cut)])
    with pytest.raises(ValueError, match=r"cut.tar.gz' is damaged or truncated \("):
        _load_folder(archive, tmp_path / "cache")


def test_a_cache_that_disagrees_with_its_member_count_is_decoded_again(tmp_path):
    archive = tmp_path / "imgs.tar.gz"
    archive.write_bytes(gzip.compress(_plain_tar(tmp_path).read_bytes()))
    whole = _load_folder(archive, tmp_path / "cache")
    assert len(whole.train.y) == 9
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    partial = torch.load(cache_file, weights_only=True)
    partial["train_x"], partial["train_y"] = partial["train_x"][:5], partial["train_y"][:5]
    torch.save(partial, cache_file)  # what a partial load cached under the same key looked like
    again = _load_folder(archive, tmp_path / "cache")
    assert torch.equal(again.train.x, whole.train.x) and len(again.train.y) == 9


def test_cache_inside_the_image_directory_keeps_its_key(tmp_path, monkeypatch):
    _make_folder(tmp_path / "imgs")
    _load_folder(tmp_path / "imgs", tmp_path / "imgs" / "cache")
    monkeypatch.setattr(imagefolder, "_decode", None)  # any decoding would now fail
    _load_folder(tmp_path / "imgs", tmp_path / "imgs" / "cache")


def test_grayscale_image_among_rgb_is_expanded(tmp_path):
    _make_folder(tmp_path / "imgs")
    gray = _image(7, channels=1)
    _write_png(tmp_path / "imgs" / "train" / "ant" / "gray.png", gray)
    bundle = _load_folder(tmp_path / "imgs", tmp_path / "cache")
    index = 3  # ant's 0000..0002, then gray.png
    assert torch.equal(bundle.train.x[index], gray.expand(3, -1, -1))


# ---------------------------------------------------------------- FedProx synthetic


def test_synthetic_has_a_natural_split_per_device():
    config = DataConfig(dataset="synthetic", num_clients=12, synthetic_seed=3)
    bundle = load_dataset(config)
    assert bundle.train.x.dtype == torch.float32 and bundle.train.x.shape[1] == 60
    assert bundle.mean is None and bundle.std is None and bundle.num_classes == 10
    assert len(bundle.natural_train) == len(bundle.natural_test) == 12
    train_ids = np.concatenate(bundle.natural_train)
    test_ids = np.concatenate(bundle.natural_test)
    assert np.array_equal(np.sort(train_ids), np.arange(len(bundle.train.y)))
    assert np.array_equal(np.sort(test_ids), np.arange(len(bundle.test.y)))
    for train, test in zip(bundle.natural_train, bundle.natural_test, strict=True):
        n = len(train) + len(test)
        assert n >= 50 and len(train) == int(0.8 * n)
    assert int(bundle.train.y.min()) >= 0 and int(bundle.train.y.max()) < 10
    again = load_dataset(config)
    assert torch.equal(bundle.train.x, again.train.x)
    other = load_dataset(DataConfig(dataset="synthetic", num_clients=12, synthetic_seed=4))
    assert other.train.x.shape != bundle.train.x.shape or not torch.equal(
        other.train.x, bundle.train.x
    )


def test_synthetic_devices_differ_in_their_labels():
    """Synthetic(1, 1) is non-IID: devices' label distributions differ a lot."""
    bundle = load_dataset(DataConfig(dataset="synthetic", num_clients=10))
    y = bundle.train.y.numpy()
    dominant = [np.bincount(y[ids], minlength=10).max() / len(ids) for ids in bundle.natural_train]
    assert np.mean(dominant) > 0.4  # IID over 10 classes would be ~0.1-0.2


# ---------------------------------------------------------------- report


def test_label_count_table_has_one_row_per_client():
    counts = np.arange(12).reshape(4, 3)
    table = label_count_table(counts, ["a", "b", "c"])
    assert table.row_count == 4 and len(table.columns) == 1 + 3 + 1
    assert list(table.columns[-1].cells) == ["3", "12", "21", "30"]
    many = label_count_table(np.ones((7, 100), dtype=int), [str(c) for c in range(100)])
    assert many.row_count == 7 and len(many.columns) < 10  # summarised, not 100 columns


def test_heatmap_png_is_written(tmp_path):
    counts = np.random.default_rng(0).integers(0, 50, (15, 10))
    path = plot_label_heatmap(counts, [str(c) for c in range(10)], tmp_path / "plots" / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _write_idx(path, array: np.ndarray) -> None:
    """An MNIST-format idx file (big-endian header, then uint8 data)."""
    magic = (0x08 << 8) | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_torchvision_mnist_files_load_as_uint8_tensors(tmp_path, dataset, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    train_y, test_y = np.array([0, 1, 2, 3, 4, 9]), np.array([5, 6, 7, 8])
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    bundle = load_dataset(DataConfig(dataset=dataset, root=str(tmp_path)))
    assert bundle.train.x.shape == (6, 1, 28, 28) and bundle.train.x.dtype == torch.uint8
    assert bundle.test.x.shape == (4, 1, 28, 28)
    assert torch.equal(bundle.train.x[:, 0], torch.from_numpy(train_x.astype(np.uint8)))
    assert bundle.train.y.tolist() == train_y.tolist() and bundle.test.y.dtype == torch.int64
    assert bundle.num_classes == 10 and len(bundle.classes) == 10
    mean = bundle.train.x.float().mean().item() / 255
    assert bundle.mean == pytest.approx((mean,), abs=1e-4)
