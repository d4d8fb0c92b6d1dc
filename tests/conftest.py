import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # image_fixtures

from fashsim import fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fmnist_train():
    """The real Fashion-MNIST training split (the README's commands install it)."""
    return fashion_mnist.load_fashion_mnist("train", download=False)


@pytest.fixture(scope="session")
def fmnist_test():
    return fashion_mnist.load_fashion_mnist("test", download=False)


@pytest.fixture
def project_home(tmp_path, monkeypatch):
    """An empty project folder for outputs (data/, reports/), so tests never touch the real ones."""
    monkeypatch.setenv("FASHSIM_HOME", str(tmp_path))
    return tmp_path
