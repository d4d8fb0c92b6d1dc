"""Figures for the notebooks and the report. Every function returns a matplotlib Figure;
:func:`save_figure` writes it to ``reports/figures/<name>.png``. Deterministic given a seed."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..paths import reports_dir


def figures_dir() -> Path:
    """``reports/figures`` (created on demand)."""
    folder = reports_dir() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_figure(fig, name: str, folder: str | os.PathLike | None = None, *, dpi: int = 120) -> Path:
    """Save ``fig`` as ``<folder or reports/figures>/<name>.png`` and return the path."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _show(ax, image, cmap="gray") -> None:
    image = np.asarray(image)
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=255 if image.dtype == np.uint8 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(
    images: Sequence[np.ndarray],
    *,
    titles: Sequence[str] | None = None,
    ncols: int = 10,
    cell_size: float = 1.2,
    suptitle: str | None = None,
):
    """Images in a grid, optionally titled."""
    n = len(images)
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_size, nrows * (cell_size + 0.5)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < n:
            _show(ax, images[i])
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
        else:
            ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def class_sample_grid(images, labels, class_names: Sequence[str], *, per_class: int = 10, seed: int = 0):
    """One row per class with ``per_class`` random examples, class names on the left."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fig, axes = plt.subplots(
        len(class_names), per_class, figsize=(per_class * 0.9, len(class_names) * 0.95), squeeze=False
    )
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for col, ax in enumerate(axes[row]):
            if col < len(chosen):
                _show(ax, images[chosen[col]])
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


def class_balance(splits: Mapping[str, np.ndarray], class_names: Sequence[str]):
    """Grouped bar chart: images per class in each split (``{"train": labels, "val": labels, ...}``)."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    width = 0.8 / max(1, len(splits))
    x = np.arange(len(class_names))
    for i, (name, labels) in enumerate(splits.items()):
        counts = np.bincount(np.asarray(labels), minlength=len(class_names))
        ax.bar(x + i * width, counts, width, label=f"{name} ({len(labels)})")
    ax.set_xticks(x + width * (len(splits) - 1) / 2, class_names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title("Class balance per split")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=len(splits))
    fig.tight_layout()
    return fig


def pk_batch_figure(images, labels, class_names: Sequence[str], p: int, k: int):
    """One P×K batch: a row per class (P rows), its K images across."""
    labels = np.asarray(labels)
    fig, axes = plt.subplots(p, k, figsize=(k * 0.9, p * 0.95), squeeze=False)
    for row in range(p):
        for col in range(k):
            _show(axes[row, col], images[row * k + col])
        axes[row, 0].set_ylabel(class_names[labels[row * k]], rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"One P×K batch: P={p} classes × K={k} images")
    fig.tight_layout()
    return fig


def distance_matrix_figure(distances, labels, class_names: Sequence[str], *, anchor_rows: int = 3):
    """A batch's pairwise distance matrix with, for a few anchors, the hardest positive (○) and
    hardest negative (×) that batch-hard mining picks. ``distances`` is ``(B, B)``, batch sorted by label."""
    d = np.asarray(distances)
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(d, cmap="viridis")
    fig.colorbar(image, ax=ax, label="distance")
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    anchors = np.linspace(0, len(d) - 1, anchor_rows).round().astype(int)
    for a in anchors:
        hp = np.where(same[a], d[a], -np.inf).argmax()
        hn = np.where(labels != labels[a], d[a], np.inf).argmin()
        ax.scatter([hp], [a], marker="o", s=60, facecolors="none", edgecolors="white", linewidths=1.5)
        ax.scatter([hn], [a], marker="x", s=60, color="red", linewidths=1.5)
        ax.axhline(a, color="white", lw=0.3, alpha=0.6)
    bounds = np.flatnonzero(np.diff(labels)) + 0.5
    for b in bounds:
        ax.axhline(b, color="black", lw=0.5)
        ax.axvline(b, color="black", lw=0.5)
    centres = [np.flatnonzero(labels == c).mean() for c in dict.fromkeys(labels.tolist())]
    names = [class_names[c] for c in dict.fromkeys(labels.tolist())]
    ax.set_xticks(centres, names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(centres, names, fontsize=7)
    ax.set_title("Batch distances: ○ hardest positive, × hardest negative")
    fig.tight_layout()
    return fig


def training_curves(history: Sequence[Mapping], *, title: str = "Training"):
    """Loss, mining statistics and validation metrics per epoch from a training history."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o")
    axes[0].set_title("training loss")
    for key, label in (
        ("train_hardest_pos", "hardest positive"),
        ("train_hardest_neg", "hardest negative"),
        ("train_spread", "batch spread"),
    ):
        if key in history[0]:
            axes[1].plot(epochs, [h[key] for h in history], marker="o", label=label)
    if "train_active_fraction" in history[0]:
        axes[1].plot(
            epochs, [h["train_active_fraction"] for h in history], marker="o", ls="--", label="active triplets"
        )
    axes[1].set_title("mining statistics")
    axes[1].legend(fontsize=8)
    validated = [h for h in history if "val_map@r" in h]  # every val_every epochs
    for key, label in (("val_recall@1", "val Recall@1"), ("val_map@r", "val MAP@R")):
        axes[2].plot([h["epoch"] for h in validated], [h[key] for h in validated], marker="o", label=label)
    axes[2].set_title("validation")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def retrieval_grid(
    queries: Sequence[np.ndarray],
    results: Sequence[Sequence],
    images_of=None,
    *,
    query_labels: Sequence[str] | None = None,
    title: str | None = None,
    caption=None,
    frame=None,
):
    """One row per query: the query image, then its hits with rank, score and category; hits of
    the query's category (when ``query_labels`` is given) framed green, others red.

    ``results[i]`` is a list of :class:`fashsim.search.collection.Hit`; ``images_of(hit)`` returns its
    pixels (default: the picture its ``source`` names, :func:`fashsim.data.sources.load_source_image`).
    ``caption(hit)`` and ``frame(row, hit) -> colour or None`` replace the default caption and
    frames (e.g. a colour catalog frames by style and colour).
    """
    if images_of is None:
        from ..data.sources import load_source_image

        def images_of(hit):
            return load_source_image(hit.source)

    if caption is None:

        def caption(hit):
            return f"#{hit.rank} {hit.score:.3f}\n{hit.category}"

    if frame is None and query_labels is not None:

        def frame(row, hit):
            return "tab:green" if hit.category == query_labels[row] else "tab:red"

    k = max((len(r) for r in results), default=0)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=((k + 1) * 1.2, len(queries) * 1.6), squeeze=False)
    for row, (query, hits) in enumerate(zip(queries, results)):
        _show(axes[row, 0], query)
        axes[row, 0].set_title("query" + (f"\n{query_labels[row]}" if query_labels else ""), fontsize=6.5)
        for col in range(1, k + 1):
            ax = axes[row, col]
            if col > len(hits):
                ax.axis("off")
                continue
            hit = hits[col - 1]
            _show(ax, images_of(hit))
            ax.set_title(caption(hit), fontsize=6)
            colour = frame(row, hit) if frame is not None else None
            if colour is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(2.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def index_comparison(rows: Sequence[Mapping], *, k: int = 10):
    """Recall@k against queries per second for each index kind / setting (log-scaled QPS)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        ax.plot([r["qps"] for r in mine], [r[f"recall@{k}"] for r in mine], marker="o", label=kind)
        for r in mine:
            effort = {n: v for n, v in r["params"].items() if n in ("ef_search", "nprobe", "k_factor")}
            if effort:
                ax.annotate(
                    ", ".join(f"{n}={v}" for n, v in effort.items()),
                    (r["qps"], r[f"recall@{k}"]),
                    fontsize=7,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
    ax.set_xscale("log")
    ax.set_xlabel("queries per second (batch)")
    ax.set_ylabel(f"recall@{k} vs exact")
    ax.set_title("Exact vs approximate search")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_heatmap(confusion: np.ndarray, class_names: Sequence[str], *, title: str = "kNN-vote confusion matrix"):
    """Row-normalised confusion matrix (true class per row) with counts in the cells."""
    cm = np.asarray(confusion)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def recall_at_k_curves(curves: Mapping[str, Mapping[int, float]]):
    """Recall@K against K for several embeddings (``{name: {k: recall}}``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in curves.items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title("Recall@K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def project_2d(embeddings: np.ndarray, *, method: str = "umap", seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """2-d coordinates of embeddings by ``umap`` (cosine metric), ``tsne`` or ``pca``; seeded."""
    x = np.asarray(embeddings, dtype=np.float32)
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=n_neighbors, min_dist=0.1, metric="cosine", random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, metric="cosine", init="pca", random_state=seed).fit_transform(x)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    raise ValueError(f"method must be umap, tsne or pca, got {method!r}")


def embedding_map(
    coords: np.ndarray,
    labels,
    class_names: Sequence[str],
    *,
    ax=None,
    title: str = "",
    thumbnails: np.ndarray | None = None,
    n_thumbnails: int = 30,
    seed: int = 0,
):
    """Scatter of 2-d coordinates coloured by category, optionally with image thumbnails."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    labels = np.asarray(labels)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
    cmap = plt.get_cmap("tab10")
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            ax.scatter(coords[mask, 0], coords[mask, 1], s=3, color=cmap(c % 10), label=name, alpha=0.7)
    if thumbnails is not None:
        rng = np.random.default_rng(seed)
        for i in rng.choice(len(coords), min(n_thumbnails, len(coords)), replace=False):
            box = AnnotationBbox(OffsetImage(thumbnails[i], cmap="gray", zoom=0.45), coords[i], frameon=False)
            ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(markerscale=4, fontsize=7, loc="best")
    return fig if fig is not None else ax.figure
