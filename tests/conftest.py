import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # image_fixtures

from fashsim.data import fashion_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_until_finished(finite, endless, stop):
    """Start every thread; once the ``finite`` ones have ended, set ``stop`` (the event the
    ``endless`` ones loop on) and wait for those too: concurrency tests' harness."""
    for thread in [*finite, *endless]:
        thread.start()
    for thread in finite:
        thread.join()
    stop.set()
    for thread in endless:
        thread.join()


@contextlib.contextmanager
def faiss_without_torch_patch():
    """FAISS index methods as FAISS defines them, for code run in this process that calls them with
    FAISS's own keyword arguments (Milvus Lite's engine): pytorch-metric-learning, imported by the
    metric tests, imports ``faiss.contrib.torch_utils``, which replaces them process-wide (keeping the
    originals as ``<method>_numpy``)."""
    import faiss

    swapped = []
    for cls in (obj for obj in vars(faiss).values() if isinstance(obj, type)):
        for name, original in list(vars(cls).items()):
            if name.endswith("_numpy") and name[: -len("_numpy")] in vars(cls):
                method = name[: -len("_numpy")]
                swapped.append((cls, method, vars(cls)[method]))
                setattr(cls, method, original)
    try:
        yield
    finally:
        for cls, method, patched in swapped:
            setattr(cls, method, patched)


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


@pytest.fixture(scope="session")
def small_searcher():
    """A Searcher over the first 2000 test images with an untrained (BatchNorm-calibrated) model:
    enough to check the plumbing, since an image's own copy in the catalog is its nearest neighbour."""
    import torch

    from fashsim.app.course import index_fashion_mnist
    from fashsim.data.transforms import FASHION_MNIST_SPEC, to_tensor
    from fashsim.model.networks import EmbeddingNet
    from fashsim.search.searcher import Searcher

    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn")
    for module in model.modules():  # calibrate BatchNorm statistics on real images (cumulative average)
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():  # random but well-spread features
        images = fashion_mnist.load_fashion_mnist("train", download=False).images[:6000]
        for start in range(0, len(images), 500):
            model(to_tensor(images[start : start + 500], FASHION_MNIST_SPEC))
    model.eval()
    collection = index_fashion_mnist(model, splits=("test",), max_per_split=2000, kind="flat")
    return Searcher(model, collection)
