"""fashsim: fashion image similarity search — triplet-network embeddings + FAISS (or Milvus).

The notebooks in ``notebooks/`` narrate; this package holds the logic, in subpackages that follow
the course, one concept per module:

* :mod:`fashsim.data` — Fashion-MNIST, photo catalogs (folder, CSV, Kaggle, In-shop) and the
  generated colour shop, the course's splits, P×K sampling, safe upload decoding, model-input transforms
* :mod:`fashsim.model` — backbones + projection head → L2-normalised embeddings, shipped pretrained
  weights, save/load + fingerprint, one batched inference loop with its feature cache, sharded embedding
* :mod:`fashsim.train` — the configuration, the loss of one batch (mining), checkpoints, the loop,
  variants, distributed training (torchrun)
* :mod:`fashsim.search` — FAISS index, metadata store, collection, vector stores (FAISS, Milvus),
  searcher, re-ranking
* :mod:`fashsim.evaluation` — retrieval metrics, the protocol, baselines, variant and index studies
* :mod:`fashsim.app` — command line, notebook pipeline, recorded results, report and figures, the
  upload-and-search demo and its web page, the photo-catalog ("your own shop") builder
"""

from .errors import DatasetFormatError, DatasetNotFoundError, FashsimError, InvalidImageError

__version__ = "0.1.0"
__all__ = ["FashsimError", "DatasetNotFoundError", "DatasetFormatError", "InvalidImageError", "__version__"]
