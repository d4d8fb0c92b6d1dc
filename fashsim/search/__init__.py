"""Search: the FAISS vector index, the metadata store, the saved collection, the searcher and re-ranking.

This layer knows no dataset and no training loop: it turns images into ranked items with a trained model.
"""
