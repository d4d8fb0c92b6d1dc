"""The search engine facade: image in, ranked similar catalog items out.

:class:`Searcher` ties a trained model, its input transform and a :class:`~fashsim.collection.Collection`
together: ``search(image, k=10, category=None)`` accepts a path, bytes, file object, PIL image or
array, decodes it safely (:func:`fashsim.images.load_image`), turns it into what the model saw
in training (:func:`fashsim.images.prepare_image`), embeds it and returns ranked
:class:`~fashsim.collection.Hit` objects (id, score, category, source).

Catalog items are identified by a ``source`` string: an image path, or ``fashion-mnist:<split>:<n>``
for dataset images; :func:`load_source_image` turns either back into pixels (thumbnails).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .collection import Collection, CorruptIndexError, Hit, IndexMismatchError
from .fashion_mnist import load_fashion_mnist
from .images import load_image, prepare_image
from .models import EmbeddingNet, fingerprint, load_model
from .paths import data_dir
from .training import embed_arrays

FMNIST_PREFIX = "fashion-mnist:"


def fashion_mnist_source(split: str, index: int) -> str:
    """The catalog ``source`` of a Fashion-MNIST image."""
    return f"{FMNIST_PREFIX}{split}:{int(index)}"


@lru_cache(maxsize=2)
def _fmnist_split(split: str):
    return load_fashion_mnist(split)


def load_source_image(source: str) -> np.ndarray:
    """Pixels of a catalog item (uint8 array) from its ``source`` string."""
    if source.startswith(FMNIST_PREFIX):
        _, split, index = source.split(":")
        return _fmnist_split(split).images[int(index)]
    return np.asarray(load_image(source))


class Searcher:
    """Model + transform + collection (see the module docstring)."""

    def __init__(self, model: EmbeddingNet, collection: Collection, *, check_fingerprint: bool = True,
                 threads: int | None = None) -> None:
        """``threads``: set torch's CPU threads for this process (1 gives the lowest single-query
        latency: a tiny forward pass loses more to thread contention than it gains)."""
        if check_fingerprint and collection.model_fingerprint not in (None, fingerprint(model)):
            raise IndexMismatchError("the collection was built with another model: rebuild the index")
        if collection.dim != model.embedding_dim:
            raise IndexMismatchError(f"the collection holds {collection.dim}-d vectors but the model makes "
                                     f"{model.embedding_dim}-d embeddings")
        self.model = model.eval()
        self.collection = collection
        self.spec = model.input_spec
        self.device = next(model.parameters()).device
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)

    @classmethod
    def from_paths(cls, model_path: str | os.PathLike, index_dir: str | os.PathLike, **kwargs) -> "Searcher":
        """Load a saved model and the collection built with it (mismatches are refused)."""
        model = load_model(model_path)
        return cls(model, Collection.load(index_dir, model=model), **kwargs)

    def prepare(self, image) -> np.ndarray:
        """The query as the model sees it (e.g. 28×28 greyscale, inverted): uint8 array."""
        return prepare_image(load_image(image), self.spec)

    def embed_prepared(self, prepared: np.ndarray) -> np.ndarray:
        """Embedding ``(1, dim)`` of an image already in the model's format (:meth:`prepare`)."""
        return embed_arrays(self.model, np.asarray(prepared)[None], device=self.device)

    def embed(self, image) -> np.ndarray:
        """The query's embedding, shape ``(1, dim)``."""
        return self.embed_prepared(self.prepare(image))

    def search_prepared(self, prepared: np.ndarray, k: int = 10, *, category: str | None = None, where=None,
                        log: bool = False) -> list[Hit]:
        """:meth:`search` for an image already in the model's format (what the demo shows)."""
        return self.collection.search(self.embed_prepared(prepared), k, category=category, where=where, log=log)[0]

    def search(self, image, k: int = 10, *, category: str | None = None, where=None,
               log: bool = False) -> list[Hit]:
        """The ``k`` most similar catalog items, best first. Bad images raise
        :class:`~fashsim.errors.InvalidImageError` with a readable message."""
        return self.search_prepared(self.prepare(image), k, category=category, where=where, log=log)

    def categories(self) -> list[str]:
        return list(self.collection.categories())


def index_fashion_mnist(model: EmbeddingNet, *, splits=("train", "test"), kind: str = "auto",
                        max_per_split: int | None = None, batch_size: int = 1024, **index_params) -> Collection:
    """A collection over Fashion-MNIST splits (all 70 000 images by default; the first
    ``max_per_split`` of each split if given), ids ``0..59999`` for train and ``60000..69999`` for test."""
    vectors, records = [], []
    for split in splits:
        data = load_fashion_mnist(split)
        if max_per_split is not None:
            data = data.subset(np.arange(min(max_per_split, len(data))))
        vectors.append(embed_arrays(model, data.images, batch_size=batch_size))
        base = 0 if split == "train" else 60_000
        records += [{"id": base + i, "source": fashion_mnist_source(split, i), "category": data.class_names[label]}
                    for i, label in enumerate(data.labels)]
    return Collection.build(np.concatenate(vectors), records, kind=kind, model_fingerprint=fingerprint(model),
                            **index_params)


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
