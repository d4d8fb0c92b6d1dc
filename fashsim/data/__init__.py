"""Data: Fashion-MNIST and users' photo catalogs, splits, P×K sampling, safe upload decoding and model-input transforms."""
