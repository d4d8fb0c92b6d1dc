"""The course's defaults: the default model and the Fashion-MNIST collection every notebook shares.

Each notebook runs standalone: with no trained model on disk :func:`load_or_train_default`
trains a quick one, and :func:`load_or_build_index` builds (and saves) the collection over all
70 000 Fashion-MNIST images when notebook 03 has not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.fashion_mnist import load_fashion_mnist, load_train_val
from ..data.sources import fashion_mnist_id, fashion_mnist_source
from ..model.inference import embed_arrays
from ..model.networks import EmbeddingNet
from ..model.persistence import fingerprint, load_model
from ..paths import data_dir
from ..search.collection import Collection, CorruptIndexError, IndexMismatchError
from ..search.stores import build_collection
from ..train import TrainConfig, train


def load_or_train_default(model_path, *, max_seconds: float = 120.0, progress: bool = True) -> EmbeddingNet:
    """The saved default model, or — when there is none yet — a quick one trained now with the
    default recipe and a ``max_seconds`` budget (so every notebook also runs standalone)."""
    model_path = Path(model_path)
    if model_path.is_file():
        return load_model(model_path)
    print(f"no model at {model_path}: training the default recipe for {max_seconds:.0f} s first")
    train_set, val_set = load_train_val()
    return train(TrainConfig.budgeted(max_seconds), train_set, val_set, model_path.parent, progress=progress).model


def index_fashion_mnist(
    model: EmbeddingNet,
    *,
    splits=("train", "test"),
    kind: str = "auto",
    max_per_split: int | None = None,
    batch_size: int = 1024,
    store: str | None = None,
    location=None,
    **index_params,
):
    """A collection over Fashion-MNIST splits (all 70 000 images by default; the first
    ``max_per_split`` of each split if given), ids ``0..59999`` for train and ``60000..69999`` for test,
    in the vector ``store`` (``faiss`` by default, or ``milvus``; see :mod:`fashsim.search.stores`),
    saved at ``location`` when given."""
    vectors, records = [], []
    for split in splits:
        data = load_fashion_mnist(split)
        if max_per_split is not None:
            data = data.subset(np.arange(min(max_per_split, len(data))))
        vectors.append(embed_arrays(model, data.images, batch_size=batch_size))
        records += [
            {
                "id": fashion_mnist_id(split, i),
                "source": fashion_mnist_source(split, i),
                "category": data.class_names[label],
            }
            for i, label in enumerate(data.labels)
        ]
    return build_collection(
        np.concatenate(vectors),
        records,
        store=store,
        location=location,
        kind=kind,
        model_fingerprint=fingerprint(model),
        **index_params,
    )


def default_index_dir() -> Path:
    """``data/index/fashion-mnist``: where notebook 03 saves the index over Fashion-MNIST."""
    return data_dir() / "index" / "fashion-mnist"


def load_or_build_index(model: EmbeddingNet, index_dir: str | os.PathLike | None = None) -> Collection:
    """The saved Fashion-MNIST index of ``model`` (notebook 03), or — when there is none, or it
    belongs to another model — a new one over all 70 000 images, saved for next time."""
    index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
    try:
        return Collection.load(index_dir, model=model)
    except (CorruptIndexError, IndexMismatchError) as exc:
        print(f"building a new index ({exc})")
    collection = index_fashion_mnist(model)
    collection.save(index_dir)
    return collection
