"""The evaluation protocol: every embedding — trained model or baseline — measured the same way.

* :func:`evaluate_embeddings` — all metrics of :mod:`fashsim.evaluation.metrics` for one set of embeddings
  (leave-one-out over the evaluation set).
* :func:`worst_confusions` — the category pairs the kNN vote mixes up most.
"""

from __future__ import annotations

import numpy as np

from fashsim.evaluation import metrics


def evaluate_embeddings(
    embeddings: np.ndarray, labels: np.ndarray, *, ks=(1, 5, 10), knn_k: int = 10, full_map: bool = True, seed: int = 0
) -> dict[str, float]:
    """Recall@K, Precision@K, R-precision, MAP@R, mAP (full ranking), triplet accuracy and kNN-vote
    accuracy, leave-one-out over ``embeddings``."""
    scores = metrics.retrieval_metrics(embeddings, labels, ks=ks)
    if full_map:
        scores["map"] = metrics.mean_average_precision(embeddings, labels)
    scores["triplet_accuracy"] = metrics.triplet_accuracy(embeddings, labels, seed=seed)
    scores["knn_accuracy"] = float(np.mean(metrics.knn_predict(embeddings, labels, k=knn_k) == labels))
    return scores


def worst_confusions(confusion: np.ndarray, class_names, n: int = 5) -> list[dict]:
    """The ``n`` largest off-diagonal cells: true class, predicted class, count, share of the true class."""
    off = confusion.astype(float).copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:n]
    rows = []
    for flat in order:
        t, p = np.unravel_index(flat, off.shape)
        if off[t, p] == 0:
            break
        rows.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(off[t, p]),
                "share": float(off[t, p] / confusion[t].sum()),
            }
        )
    return rows
