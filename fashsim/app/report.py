"""Presenting results: markdown tables for notebooks, and the markdown report (``reports/REPORT.md``).

Everything here is generated from what the runs wrote (``reports/results/*.json``, the training
history, ``reports/benchmarks/*.json``, the figures): no number is typed by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

SUMMARY_METRICS = ("recall@1", "recall@5", "map@r")


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if len(value) <= 12 else f"{len(value)} values"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts → a GitHub-flavoured markdown table (columns: given, or every key in order of appearance)."""
    if not rows:
        return "_(no rows)_"
    columns = list(columns or dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def rounded(metrics: Mapping, keys: Sequence[str] = SUMMARY_METRICS, digits: int = 4) -> dict:
    """The ``keys`` of ``metrics`` rounded for a table."""
    return {k: round(float(metrics[k]), digits) for k in keys if k in metrics}


def metrics_rows(by_name: Mapping[str, Mapping], key: str, columns: Sequence[str] = SUMMARY_METRICS) -> list[dict]:
    """``{name: metrics}`` → one table row per name."""
    return [{key: name, **rounded(m, columns)} for name, m in by_name.items() if isinstance(m, Mapping)]


def training_rows(history: Mapping, benchmark: Mapping | None = None) -> list[dict]:
    """This run's best epoch (``history.json`` of :func:`fashsim.train.train`), and — when the
    training benchmark has run — its test-split results (``reports/benchmarks/training.json``),
    the recipes it was asked to compare (``--recipe``, under ``variants``) included."""
    rows = []
    if history and history.get("best"):
        best, last = history["best"], history["history"][-1]
        rows.append(
            {
                "run": "this run (validation split)",
                "epochs": len(history["history"]),
                "train s": round(last["train_seconds"]),
                "img/s": round(last["images_per_second"]),
                "precision": history.get("precision", ""),
                "best epoch": best["epoch"],
                **{k: round(best[f"val_{k}"], 4) for k in SUMMARY_METRICS},
            }
        )
    benchmark = benchmark or {}
    variants = benchmark.get("variants") or {}
    named = [*benchmark.items(), *((f"variant {name}", result) for name, result in variants.items())]
    for name, result in named:
        if isinstance(result, Mapping) and "recall@1" in result:
            rows.append(
                {
                    "run": f"benchmark: {name} (test split)",
                    "epochs": result.get("epochs", ""),
                    "train s": result.get("train_seconds", ""),
                    "img/s": result.get("images_per_second", ""),
                    "precision": result.get("precision", ""),
                    **rounded(result),
                }
            )
    return rows


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def render(value, *, name: str = "name", depth: int = 3) -> str:
    """Any JSON result as readable markdown: tables for lists of records and for mappings of
    records, ``key: value`` lines for flat mappings, sub-headings for deeper nesting."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if value and all(isinstance(v, Mapping) for v in value):
            flat = [{k: v for k, v in row.items() if _is_scalar(v) or isinstance(v, (list, Mapping))} for row in value]
            return markdown_table(flat)
        return _cell(list(value))
    if not isinstance(value, Mapping):
        return _cell(value)
    scalars = {k: v for k, v in value.items() if _is_scalar(v) or isinstance(v, list) and all(map(_is_scalar, v))}
    records = {k: v for k, v in value.items() if isinstance(v, Mapping) and v and all(map(_is_scalar, v.values()))}
    rest = {k: v for k, v in value.items() if k not in scalars and k not in records}
    parts = []
    if scalars:
        parts.append(markdown_table([{"": k, "value": v} for k, v in scalars.items()], ["", "value"]))
    if records:
        parts.append(markdown_table([{name: k, **v} for k, v in records.items()]))
    for key, item in rest.items():
        body = render(item, depth=depth - 1) if depth > 0 else _cell(item)
        parts.append(f"**{key}**\n\n{body}")
    return "\n\n".join(parts)


def _figure(figures: Sequence[str], name: str, caption: str) -> str:
    return (
        f"![{caption}](figures/{name}.png)\n\n*{caption}*\n" if name in figures else f"*({caption}: not generated)*\n"
    )


def build_report(
    results: Mapping[str, Mapping],
    *,
    history: Mapping | None = None,
    benchmarks: Mapping[str, Mapping] | None = None,
    figures: Sequence[str] = (),
    title: str = "fashsim — report",
) -> str:
    """``reports/REPORT.md`` from ``results`` (:func:`fashsim.app.results.all_results`), the
    default model's training ``history`` (``history.json``), ``benchmarks`` (``reports/benchmarks``)
    and the names of the figures present in ``reports/figures``."""
    lines = [
        f"# {title}",
        "",
        "Generated by the report notebook from the pipeline's outputs "
        "(`reports/results/*.json`, `reports/benchmarks/*.json`, `reports/figures/`); regenerate with `make run`.",
        "",
    ]

    def section(heading: str, *body: str) -> None:
        lines.extend([f"## {heading}", ""])
        for part in body:
            if part:
                lines.extend([part.rstrip("\n"), ""])

    times = results.get("pipeline", {})
    if times:
        rows = [
            {"notebook": nb, "seconds": t["seconds"], "profile": t["profile"], "finished": t["finished"]}
            for nb, t in sorted(times.items())
        ]
        totals: dict[str, float] = {}
        for t in times.values():
            totals[t["profile"]] = totals.get(t["profile"], 0.0) + t["seconds"]
        section(
            "Pipeline run",
            markdown_table(rows),
            "Total: "
            + ", ".join(
                f"{seconds / 60:.1f} minutes ({profile} profile)" for profile, seconds in sorted(totals.items())
            )
            + ". Each notebook's latest run; the report's own notebook writes this before its time is recorded, "
            "so its row is that of its previous run.",
        )
    data = results.get("dataset_prep")
    if data:
        section(
            "Data",
            render({"source": data.get("source"), **data.get("sizes", {})}),
            f"Open set: {', '.join(data.get('open_set_holdout', []))} never seen in training.",
            _figure(figures, "01_class_samples", "Fashion-MNIST samples"),
        )
    if history or results.get("triplet_training"):
        rows = training_rows(history or {}, (benchmarks or {}).get("training"))
        stopped = results.get("triplet_training", {}).get("stopped", "")
        section(
            "Training the triplet network",
            markdown_table(rows),
            f"Stopped by: {stopped}." if stopped else "",
            _figure(figures, "02_training_curves", "training curves"),
        )
    evaluation = results.get("evaluation")
    if evaluation:
        closed = evaluation.get("closed_set", {})
        columns = ("recall@1", "recall@5", "recall@10", "precision@10", "map@r", "map", "triplet_accuracy")
        section(
            f"Retrieval on the test split ({evaluation.get('eval_items', '?')} images, leave-one-out)",
            markdown_table(metrics_rows(closed, "embedding", columns)),
        )
        curves = evaluation.get("recall_at_k", {})
        if curves:
            section(
                "Recall@K",
                markdown_table(
                    [{"embedding": n, **{f"R@{k}": round(v, 4) for k, v in c.items()}} for n, c in curves.items()]
                ),
                _figure(figures, "04_recall_at_k", "Recall@K curves"),
            )
        per_category = evaluation.get("per_category_recall@1", {})
        if per_category:
            section(
                "Per-category Recall@1",
                markdown_table([{"category": c, "recall@1": round(r, 4)} for c, r in per_category.items()]),
            )
        section(
            "Errors",
            _figure(figures, "04_confusion_matrix", "kNN-vote confusion matrix (test split)"),
            markdown_table(evaluation.get("worst_confusions", [])),
        )
        open_set = {k: v for k, v in evaluation.get("open_set", {}).items() if isinstance(v, Mapping)}
        if open_set:
            section(
                f"Open set (held out in training: {', '.join(evaluation['open_set'].get('holdout', []))})",
                markdown_table(metrics_rows(open_set, "setting")),
            )
    index = results.get("faiss_indexing")
    if index:
        section(
            "Vector index",
            markdown_table(index.get("kinds", [])),
            render({k: v for k, v in index.items() if k != "kinds"}),
            _figure(figures, "03_index_comparison", "exact vs approximate search"),
            _figure(figures, "03_retrieval_examples", "queries and their top-10"),
        )
    umap = results.get("embedding_umap")
    if umap:
        section(
            "Embedding space",
            render(umap),
            _figure(figures, f"05_{umap.get('method', 'umap')}_raw_vs_trained", "raw pixels vs trained embedding"),
        )
    demo = results.get("search_demo")
    if demo:
        section("Search demo", render(demo), _figure(figures, "06_demo_search", "the demo's answer to a test image"))
    beyond = results.get("beyond_triplets")
    if beyond:
        section(
            f"Beyond triplets ({beyond.get('budget_seconds')} s per variant)",
            "**Closed set**",
            markdown_table(beyond.get("closed_set", [])),
            "**Open set**",
            markdown_table(beyond.get("open_set", [])),
            "**Re-ranking, closed set**",
            markdown_table(beyond.get("reranking_closed", [])),
            "**Re-ranking, open set**",
            markdown_table(beyond.get("reranking_open", [])),
            "**Verdict**",
            *[f"* {setting}: " + "; ".join(v) for setting, v in beyond.get("verdict", {}).items()],
        )
    shop = results.get("your_own_shop")
    if shop and "evaluation" in shop:
        from ..evaluation.shop import comparison_rows

        build = shop.get("build", {})
        evaluation = shop["evaluation"]
        section(
            "Your own shop: a colour catalog",
            f"{build.get('indexed', '?')} items of `{Path(shop.get('catalog', '?')).name}`, "
            f"{build.get('styles', '?')} styles (the same style = {' + '.join(build.get('label_columns', []))}), "
            f"built in {build.get('seconds', {}).get('total', float('nan')):.0f} s; every method searched by the "
            "items the model never trained on, each among the others (leave-one-out).",
            markdown_table(comparison_rows(evaluation)),
            *[f"* note: {note}" for note in evaluation.get("notes", [])],
            _figure(figures, "08_shop_results", "held-out queries and their nearest catalog items"),
            _figure(figures, "08_shop_baselines", "the trained model against the baselines"),
            _figure(figures, "08_shop_open_set", "styles never seen in training"),
            _figure(figures, "08_shop_filters", "the same query with metadata filters"),
        )
    known = {
        "your_own_shop",
        "pipeline",
        "dataset_prep",
        "triplet_training",
        "evaluation",
        "faiss_indexing",
        "embedding_umap",
        "search_demo",
        "beyond_triplets",
    }
    for name, result in results.items():
        if name not in known:
            section(name.replace("_", " ").capitalize(), render(result))
    for name, data in (benchmarks or {}).items():
        section(f"Benchmark: {name}", render(data))
    return "\n".join(lines) + "\n"
