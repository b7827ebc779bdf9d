"""Image folders (``train/<class>/*``, ``test/<class>/*``) from a directory or straight from a tarball.

This is how real CIFAR runs on machines without internet: the JPEG copies are decoded once into
uint8 tensors and cached, so every later run starts in well under a second. Archives are read
member by member with ``tarfile`` (no extraction to disk), which also keeps shared read-only
copies untouched. The layout may sit under one top-level folder (``cifar10-jpeg/train/...``).

Classes are the ``train/`` sub-folders sorted alphabetically, which is CIFAR-10's label order.
An optional ``classes.csv`` next to ``train/`` (the CIFAR-100 copy) fixes the fine label ids and
maps each fine class to a coarse super-class, for the 20-class variant.

A damaged archive is an error, never a smaller data set. Python's ``tarfile`` ends its iteration
silently at a member header it cannot parse (a corrupted size field, a truncated header) and
keeps the members before it; here every header must parse, the archive is read to its end (so
a truncated or corrupted compressed stream fails its own check), and nothing but zeros may follow
the end-of-archive marker. Each failure names the file and what is wrong. The cache records how
many images of each split the source held, and a cache whose tensors disagree with that record,
or one written before the record existed, is decoded again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import lzma
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp")
# PIL modes decoded as one channel; everything else becomes RGB.
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
CLASSES_CSV = "classes.csv"
CSV_COLUMNS = ("fine_label", "fine_name", "coarse_label", "coarse_name")
# Bump when the cached layout changes so stale caches are ignored rather than misread.
# 2: caches record the image count of each split ("members"); version 1 could hold a partial
# load of a damaged archive.
CACHE_VERSION = 2
SPLITS = ("train", "test")
CACHE_KEYS = {"classes", "classes_csv", "train_x", "train_y", "test_x", "test_y", "members"}
# What reading a damaged or truncated archive raises, from tarfile and the decompressors.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)


@dataclass
class ImageFolderData:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]


def load_image_folder(root: str, cache_dir: str, coarse_labels: bool) -> ImageFolderData:
    """Decoded images of `root` (a directory or a .tar/.tar.gz), from the cache when possible.

    The cache holds the fine labels; the coarse mapping is applied after loading, so one cache
    file serves both label sets.
    """
    source = Path(root).expanduser().resolve()
    if not source.exists():
        raise FileNotFoundError(
            f"data.root={root!r} does not exist: for data.dataset=imagefolder point it at a "
            "directory or a .tar.gz holding train/<class>/* and test/<class>/*"
        )
    cache_path = _cache_path(source, Path(cache_dir))
    raw = _read_cache(cache_path)
    if raw is None:
        files, csv_text = _read_tar(source) if source.is_file() else _read_directory(source)
        raw = _decode(files, csv_text, str(source))
        raw["members"] = {split: len(files[split]) for split in SPLITS}
        _write_cache(raw, cache_path)
    return _apply_labels(raw, coarse_labels, root)


def _cache_path(source: Path, cache_dir: Path) -> Path:
    # A directory's own mtime misses edits inside it, so fold in the count, sizes and mtimes of
    # the files that are read (only those: a cache_dir inside root must not change the key).
    if source.is_file():
        stat = source.stat()
        count, size, mtime = 1, stat.st_size, stat.st_mtime_ns
    else:
        count, size, mtime = 0, 0, 0
        for path in source.rglob("*"):
            parts = path.relative_to(source).parts
            if path.is_file() and (_split_member(parts) or parts[-1] == CLASSES_CSV):
                stat = path.stat()
                count += 1
                size += stat.st_size
                mtime = max(mtime, stat.st_mtime_ns)
    key = f"{source}|{count}|{size}|{mtime}|v{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = source.name.split(".")[0] or "images"
    return cache_dir / f"imagefolder-{stem}-{digest}.pt"


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the unpickler raises all kinds of errors on a damaged file
        return None  # a cache is disposable: decode again and overwrite it
    if not isinstance(raw, dict) or not raw.keys() >= CACHE_KEYS:
        return None
    members = raw["members"]
    complete = isinstance(members, dict) and all(
        members.get(split) == len(raw[f"{split}_x"]) == len(raw[f"{split}_y"]) for split in SPLITS
    )
    return raw if complete else None


def _write_cache(raw: dict, path: Path) -> None:
    # Written to a temporary file and renamed, so a crash or a concurrent rank never leaves a
    # half-written cache that a later run would trust.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(raw, handle)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_member(parts: tuple[str, ...]) -> tuple[tuple[str, ...], str, str, str] | None:
    """(prefix, split, class, file name) for paths like [prefix/]train/<class>/<file>."""
    if any(part.startswith(".") for part in parts):  # hidden files, macOS ._ resource forks
        return None
    if len(parts) < 3 or parts[-3] not in SPLITS:
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return None
    return parts[:-3], parts[-3], parts[-2], parts[-1]


def _single_prefix(prefixes: set[tuple[str, ...]], source: str) -> tuple[str, ...]:
    if not prefixes:
        raise FileNotFoundError(
            f"data.root={source!r} holds no images under train/<class>/ or test/<class>/ "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    if len(prefixes) > 1:
        found = sorted("/".join(p) or "." for p in prefixes)
        raise ValueError(
            f"data.root={source!r} holds train/ or test/ folders in several places {found}; "
            "point data.root at one dataset"
        )
    (prefix,) = prefixes
    if len(prefix) > 1:
        raise ValueError(
            f"data.root={source!r}: train/ and test/ sit under {'/'.join(prefix)}; at most one "
            "top-level folder is allowed, point data.root at the folder holding train/"
        )
    return prefix


Files = dict[str, list[tuple[str, str, bytes]]]  # split -> [(class, file name, encoded bytes)]


class _StrictTarInfo(tarfile.TarInfo):
    """A member header that must parse. tarfile treats a bad header after the first (invalid
    number or checksum, a truncated block, the end of the file) as the end of the archive and
    silently drops every member after it; this raises instead. The end-of-archive marker (a
    zero block) still ends the iteration."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError(
                f"the archive ends at byte {tarfile_.offset} without its end-of-archive marker "
                "(truncated)"
            ) from None
        except tarfile.HeaderError as error:
            raise tarfile.ReadError(
                f"the member header at byte {tarfile_.offset} is damaged ({error})"
            ) from None


def _read_tar(source: Path) -> tuple[Files, str | None]:
    """Every member of the archive, read to its end; a damaged or truncated archive is a
    ValueError naming it, the member being read and the cause."""
    found: dict[tuple[str, ...], Files] = {}
    csv_texts: dict[tuple[str, ...], str] = {}
    where = "at its start"
    try:
        if not tarfile.is_tarfile(source):
            raise ValueError(
                f"data.root={str(source)!r} is a file but not a (compressed) tar archive: for "
                "data.dataset=imagefolder use a directory or a .tar/.tar.gz with train/ and test/"
            )
        with tarfile.open(source, "r:*", tarinfo=_StrictTarInfo) as archive:
            for member in archive:
                where = f"in or after member {member.name}"
                if not member.isfile():
                    continue
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if parts and parts[-1] == CLASSES_CSV:
                    csv_texts[parts[:-1]] = _read_member(archive, member).decode("utf-8")
                    continue
                split = _split_member(parts)
                if split is None:
                    continue
                prefix, name, label, file_name = split
                files = found.setdefault(prefix, {s: [] for s in SPLITS})
                files[name].append((label, file_name, _read_member(archive, member)))
            where = "after its last member"
            _read_to_end(archive)
    except ARCHIVE_ERRORS as error:
        cause = str(error) or type(error).__name__
        raise ValueError(
            f"data.root={str(source)!r} is damaged or truncated ({where}): {cause}. No partial "
            "data set is used; copy the archive again or re-create it (tar czf), or point "
            "data.root at the image directory"
        ) from None
    prefix = _single_prefix(set(found), str(source))
    return found[prefix], csv_texts.get(prefix)


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    assert handle is not None  # regular files always have a payload
    data = handle.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"{member.name} holds {len(data)} of its {member.size} bytes")
    return data


def _read_to_end(archive: tarfile.TarFile) -> None:
    """Read what follows the end-of-archive marker to the end of the (decompressed) stream:
    only zeros may follow (anything else is members tarfile would not read, e.g. a second
    archive appended), and reaching the end makes gzip and xz check their CRC and length."""
    fileobj = archive.fileobj
    # tarfile stopped after reading the zero block at archive.offset: read on from there
    # (only forward: a backward seek would decompress a gzip stream again from its start)
    if fileobj.tell() < archive.offset:
        fileobj.seek(archive.offset)
    while chunk := fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(
                "data follows the end-of-archive marker (e.g. a second archive appended to the "
                "first), which would not be read"
            )


def _read_directory(source: Path) -> tuple[Files, str | None]:
    found: dict[tuple[str, ...], Files] = {}
    for path in source.rglob("*"):
        if not path.is_file():
            continue
        split = _split_member(path.relative_to(source).parts)
        if split is None:
            continue
        prefix, name, label, file_name = split
        files = found.setdefault(prefix, {s: [] for s in SPLITS})
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ValueError(
                f"data.root={str(source)!r}: cannot read {path}: {error.strerror or error}"
            ) from None
        files[name].append((label, file_name, data))
    prefix = _single_prefix(set(found), str(source))
    csv_path = source.joinpath(*prefix, CLASSES_CSV)
    csv_text = csv_path.read_text("utf-8") if csv_path.is_file() else None
    return found[prefix], csv_text


def _decode(files: Files, csv_text: str | None, source: str) -> dict:
    classes = sorted({label for label, _, _ in files["train"]})
    if not classes:
        raise FileNotFoundError(f"data.root={source!r} has no images under train/<class>/")
    if not files["test"]:
        raise FileNotFoundError(f"data.root={source!r} has no images under test/<class>/")
    unknown = sorted({label for label, _, _ in files["test"]} - set(classes))
    if unknown:
        raise ValueError(f"data.root={source!r}: test/ has classes missing from train/: {unknown}")
    table = _parse_classes_csv(csv_text, classes, source) if csv_text is not None else None
    if table is not None:
        classes = [name for name, _, _ in table]  # the csv's fine ids, not folder order
    index = {name: i for i, name in enumerate(classes)}
    raw: dict = {"classes": classes, "classes_csv": csv_text}
    shape: tuple[int, ...] | None = None
    for split in SPLITS:
        # Sorted so a directory and its tarball give identical tensors whatever the member order.
        entries = sorted(files[split], key=lambda e: (index[e[0]], e[1]))
        images = []
        for label, file_name, data in entries:
            name = f"{split}/{label}/{file_name}"
            image = _decode_one(data, name, source)
            if shape is None:
                shape = image.shape[:2]
            elif image.shape[:2] != shape:
                raise ValueError(
                    f"data.root={source!r}: all images must have one size; {name} is "
                    f"{image.shape[:2]} (H, W), the first image is {shape}; resize the images "
                    "before using them"
                )
            images.append(image)
        channels = max(image.shape[2] for image in images)
        # A grayscale JPEG among RGB ones (it happens in scraped copies) is expanded, not fatal.
        if any(image.shape[2] != channels for image in images):
            images = [np.broadcast_to(im, (*shape, channels)) for im in images]
        stacked = torch.from_numpy(np.stack(images))  # (N, H, W, C)
        raw[f"{split}_x"] = stacked.permute(0, 3, 1, 2).contiguous()
        raw[f"{split}_y"] = torch.tensor([index[e[0]] for e in entries], dtype=torch.int64)
    return raw


def _decode_one(data: bytes, name: str, source: str) -> np.ndarray:
    """uint8 (H, W, C), C = 1 for grayscale and 3 for colour; alpha and palettes are dropped."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            mode = "L" if image.mode in GRAYSCALE_MODES else "RGB"
            pixels = np.asarray(image if image.mode == mode else image.convert(mode))
    except (OSError, ValueError) as error:
        raise ValueError(f"data.root={source!r}: cannot decode {name}: {error}") from error
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _parse_classes_csv(
    text: str, folder_classes: list[str], source: str
) -> list[tuple[str, int, str]]:
    """[(fine name, coarse id, coarse name)] in fine-id order, checked against the folders."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"data.root={source!r}: {CLASSES_CSV} must have columns {list(CSV_COLUMNS)}, "
            f"found {reader.fieldnames}"
        )
    rows = sorted(reader, key=lambda row: int(row["fine_label"]))
    if [int(row["fine_label"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"data.root={source!r}: {CLASSES_CSV} fine_label must be 0..N-1")
    names = [row["fine_name"] for row in rows]
    if sorted(names) != sorted(folder_classes):
        extra = sorted(set(folder_classes) ^ set(names))
        raise ValueError(
            f"data.root={source!r}: {CLASSES_CSV} and the train/ folders disagree on the "
            f"classes: {extra}"
        )
    return [(row["fine_name"], int(row["coarse_label"]), row["coarse_name"]) for row in rows]


def _apply_labels(raw: dict, coarse_labels: bool, root: str) -> ImageFolderData:
    classes = list(raw["classes"])
    train_y, test_y = raw["train_y"], raw["test_y"]
    if coarse_labels:
        if raw["classes_csv"] is None:
            raise ValueError(
                f"data.coarse_labels=true needs {CLASSES_CSV} (columns {', '.join(CSV_COLUMNS)}) "
                f"next to train/ in data.root={root!r}; none found"
            )
        table = _parse_classes_csv(raw["classes_csv"], classes, root)
        coarse_names = {coarse: name for _, coarse, name in table}
        if sorted(coarse_names) != list(range(len(coarse_names))):
            raise ValueError(f"data.root={root!r}: {CLASSES_CSV} coarse_label must be 0..K-1")
        fine_to_coarse = torch.tensor([coarse for _, coarse, _ in table], dtype=torch.int64)
        train_y, test_y = fine_to_coarse[train_y], fine_to_coarse[test_y]
        classes = [coarse_names[i] for i in range(len(coarse_names))]
    return ImageFolderData(raw["train_x"], train_y, raw["test_x"], test_y, classes)
