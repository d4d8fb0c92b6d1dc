"""The search engine facade: image in, ranked similar catalog items out.

:class:`Searcher` ties a trained model, its input transform and a :class:`~fashsim.search.collection.Collection`
together: ``search(image, k=10, category=None)`` accepts a path, bytes, file object, PIL image or
array, decodes it safely (:func:`fashsim.data.uploads.load_image`), turns it into what the model saw
in training (:func:`fashsim.data.transforms.prepare_image`), embeds it and returns ranked
:class:`~fashsim.search.collection.Hit` objects (id, score, category, source).

Catalog items are identified by a ``source`` string: an image path, or ``fashion-mnist:<split>:<n>``
for dataset images; :func:`load_source_image` turns either back into pixels (thumbnails).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..data.transforms import prepare_image
from ..data.uploads import load_image
from ..errors import FashsimError
from ..model.inference import embed_arrays
from ..model.networks import EmbeddingNet
from ..model.persistence import fingerprint, load_model
from .collection import Collection, Hit, IndexMismatchError


class Searcher:
    """Model + transform + collection (see the module docstring)."""

    def __init__(
        self, model: EmbeddingNet, collection: Collection, *, check_fingerprint: bool = True, threads: int | None = None
    ) -> None:
        """``threads``: set torch's CPU threads for this process (1 gives the lowest single-query
        latency: a tiny forward pass loses more to thread contention than it gains)."""
        if check_fingerprint and collection.model_fingerprint not in (None, fingerprint(model)):
            raise IndexMismatchError("the collection was built with another model: rebuild the index")
        if collection.dim != model.embedding_dim:
            raise IndexMismatchError(
                f"the collection holds {collection.dim}-d vectors but the model makes "
                f"{model.embedding_dim}-d embeddings"
            )
        self.model = model.eval()
        self.collection = collection
        self.spec = model.input_spec
        self.device = next(model.parameters()).device
        if threads is not None and self.device.type == "cpu":
            torch.set_num_threads(threads)

    @classmethod
    def from_paths(cls, model_path: str | os.PathLike, index_dir: str | os.PathLike, **kwargs) -> Searcher:
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

    def search_prepared(
        self, prepared: np.ndarray, k: int = 10, *, category: str | None = None, where=None, log: bool = False
    ) -> list[Hit]:
        """:meth:`search` for an image already in the model's format (what the demo shows)."""
        return self.collection.search(self.embed_prepared(prepared), k, category=category, where=where, log=log)[0]

    def require_category(self, category: str | None) -> None:
        """Raise a clear error when ``category`` (None: any) is not one the collection holds: a
        search restricted to it would silently find nothing (for command lines; the demo offers
        only the collection's own categories)."""
        if category is not None and category not in (known := self.categories()):
            close = [c for c in known if c.lower() == category.lower()]
            raise FashsimError(
                f"no category {category!r} in the collection"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; its categories are: {', '.join(known)}"
            )

    def search(self, image, k: int = 10, *, category: str | None = None, where=None, log: bool = False) -> list[Hit]:
        """The ``k`` most similar catalog items, best first. Bad images raise
        :class:`~fashsim.errors.InvalidImageError` with a readable message."""
        return self.search_prepared(self.prepare(image), k, category=category, where=where, log=log)

    def categories(self) -> list[str]:
        """The collection's category names."""
        return list(self.collection.categories())
