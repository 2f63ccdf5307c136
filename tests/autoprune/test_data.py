import dataclasses
import functools
import gzip
import http.server
import pickle
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune.data import SPECS, augment_batch, fetch, load_data, md5_of, read_idx, split_indices
from autoprune.errors import AutopruneError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                   reason="Debian package dataset-fashion-mnist not installed")


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def make_mnist_dir(root: Path, n_train=60, n_test=20, size=28, compress=True) -> Path:
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, size, size)), compress)
    write_idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), compress)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, size, size)), compress)
    write_idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), compress)
    return root


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (False, True):
        path = write_idx(tmp_path / f"x{compress}", array, compress)
        assert np.array_equal(read_idx(path), array)


def test_truncated_idx_file_is_reported(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((10, 28, 28)))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AutopruneError, match="truncated"):
        read_idx(path)


def test_corrupt_gzip_is_reported(tmp_path):
    path = write_idx(tmp_path / "x", np.zeros((10, 28, 28)), compress=True)
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AutopruneError, match="corrupt or truncated"):
        read_idx(path)


def test_not_an_idx_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"hello world, this is not IDX")
    with pytest.raises(AutopruneError, match="not an IDX file"):
        read_idx(path)


def test_mnist_from_user_directory_with_fixed_validation_split(tmp_path):
    make_mnist_dir(tmp_path)
    a = load_data("mnist", tmp_path, val_size=10, download=False)
    b = load_data("mnist", tmp_path, val_size=10, download=False)
    assert (len(a.train), len(a.val), len(a.test)) == (50, 10, 20)
    assert a.input_shape == (1, 28, 28)
    assert torch.equal(a.val.images, b.val.images)
    train_idx, val_idx = split_indices(60, 10)
    assert not set(train_idx) & set(val_idx) and len(set(train_idx) | set(val_idx)) == 60


def test_wrong_image_shape_in_directory(tmp_path):
    make_mnist_dir(tmp_path, size=20)
    with pytest.raises(AutopruneError, match=r"shape \(20, 20\), expected \(28, 28\)"):
        load_data("mnist", tmp_path, val_size=10, download=False)


def test_missing_directory_and_missing_file(tmp_path):
    with pytest.raises(AutopruneError, match="does not exist"):
        load_data("mnist", tmp_path / "nowhere", download=False)
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AutopruneError, match="t10k-labels-idx1-ubyte"):
        load_data("mnist", tmp_path, val_size=10, download=False)


def test_unknown_data_set():
    with pytest.raises(AutopruneError, match="fashion-mnist, mnist, cifar10, synthetic"):
        load_data("imagenet")


def write_cifar(root: Path, per_batch=8) -> Path:
    batch_dir = root / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist()}
        with open(batch_dir / name, "wb") as fh:
            pickle.dump(entry, fh)
    return root


def test_cifar_pickle_batches(tmp_path):
    write_cifar(tmp_path)
    data = load_data("cifar10", tmp_path, val_size=5, download=False)
    assert data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (35, 5, 8)
    x, y = next(data.batches("train", 4, augment=True))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_corrupt_cifar_batch(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(AutopruneError, match="corrupt or truncated"):
        load_data("cifar10", tmp_path, val_size=5, download=False)


def test_augmentation_keeps_shape_and_content():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = augment_batch(images, padding=2, hflip=True, generator=g)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(augment_batch(images, 0, False), images)


def test_synthetic_is_deterministic_and_learnable_shape():
    a, b = load_data("synthetic", val_size=100), load_data("synthetic", val_size=100)
    assert torch.equal(a.train.images, b.train.images)
    assert a.input_shape == (1, 28, 28) and a.num_classes == 10


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a directory."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@needs_fashion
def test_download_real_files_over_http_with_checksums(http_root, tmp_path):
    served, url = http_root
    for f in FASHION_DIR.glob("*.gz"):
        shutil.copy(f, served / f.name)
    # Debian recompresses the archives, so their MD5s differ from the published ones
    spec = dataclasses.replace(SPECS["fashion-mnist"], files={f.name: md5_of(f) for f in served.glob("*.gz")})
    target = tmp_path / "downloaded"
    fetch(spec, target, base_url=url)
    data = load_data("fashion-mnist", target, download=False)
    assert (len(data.train) + len(data.val), len(data.test)) == (60000, 10000)
    assert not list(target.glob("*.part"))


@needs_fashion
def test_download_checksum_mismatch_leaves_nothing(http_root, tmp_path):
    served, url = http_root
    for f in FASHION_DIR.glob("*.gz"):
        shutil.copy(f, served / f.name)
    target = tmp_path / "downloaded"
    with pytest.raises(AutopruneError, match="checksum mismatch"):
        fetch(SPECS["fashion-mnist"], target, base_url=url)  # the published MD5s
    assert not [p for p in target.iterdir() if p.name.endswith(".gz")]


def test_download_from_missing_server_path(http_root, tmp_path):
    _, url = http_root
    with pytest.raises(AutopruneError, match="cannot download"):
        fetch(SPECS["mnist"], tmp_path / "mnist", base_url=url)


@needs_fashion
def test_default_fashion_mnist():
    data = load_data("fashion-mnist", download=False)
    assert (len(data.train), len(data.val), len(data.test)) == (55000, 5000, 10000)
    assert data.input_shape == (1, 28, 28)
