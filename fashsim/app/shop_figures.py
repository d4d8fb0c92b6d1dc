"""Figures for photo catalogs (notebook 09): colour product photos with their style, colour
search results framed by how well they match, and the trained model against the baselines.
Every function returns a matplotlib Figure (save it with :func:`fashsim.app.viz.save_figure`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..data.uploads import load_image

#: Frame colours of a result: same style, same colour only, neither.
MATCH_COLOURS = {"style": "tab:green", "colour": "tab:orange", "none": "tab:red"}


def _thumbnail(source, size: int = 96) -> np.ndarray:
    image = load_image(source).convert("RGB")
    image.thumbnail((size, size))
    return np.asarray(image)


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def shop_samples(
    records: Sequence[Mapping],
    *,
    n: int = 24,
    ncols: int = 8,
    seed: int = 0,
    title_columns: Sequence[str] = ("baseColour", "pattern", "articleType"),
):
    """``n`` random catalog items (``records`` with ``source``/``path`` and the title columns)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), min(n, len(records)), replace=False)
    nrows = -(-len(chosen) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 1.4, nrows * 1.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, chosen):
        record = records[i]
        ax.axis("on")
        ax.imshow(_thumbnail(record.get("source") or record.get("path")))
        ax.set_title("\n".join(str(record.get(c, "")) for c in title_columns if c in record), fontsize=6)
        _clean(ax)
    fig.tight_layout()
    return fig


def colour_results(
    queries: Sequence,
    results: Sequence[Sequence],
    *,
    query_records: Sequence[Mapping] | None = None,
    colour_column: str = "baseColour",
    style_key: str = "style",
    title: str | None = None,
):
    """One row per query: the query photo, then its hits (rank, score, style), framed green when
    the hit has the query's style, orange when only its colour, red otherwise (frames need
    ``query_records`` with the query's style and colour)."""
    from .viz import retrieval_grid

    def style_of(hit) -> str:
        return str(hit.extra.get(style_key, hit.category))

    def frame(row, hit):
        info = query_records[row] if query_records is not None else None
        if not info:
            return None
        if style_of(hit) == info.get(style_key):
            return MATCH_COLOURS["style"]
        if colour_column in info and hit.extra.get(colour_column) == info[colour_column]:
            return MATCH_COLOURS["colour"]
        return MATCH_COLOURS["none"]

    return retrieval_grid(
        [_thumbnail(q) for q in queries],
        results,
        lambda hit: _thumbnail(hit.source),
        query_labels=(
            [str(r.get(style_key, "")).replace(" / ", "\n", 1) for r in query_records] if query_records else None
        ),
        title=title,
        caption=lambda hit: f"#{hit.rank} {hit.score:.2f}\n{style_of(hit).replace(' / ', chr(10), 1)}",
        frame=frame,
    )


def baselines_chart(
    rows: Sequence[Mapping],
    *,
    metrics: Sequence[str] = ("style_recall@1", "style_map@r", "category_recall@1", "baseColour_match@5"),
):
    """Grouped bars: each method of :func:`fashsim.evaluation.shop.comparison_rows` on each metric."""
    metrics = [m for m in metrics if any(m in r and r[m] is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(metrics), 3.2))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(metrics))
    for n, row in enumerate(rows):
        values = [row.get(m) or 0.0 for m in metrics]
        ax.bar(x + (n - (len(rows) - 1) / 2) * width, values, width, label=row["method"])
    ax.set_xticks(x, metrics, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out items")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=2, loc="upper left")
    fig.tight_layout()
    return fig
