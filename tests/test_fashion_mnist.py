import gzip
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from fashsim.data import fashion_mnist
from fashsim.errors import DatasetFormatError, DatasetNotFoundError


def test_real_train_and_test_splits(fmnist_train, fmnist_test):
    assert fmnist_train.images.shape == (60000, 28, 28)
    assert fmnist_test.images.shape == (10000, 28, 28)
    assert fmnist_train.images.dtype == np.uint8
    assert fmnist_train.labels.dtype == np.int64
    assert len(fmnist_train.class_names) == 10
    assert fmnist_train.class_names[0] == "T-shirt/top" and fmnist_train.class_names[9] == "Ankle boot"
    # the published dataset is exactly balanced
    assert np.bincount(fmnist_train.labels).tolist() == [6000] * 10
    assert np.bincount(fmnist_test.labels).tolist() == [1000] * 10
    # garments light on a dark background: corners black, centre bright on average
    assert fmnist_train.images[:, 0, 0].mean() < 5
    assert fmnist_train.images[:, 14, 14].mean() > 100


def test_subset_keeps_pairs(fmnist_test):
    sub = fmnist_test.subset([3, 1])
    assert len(sub) == 2
    assert np.array_equal(sub.images[0], fmnist_test.images[3])
    assert sub.labels[1] == fmnist_test.labels[1]


@pytest.fixture(scope="module")
def real_dir():
    folder = fashion_mnist.find_fashion_mnist()
    assert folder is not None, "Fashion-MNIST must be installed for the tests (make test does it)"
    return folder


@pytest.fixture
def isolated_search(real_dir, monkeypatch, tmp_path):
    """No env var, an empty project and no system copy: only what a test provides is found."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setenv("FASHSIM_HOME", str(tmp_path / "project"))
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    return tmp_path


def _copy_real_files(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in fashion_mnist.MD5:
        shutil.copy(source / name, dest / name)
    return dest


def test_search_order_explicit_then_env_then_project(real_dir, isolated_search, monkeypatch):
    explicit = _copy_real_files(real_dir, isolated_search / "explicit")
    env = _copy_real_files(real_dir, isolated_search / "env")
    project = _copy_real_files(real_dir, fashion_mnist.default_download_dir())
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(env))
    assert fashion_mnist.find_fashion_mnist(explicit) == explicit
    assert fashion_mnist.find_fashion_mnist() == env
    monkeypatch.delenv(fashion_mnist.ENV_VAR)
    assert fashion_mnist.find_fashion_mnist() == project
    data = fashion_mnist.load_fashion_mnist("test", download=False)
    assert data.source == str(project) and len(data) == 10000


def test_incomplete_folder_is_skipped(real_dir, isolated_search):
    partial = _copy_real_files(real_dir, isolated_search / "partial")
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    assert fashion_mnist.find_fashion_mnist(partial) is None


def test_offline_without_copy_names_every_option(isolated_search, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "MIRRORS", ("http://127.0.0.1:9/",))  # closed port: refused at once
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist.load_fashion_mnist("train")
    message = str(info.value)
    for hint in (
        "$FASHSIM_DATA",
        "apt-get install dataset-fashion-mnist",
        "python -m fashsim data --download",
        "127.0.0.1:9",
        str(fashion_mnist.default_download_dir()),
    ):
        assert hint in message
    with pytest.raises(DatasetNotFoundError, match="not attempted"):
        fashion_mnist.load_fashion_mnist("train", download=False)


@pytest.fixture
def local_mirror(real_dir, tmp_path):
    """A real HTTP server on loopback serving a copy of the dataset files."""
    served = _copy_real_files(real_dir, tmp_path / "served")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_verifies_checksums(isolated_search, local_mirror, monkeypatch):
    served, url = local_mirror
    monkeypatch.setattr(fashion_mnist, "MIRRORS", (url,))
    monkeypatch.setattr(fashion_mnist, "MD5", {name: _md5(served / name) for name in fashion_mnist.MD5})
    data = fashion_mnist.load_fashion_mnist("test")
    assert len(data) == 10000
    assert data.source == str(fashion_mnist.default_download_dir())
    assert not list(fashion_mnist.default_download_dir().glob("*.part"))


def test_download_rejects_wrong_checksum(isolated_search, local_mirror, monkeypatch):
    _, url = local_mirror
    monkeypatch.setattr(fashion_mnist, "MIRRORS", (url,))
    # the real published checksums do not match the served (recompressed) files -> refused, nothing kept
    monkeypatch.setattr(fashion_mnist, "MD5", {name: "0" * 32 for name in fashion_mnist.MD5})
    with pytest.raises(DatasetNotFoundError, match="checksum mismatch"):
        fashion_mnist.download_fashion_mnist(progress=False)
    assert not any(fashion_mnist.default_download_dir().iterdir())


def test_corrupt_idx_files_are_refused(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    bad_magic.write_bytes(gzip.compress(b"\x01\x02\x03\x04" + b"\x00" * 20))
    with pytest.raises(DatasetFormatError, match="magic"):
        fashion_mnist.read_idx(bad_magic)
    short = tmp_path / "short.gz"
    header = b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    short.write_bytes(gzip.compress(header + b"\x00" * 100))
    with pytest.raises(DatasetFormatError, match="promises"):
        fashion_mnist.read_idx(short)
    not_gzip = tmp_path / "plain.gz"
    not_gzip.write_bytes(b"hello")
    with pytest.raises(DatasetFormatError, match="cannot be read"):
        fashion_mnist.read_idx(not_gzip)


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load_fashion_mnist("validation")
