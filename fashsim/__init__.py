"""fashsim: fashion image similarity search — triplet-network embeddings + FAISS.

The notebooks in ``notebooks/`` narrate; this package holds the logic, one module per concept:

* :mod:`fashsim.fashion_mnist` — find / download / load Fashion-MNIST
* :mod:`fashsim.catalogs` — users' own catalogs: image folder, CSV, DeepFashion In-shop
* :mod:`fashsim.images` — safe decoding of any upload, transforms to the model's input
* :mod:`fashsim.splits` — train/val/test and open-set splits
* :mod:`fashsim.sampler` — P×K batches for online triplet mining
* :mod:`fashsim.viz` — figures for notebooks and the report
* :mod:`fashsim.pipeline` — run the notebooks headless with papermill
"""

from .errors import DatasetFormatError, DatasetNotFoundError, FashsimError, InvalidImageError

__version__ = "0.1.0"
__all__ = ["FashsimError", "DatasetNotFoundError", "DatasetFormatError", "InvalidImageError", "__version__"]
