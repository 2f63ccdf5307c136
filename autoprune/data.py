"""Image classification data: Fashion-MNIST (default), MNIST, CIFAR-10 and a synthetic set.

Everything is held in memory as uint8 tensors (these data sets are small) and batched
by hand, which on a CPU is faster than a DataLoader with workers. A validation split is
held out from the training set with a fixed seed; searches select on it and the test
set is used only for final numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from autoprune.errors import AutopruneError, SettingError

log = logging.getLogger(__name__)

DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives, how to check it, and what its images look like."""

    name: str
    layout: str  # "idx" (MNIST family) or "cifar" (python pickle batches)
    files: dict[str, str]  # file name -> MD5 of the file as published
    base_url: str  # canonical download location
    default_dir: str  # where it is looked for when the user names no directory
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flips are a valid augmentation
    crop_padding: int


def _cache_dir(name: str) -> str:
    root = os.environ.get("AUTOPRUNE_DATA", os.path.join(Path.home(), ".cache", "autoprune", "data"))
    return os.path.join(root, name)


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist", layout="idx",
        files={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        default_dir="/usr/share/datasets/fashion-mnist",
        channels=1, size=28, num_classes=10, mean=(0.2860,), std=(0.3530,),
        hflip=True, crop_padding=2),
    "mnist": DatasetSpec(
        name="mnist", layout="idx",
        files={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        default_dir=_cache_dir("mnist"),
        channels=1, size=28, num_classes=10, mean=(0.1307,), std=(0.3081,),
        hflip=False, crop_padding=2),
    "cifar10": DatasetSpec(
        name="cifar10", layout="cifar",
        files={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        base_url="https://www.cs.toronto.edu/~kriz/",
        default_dir=_cache_dir("cifar10"),
        channels=3, size=32, num_classes=10, mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616), hflip=True, crop_padding=4),
}

DATASET_NAMES = (*SPECS, "synthetic")


@dataclass
class Split:
    """Images (N×C×H×W) and labels (int64, N) of one split: uint8 images are normalised with the
    data set's mean and std when batched, float images (already normalised by their owner) are
    used as they are."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DataBundle:
    """Train / validation / test splits plus what is needed to feed them to a model."""

    name: str
    train: Split
    val: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    hflip: bool = False
    crop_padding: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float tensor normalised with the data set's mean and std; float images
        as they are."""
        if images.is_floating_point():
            return images.float()
        x = images.float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False,
                augment: bool = False, generator: torch.Generator | None = None,
                limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised (images, labels) batches of one split.

        `limit` caps the number of images used (taken after shuffling), which the search
        uses for quick evaluations on a fixed validation subset.
        """
        data: Split = getattr(self, split)
        n = len(data)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if limit is not None:
            order = order[:limit]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x = data.images[idx]
            if augment:
                x = augment_batch(x, self.crop_padding, self.hflip, generator)
            yield self.normalize(x), data.labels[idx]


def augment_batch(images: torch.Tensor, padding: int, hflip: bool,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop after zero padding and optional horizontal flip, on a uint8 batch."""
    n, c, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (torch.arange(h).view(1, h) + dy.view(n, 1)).view(n, 1, h, 1)
        cols = (torch.arange(w).view(1, w) + dx.view(n, 1)).view(n, 1, 1, w)
        batch_idx = torch.arange(n).view(n, 1, 1, 1)
        chan_idx = torch.arange(c).view(1, c, 1, 1)
        out = padded[batch_idx, chan_idx, rows, cols]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out = out.clone() if out is images else out
        out[flip] = out[flip].flip(-1)
    return out


# ---------------------------------------------------------------- file readers

def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a uint8 array.

    Raises AutopruneError for a file that is not IDX, is truncated, or is not uint8.
    """
    try:
        with _open_maybe_gz(path) as fh:
            raw = fh.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise AutopruneError(f"cannot read {path}: {exc}; the file is corrupt or truncated, "
                             "delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise AutopruneError(f"{path} is not an IDX file (bad magic number); delete it and fetch it again")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise AutopruneError(f"{path}: IDX element type 0x{dtype_code:02x} is not uint8")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise AutopruneError(f"{path} is truncated (header incomplete); delete it and fetch it again")
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims)) if dims else 0
    if len(raw) - header != expected:
        raise AutopruneError(
            f"{path} is truncated or corrupt: header promises {expected} bytes of data, "
            f"file holds {len(raw) - header}; delete it and fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dir(directory: Path, spec: DatasetSpec):
    arrays = []
    for stem in _IDX_FILES:
        path = _find_idx(directory, stem)
        if path is None:
            raise AutopruneError(f"{spec.name}: {stem}[.gz] not found in {directory}")
        arrays.append(read_idx(path))
    train_x, train_y, test_x, test_y = arrays
    for images, labels, which in ((train_x, train_y, "train"), (test_x, test_y, "test")):
        if images.ndim != 3 or images.shape[1:] != (spec.size, spec.size):
            raise AutopruneError(f"{spec.name} {which} images in {directory} have shape "
                                 f"{images.shape[1:]}, expected ({spec.size}, {spec.size})")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise AutopruneError(f"{spec.name} {which}: {labels.shape[0]} labels for "
                                 f"{images.shape[0]} images in {directory}")
        if labels.size and labels.max() >= spec.num_classes:
            raise AutopruneError(f"{spec.name} {which} labels in {directory} exceed "
                                 f"{spec.num_classes - 1}; is this the right data set?")
    return train_x[:, None], train_y, test_x[:, None], test_y


def _load_cifar_dir(directory: Path, spec: DatasetSpec):
    batch_dir = directory / "cifar-10-batches-py"
    if not batch_dir.is_dir():
        archive = directory / "cifar-10-python.tar.gz"
        if archive.is_file():
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(directory, filter="data")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise AutopruneError(f"cannot unpack {archive}: {exc}; delete it and fetch it again") from None
        elif (directory / "data_batch_1").is_file():
            batch_dir = directory
    if not batch_dir.is_dir():
        raise AutopruneError(f"cifar10: neither cifar-10-batches-py/ nor cifar-10-python.tar.gz in {directory}")

    def read_batch(name: str):
        path = batch_dir / name
        if not path.is_file():
            raise AutopruneError(f"cifar10: {path} not found")
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(entry["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
            raise AutopruneError(f"cifar10: {path} is corrupt or truncated ({exc}); delete it and fetch it again") from None
        if labels.shape[0] != images.shape[0]:
            raise AutopruneError(f"cifar10: {path} has {labels.shape[0]} labels for {images.shape[0]} images")
        return images, labels

    parts = [read_batch(f"data_batch_{i}") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch("test_batch")
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------- downloads

def md5_of(path: Path) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout: float = 30.0) -> None:
    """Download `url` to `dest`, verifying its MD5; the file appears only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out)
        got = md5_of(tmp)
        if got != md5:
            raise AutopruneError(f"checksum mismatch for {url}: got MD5 {got}, expected {md5}; "
                                 "the server sent a different or damaged file")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise AutopruneError(f"cannot download {url}: {exc}; check the network or put the files "
                             f"in {dest.parent} by hand") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch(spec: DatasetSpec, directory: Path, base_url: str | None = None) -> None:
    """Download the files of `spec` that are missing from `directory`, verifying checksums."""
    base = base_url or spec.base_url
    if not base.endswith("/"):
        base += "/"
    for name, md5 in spec.files.items():
        dest = directory / name
        if spec.layout == "idx" and _find_idx(directory, name.removesuffix(".gz")) is not None:
            continue
        if spec.layout == "cifar" and ((directory / "cifar-10-batches-py").is_dir() or dest.is_file()):
            continue
        log.info("downloading %s", base + name)
        download_file(base + name, dest, md5)


# ---------------------------------------------------------------- synthetic

def make_synthetic(num_train: int = 2000, num_test: int = 500, channels: int = 1, size: int = 28,
                   num_classes: int = 10, seed: int = 0):
    """A small learnable data set: each class is a fixed random blob pattern plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, size=(num_classes, channels, size, size))
    # smooth the templates so classes differ in structure, not only in pixel noise
    kernel = np.ones(5) / 5.0
    for axis in (2, 3):
        templates = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same"), axis, templates)
    templates = (templates - templates.min()) / (templates.max() - templates.min())

    def draw(n: int):
        labels = rng.integers(0, num_classes, size=n)
        noise = rng.normal(0, 0.25, size=(n, channels, size, size))
        images = np.clip(templates[labels] + noise, 0, 1)
        return (images * 255).astype(np.uint8), labels.astype(np.int64)

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------- entry point

def split_indices(n: int, val_size: int, seed: int = DEFAULT_SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-seed (train, val) index split of n training images."""
    if not 0 <= val_size < n:
        raise AutopruneError(f"validation size {val_size} must be in [0, {n - 1}]")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def load_data(name: str = "fashion-mnist", data_dir: str | os.PathLike | None = None, *,
              val_size: int = DEFAULT_VAL_SIZE, split_seed: int = DEFAULT_SPLIT_SEED,
              download: bool = True, base_url: str | None = None,
              synthetic_size: tuple[int, int] = (2000, 500),
              synthetic_shape: tuple[int, int] = (1, 28), image_size: int | None = None) -> DataBundle:
    """Load a data set by name (or an image folder, see `load_image_folder`) and hold out a
    validation split from its training set.

    Files are read from `data_dir` (or the data set's default directory). Missing files
    are downloaded from the canonical location (or `base_url`) when `download` is true,
    with MD5 verification.
    """
    if name not in SPECS and name != "synthetic" and is_image_folder(name):
        return load_image_folder(name, image_size=image_size, val_size=val_size, split_seed=split_seed)
    if is_data_factory(name):
        if image_size is not None:
            raise SettingError("image_size", "applies to image folders; a data factory's Datasets give their own "
                                             "image size")
        return load_data_factory(name, val_size=val_size, split_seed=split_seed)
    if name == "synthetic":
        channels, size = synthetic_shape
        train_x, train_y, test_x, test_y = make_synthetic(*synthetic_size, channels=channels, size=size)
        mean, std, num_classes, hflip, pad = (0.5,) * channels, (0.25,) * channels, 10, False, 0
        source = "generated"
        val_size = min(val_size, len(train_y) // 5)
    else:
        spec = SPECS.get(name)
        if spec is None:
            raise AutopruneError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}, or give an "
                                 "image folder (DIR/train/<class>/<image files>)")
        directory = Path(data_dir) if data_dir is not None else Path(spec.default_dir)
        if data_dir is not None and not directory.is_dir() and not download:
            raise AutopruneError(f"data directory {directory} does not exist")
        if download:
            try:
                fetch(spec, directory, base_url)
            except AutopruneError as exc:
                if name == "fashion-mnist" and data_dir is None:
                    raise AutopruneError(
                        f"{exc}. On Debian, `apt-get install dataset-fashion-mnist` puts the files in "
                        f"{spec.default_dir}; or give the directory that holds the files") from None
                raise
        elif not directory.is_dir():
            hint = (" (on Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else "")
            raise SettingError("data_dir", f"{name}: directory {directory} not found{hint}; give the directory "
                                           "that holds the files")
        loader = _load_idx_dir if spec.layout == "idx" else _load_cifar_dir
        train_x, train_y, test_x, test_y = loader(directory, spec)
        mean, std, num_classes, hflip, pad = spec.mean, spec.std, spec.num_classes, spec.hflip, spec.crop_padding
        source = str(directory)

    train_idx, val_idx = split_indices(len(train_y), val_size, split_seed)
    tx = torch.from_numpy(np.array(train_x, dtype=np.uint8, copy=True))
    ty = torch.from_numpy(np.asarray(train_y, dtype=np.int64))
    return DataBundle(
        name=name,
        train=Split(tx[train_idx], ty[train_idx]),
        val=Split(tx[val_idx], ty[val_idx]),
        test=Split(torch.from_numpy(np.array(test_x, dtype=np.uint8, copy=True)), torch.from_numpy(np.asarray(test_y, dtype=np.int64))),
        mean=mean, std=std, num_classes=num_classes, hflip=hflip, crop_padding=pad,
        meta={"source": source, "val_size": val_size, "split_seed": split_seed},
    )


def input_shape_for(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """(channels, height, width) of one image of a named data set, without loading it."""
    if name == "synthetic":
        return (1, 28, 28)
    if name not in SPECS and is_image_folder(name):
        return load_image_folder(name, image_size=image_size).input_shape
    if is_data_factory(name):
        return load_data_factory(name).input_shape
    spec = SPECS.get(name)
    if spec is None:
        raise AutopruneError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return (spec.channels, spec.size, spec.size)


def _collect(source, split: str) -> Split | None:
    """A split held in memory from a `Dataset` or `DataLoader` of (image, label) pairs."""
    from torch.utils.data import DataLoader, Dataset

    if source is None:
        return None
    if isinstance(source, DataLoader):
        batches = source
    elif isinstance(source, Dataset) or hasattr(source, "__getitem__"):
        if hasattr(source, "__len__") and len(source) == 0:
            raise AutopruneError(f"the {split} set is empty")
        batches = DataLoader(source, batch_size=256, shuffle=False)
    else:
        raise AutopruneError(f"the {split} set must be a torch Dataset or DataLoader of (image, label) pairs, not "
                             f"{type(source).__name__}")
    images, labels = [], []
    try:
        for batch in batches:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise AutopruneError(f"the {split} set must yield (image, label) pairs; it yielded "
                                     f"{type(batch).__name__}")
            x, y = torch.as_tensor(batch[0]), torch.as_tensor(batch[1])
            images.append(x), labels.append(y.reshape(-1).long())
    except AutopruneError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AutopruneError(f"cannot read the {split} set as (image, label) pairs: {first}") from None
    if not images:
        raise AutopruneError(f"the {split} set yielded no batches")
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        shown = ", ".join(str(s) for s in sorted(shapes))
        raise AutopruneError(f"the {split} set's images must all have one shape (channels, height, width); "
                             f"got {shown}")
    x = torch.cat(images)
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise AutopruneError(f"the {split} set's images must be uint8 or float tensors, not {x.dtype}")
    return Split(x if x.dtype == torch.uint8 else x.float(), torch.cat(labels))


def bundle_from_datasets(train, val, test=None, *, num_classes: int | None = None,
                         name: str = "user data") -> DataBundle:
    """A DataBundle from the caller's own data: `Dataset`s or `DataLoader`s of (image, label).

    Every split is read once into memory. Float images are taken as normalised by their
    owner and used as they are; uint8 images are scaled to [0, 1] and normalised with the
    mean and std of the training split. No augmentation is applied. Labels must lie in
    [0, num_classes) (default: the largest label seen plus one).
    """
    splits = {"train": _collect(train, "train"), "val": _collect(val, "val")}
    if splits["val"] is None:
        raise AutopruneError("a validation set is needed: candidates are scored on it (never on the test set)")
    test_split = _collect(test, "test")
    shape = tuple(splits["train"].images.shape[1:])
    for key, split in (*splits.items(), ("test", test_split)):
        if split is not None and tuple(split.images.shape[1:]) != shape:
            raise AutopruneError(f"the {key} set's images have shape {tuple(split.images.shape[1:])}, the train "
                                 f"set's {shape}")
        if split is not None and split.images.dtype != splits["train"].images.dtype:
            raise AutopruneError(f"the {key} set's images are {split.images.dtype}, the train set's "
                                 f"{splits['train'].images.dtype}; give every split in one form")
    seen = max(int(split.labels.max()) for split in (*splits.values(), test_split) if split is not None)
    classes = num_classes if num_classes is not None else seen + 1
    for key, split in (*splits.items(), ("test", test_split)):
        if split is not None and (int(split.labels.min()) < 0 or int(split.labels.max()) >= classes):
            raise AutopruneError(f"the {key} set has labels outside [0, {classes - 1}] (found "
                                 f"{int(split.labels.min())} to {int(split.labels.max())}); the model has "
                                 f"{classes} classes")
    channels = shape[0]
    train_x = splits["train"].images
    if train_x.dtype == torch.uint8:
        scaled = train_x.float().div_(255.0).transpose(0, 1).reshape(channels, -1)
        mean, std = tuple(scaled.mean(1).tolist()), tuple(max(v, 1e-6) for v in scaled.std(1).tolist())
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels  # unused: float images are already normalised
    if test_split is None:
        test_split = Split(train_x[:0], splits["train"].labels[:0])
    return DataBundle(name=name, train=splits["train"], val=splits["val"], test=test_split, mean=mean, std=std,
                      num_classes=classes, meta={"source": "given from Python", "dtype": str(train_x.dtype)})


# ---------------------------------------------------------------- data factories

def is_data_factory(name: str | os.PathLike) -> bool:
    """True when `name` reads `package.module:factory` (and is no directory or named data set)."""
    name = str(name)
    return ":" in name and name not in SPECS and not Path(name).exists()


def load_data_factory(spec: str, *, val_size: int = DEFAULT_VAL_SIZE,
                      split_seed: int = DEFAULT_SPLIT_SEED) -> DataBundle:
    """The data a user's `package.module:factory` returns: `(train, val, test)` torch
    Datasets (or DataLoaders) of (image, label) pairs, read as `bundle_from_datasets` reads
    them. `test` may be None or left out; a `val` of None is held out from train
    (`val_size` images, the fixed split seed), as for image folders."""
    from torch.utils.data import Subset

    from autoprune.models import import_factory

    factory = import_factory(spec, "data")
    try:
        result = factory()
    except Exception as exc:  # the user's code: its failure is theirs to see, in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise SettingError("data", f"{spec} raised {type(exc).__name__}: {first}") from None
    shape = "(train, val, test): torch Datasets of (image, label) pairs, val and test may be None"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        what = f"{len(result)} items" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}"
        raise SettingError("data", f"{spec} returned {what}; it must return {shape}")
    train, val, test = (*result, None)[:3]
    if train is None:
        raise SettingError("data", f"{spec} returned no train set; it must return {shape}")
    held_out = val is None
    if held_out:
        if not hasattr(train, "__len__") or not hasattr(train, "__getitem__"):
            raise SettingError("data", f"{spec} returned no val set and a train set that cannot be indexed; "
                                       "return a val set, or a train Dataset with __len__ and __getitem__")
        n = len(train)
        if not 0 < val_size < n:
            raise SettingError("val_size", f"{val_size} images cannot be held out of {spec}'s {n} training "
                                           "images; choose fewer, or return a val set")
        train_idx, val_idx = split_indices(n, val_size, split_seed)
        train, val = Subset(train, train_idx.tolist()), Subset(train, val_idx.tolist())
    try:
        bundle = bundle_from_datasets(train, val, test, name=spec)
    except AutopruneError as exc:
        raise SettingError("data", f"{spec}: {exc}") from None
    bundle.meta.update({"source": spec, "val_held_out": held_out,
                        **({"val_size": val_size, "split_seed": split_seed} if held_out else {})})
    return bundle


# ---------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_folder(name: str | os.PathLike) -> bool:
    """True when `name` is a directory laid out as DIR/train/<class>/<images>."""
    return Path(name).is_dir()


def _class_files(directory: Path, split: str) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise AutopruneError(f"{directory} has no class folders; lay the images out as {directory.parent}/"
                             f"{split}/<class>/<image files>")
    return {c: sorted(p for p in (directory / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) for c in classes}


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes image files with Pillow into uint8 C×H×W tensors; a file that cannot be read
    gives None and the reason, so that the caller reports it in one line."""

    def __init__(self, files: list[Path], mode: str, image_size: int | None):
        self.files, self.mode, self.image_size = files, mode, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as opened:
                image = opened.convert(self.mode)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            return None, f"{self.files[i]}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self.image_size is not None:  # the shorter side to the size, then the centre square
            w, h = image.size
            scale = self.image_size / min(w, h)
            image = image.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))),
                                 Image.BILINEAR)
            w, h = image.size
            left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), None


def _first_list(batch):
    return batch  # keep images of different sizes apart; checked after decoding


def _decode(files: list[Path], mode: str, image_size: int | None, split: str, workers: int) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(_ImageFiles(files, mode, image_size), batch_size=64, shuffle=False,
                                         num_workers=workers, collate_fn=_first_list)
    images, sizes = [], {}
    for batch in loader:
        for (image, problem), path in zip(batch, files[len(images):]):
            if problem is not None:
                raise AutopruneError(f"cannot read an image of the {split} split: {problem}")
            sizes.setdefault(tuple(image.shape[1:]), path)
            images.append(image)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({path.name})" for (h, w), path in list(sizes.items())[:3])
        raise AutopruneError(f"the {split} images have different sizes ({shown}); give an image size to resize "
                             "and centre-crop them to")
    return torch.stack(images)


def load_image_folder(directory: str | os.PathLike, *, image_size: int | None = None,
                      val_size: int = DEFAULT_VAL_SIZE, split_seed: int = DEFAULT_SPLIT_SEED,
                      workers: int | None = None) -> DataBundle:
    """A data set laid out as DIR/train/<class>/*.png|jpg (optional DIR/val/ and DIR/test/ with
    the same classes), decoded with Pillow into memory.

    Without val/, `val_size` images (at most a fifth of train) are held out from train with
    the fixed split seed. Every image is converted to the first training image's colour
    form (grey, RGB or RGBA); with `image_size`, resized (shorter side) and centre-cropped to
    a square of that size, else all must share one size. Images are normalised with the
    training split's per-channel mean and std. Without test/, the test split is empty.
    """
    root = Path(directory)
    if not (root / "train").is_dir():
        raise AutopruneError(f"{root} is not an image folder: it has no train/ directory (lay the images out as "
                             f"{root}/train/<class>/<image files>, optionally {root}/val/ and {root}/test/)")
    if image_size is not None and image_size < 1:
        raise SettingError("image_size", f"must be at least 1, got {image_size}")
    train_files = _class_files(root / "train", "train")
    classes = list(train_files)
    if not any(train_files.values()):
        raise AutopruneError(f"{root / 'train'} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    empty = [c for c, files in train_files.items() if not files]
    if empty:
        raise AutopruneError(f"class folder(s) {', '.join(empty)} of {root / 'train'} hold no images")
    splits = {"train": train_files}
    for split in ("val", "test"):
        if (root / split).is_dir():
            found = _class_files(root / split, split)
            if sorted(found) != classes:
                raise AutopruneError(f"the classes of {root / split} ({', '.join(sorted(found))}) differ from those "
                                     f"of {root / 'train'} ({', '.join(classes)})")
            splits[split] = found
    from PIL import Image

    first = next(f for files in train_files.values() for f in files)
    try:
        with Image.open(first) as opened:
            mode = "L" if opened.mode in ("1", "L", "I", "I;16", "F") else \
                "RGBA" if opened.mode in ("RGBA", "LA") or "transparency" in opened.info else "RGB"
    except OSError as exc:
        raise AutopruneError(f"cannot read an image of the train split: {first}: {exc}") from None
    if workers is None:  # the CPUs this process may run on (it may be pinned), at most two
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(2, usable) if usable > 1 else 0
    tensors = {}
    for split, by_class in splits.items():
        files = [f for c in classes for f in by_class[c]]
        labels = torch.tensor([i for i, c in enumerate(classes) for _ in by_class[c]], dtype=torch.int64)
        tensors[split] = Split(_decode(files, mode, image_size, split, workers), labels)
    shapes = {split: tuple(s.images.shape[1:]) for split, s in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise AutopruneError(f"the splits' images differ in size ({shapes}); give an image size to resize them to")
    if "val" not in tensors:
        train = tensors["train"]
        held = min(val_size, len(train) // 5)
        train_idx, val_idx = split_indices(len(train), held, split_seed)
        tensors["train"] = Split(train.images[train_idx], train.labels[train_idx])
        tensors["val"] = Split(train.images[val_idx], train.labels[val_idx])
    if "test" not in tensors:
        tensors["test"] = Split(tensors["train"].images[:0], tensors["train"].labels[:0])
    channels = tensors["train"].images.shape[1]
    scaled = tensors["train"].images.float().div_(255.0).transpose(0, 1).reshape(channels, -1)
    mean, std = tuple(scaled.mean(1).tolist()), tuple(max(v, 1e-6) for v in scaled.std(1).tolist())
    return DataBundle(name=str(root.resolve()), train=tensors["train"], val=tensors["val"], test=tensors["test"],
                      mean=mean, std=std, num_classes=len(classes),
                      meta={"source": str(root.resolve()), "classes": classes, "image_size": image_size,
                            "mode": mode, "val_size": len(tensors["val"]), "split_seed": split_seed})
